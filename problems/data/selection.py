"""DomainBed's three model-selection protocols, as functions over a table of accuracies.

Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021, arXiv:2007.01434, Sec. 3
(and ``domainbed/model_selection.py``). A *run* is one hyperparameter setting trained once; it logs
accuracies at several checkpoints (steps). A protocol turns the runs into one chosen (hparams, step) and
reports that checkpoint's test-domain accuracy. Call a protocol once per test domain (and per trial
seed); averaging over test domains and seeds is the caller's job.

The table is any iterable of mappings (a list of dicts, or ``list(dataset)``), one row per run and
checkpoint. Every row has ``hparams`` (any hashable id of the setting, e.g. a string) and ``step``; the
other keys depend on the protocol, as each docstring says. Ties go to the row that comes first.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

Row = Mapping[str, Any]


def _rows(table: Iterable[Row], keys: tuple[str, ...]) -> list[Row]:
    rows = list(table)
    if not rows:
        raise ValueError("the accuracy table is empty: give one row per (hparams, step)")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise KeyError(f"row {i} of the accuracy table lacks {missing}; each row needs {list(keys)}: {dict(row)}")
    return rows


def _choice(row: Row, val: float, test: float) -> dict[str, Any]:
    return {"hparams": row["hparams"], "step": int(row["step"]), "val_acc": float(val), "test_acc": float(test)}


def select_training_domain_validation(table: Iterable[Row]) -> dict[str, Any]:
    """Training-domain validation: pick the checkpoint with the best accuracy on the source domains'
    held-out splits.

    Rows: ``hparams``, ``step``, ``val_acc`` (mean accuracy over the held-out 20% of each *training*
    domain) and ``test_acc`` (accuracy on the test domain). As in DomainBed's ``IIDAccuracySelectionMethod``,
    each run keeps its best step (early stopping on ``val_acc``) and the run with the best such value
    wins; together that is the argmax of ``val_acc`` over all rows.

    Returns:
        ``{"hparams", "step", "val_acc", "test_acc"}`` of the chosen row.
    """
    rows = _rows(table, ("hparams", "step", "val_acc", "test_acc"))
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -i))
    return _choice(rows[best], rows[best]["val_acc"], rows[best]["test_acc"])


def select_oracle(table: Iterable[Row]) -> dict[str, Any]:
    """Test-domain validation (oracle): pick the run by its accuracy on a held-out split of the *test*
    domain, at its last checkpoint.

    Rows: ``hparams``, ``step``, ``oracle_acc`` (accuracy on the held-out 20% of the test domain) and
    ``test_acc`` (accuracy on the rest of the test domain). As in DomainBed's ``OracleSelectionMethod``,
    early stopping is not allowed: each run is judged at its largest ``step``, and the run with the best
    ``oracle_acc`` there wins.

    Returns:
        ``{"hparams", "step", "val_acc", "test_acc"}`` with ``val_acc`` the winning ``oracle_acc``.
    """
    rows = _rows(table, ("hparams", "step", "oracle_acc", "test_acc"))
    last: dict[Hashable, int] = {}
    for i, row in enumerate(rows):
        j = last.get(row["hparams"])
        if j is None or row["step"] > rows[j]["step"]:
            last[row["hparams"]] = i
    best = max(last.values(), key=lambda i: (rows[i]["oracle_acc"], -i))
    return _choice(rows[best], rows[best]["oracle_acc"], rows[best]["test_acc"])


def select_leave_one_domain_out(table: Iterable[Row]) -> dict[str, Any]:
    """Leave-one-domain-out validation: each source domain in turn is also left out of training, and
    the accuracy on it, averaged over the source domains, scores the setting.

    Rows: ``hparams``, ``step``, ``held_out`` and an accuracy. A row with ``held_out=None`` is the run
    trained on all source domains and carries ``test_acc`` (accuracy on the test domain). A row with
    ``held_out=d`` is the run trained on the sources other than ``d`` and carries ``val_acc``, its accuracy
    on ``d``. As in DomainBed's ``LeaveOneOutSelectionMethod``, a (hparams, step) is scored by the mean
    ``val_acc`` over all held-out domains, needs every one of them plus the ``held_out=None`` row (else it
    is skipped), and the best-scoring (hparams, step) wins.

    Returns:
        ``{"hparams", "step", "val_acc", "test_acc"}``: the mean held-out accuracy and the test accuracy
        of the run on all sources at the chosen step.
    """
    rows = _rows(table, ("hparams", "step", "held_out"))
    groups: dict[tuple[Hashable, int], dict[Any, Row]] = {}
    for i, row in enumerate(rows):
        key = "test_acc" if row["held_out"] is None else "val_acc"
        if key not in row:
            raise KeyError(f"row {i} (held_out={row['held_out']!r}) lacks {key!r}: {dict(row)}")
        group = groups.setdefault((row["hparams"], int(row["step"])), {})
        if row["held_out"] in group:
            raise ValueError(f"duplicate row for hparams={row['hparams']!r}, step={row['step']}, held_out={row['held_out']!r}")
        group[row["held_out"]] = row
    held = sorted({r["held_out"] for r in rows if r["held_out"] is not None}, key=str)
    if not held:
        raise ValueError("no row has a held_out domain; leave-one-domain-out needs runs with a source left out")
    scored = []
    for (hp, step), group in groups.items():
        if None in group and all(d in group for d in held):
            val = sum(group[d]["val_acc"] for d in held) / len(held)
            scored.append((val, group[None]))
    if not scored:
        raise ValueError(
            f"no (hparams, step) has rows for every held-out domain {held} and for held_out=None; "
            "each checkpoint needs all of them"
        )
    val, row = max(scored, key=lambda s: s[0])  # max keeps the first of equal scores
    return _choice(row, val, row["test_acc"])
