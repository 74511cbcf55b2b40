"""Model selection for sweeps of the harness, through the data layer's DomainBed protocols
(``problems.data.select_training_domain_validation / select_oracle / select_leave_one_domain_out``).

A sweep record is ``(hparams_id, step, held_out, metrics)`` with ``metrics`` from :meth:`DGTask.evaluate`
(per-domain ``acc/<domain>/in`` and ``acc/<domain>/out`` with ``holdout > 0``). This module only turns
records into the rows each protocol reads (Gulrajani & Lopez-Paz, ICLR 2021, Sec. 3):

- training-domain validation: ``val_acc`` = mean out-split accuracy of the training domains,
  ``test_acc`` = test-domain accuracy (in + out);
- oracle: ``oracle_acc`` = the test domain's out split, ``test_acc`` = its in split;
- leave-one-domain-out: a run with source ``d`` also left out gives ``val_acc`` = its accuracy on ``d``.
"""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Optional

PROTOCOLS = ("training_domain", "oracle", "leave_one_domain_out")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def rows_for(protocol: str, records: Iterable[tuple[Hashable, int, Optional[str], dict[str, float]]],
             test_domain: str, train_domains: list[str]) -> list[dict[str, Any]]:
    """The data layer's rows for ``protocol`` from sweep records (see module doc)."""
    rows = []
    for hp, step, held_out, m in records:
        test = _mean([m[f"acc/{test_domain}/{p}"] for p in ("in", "out") if f"acc/{test_domain}/{p}" in m])
        if protocol == "training_domain" and held_out is None:
            rows.append({"hparams": hp, "step": step, "val_acc": _mean([m[f"acc/{d}/out"] for d in train_domains]),
                         "test_acc": test})
        elif protocol == "oracle" and held_out is None:
            rows.append({"hparams": hp, "step": step, "oracle_acc": m[f"acc/{test_domain}/out"],
                         "test_acc": m[f"acc/{test_domain}/in"]})
        elif protocol == "leave_one_domain_out":
            if held_out is None:
                rows.append({"hparams": hp, "step": step, "held_out": None, "test_acc": test})
            else:
                acc = _mean([m[f"acc/{held_out}/{p}"] for p in ("in", "out") if f"acc/{held_out}/{p}" in m])
                rows.append({"hparams": hp, "step": step, "held_out": held_out, "val_acc": acc})
        elif protocol not in PROTOCOLS:
            raise ValueError(f"unknown model-selection protocol {protocol!r}; valid: {PROTOCOLS}")
    return rows


def select(protocol: str, records, test_domain: str, train_domains: list[str]) -> dict[str, Any]:
    """Apply a DomainBed protocol (the data layer's function) to sweep records."""
    from .. import data as D
    fn = {"training_domain": D.select_training_domain_validation, "oracle": D.select_oracle,
          "leave_one_domain_out": D.select_leave_one_domain_out}
    if protocol not in fn:
        raise ValueError(f"unknown model-selection protocol {protocol!r}; valid: {PROTOCOLS}")
    return fn[protocol](rows_for(protocol, records, test_domain, train_domains))
