"""bilevel.check: reports small errors for right hypergradients and large ones for a wrong solver."""
import dataclasses

import bilevel
from oracles import ridge


def test_check_reports_agreement(capsys):
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=30, lr=0.3, optimizer="momentum")
    report = bilevel.check(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="forward",
                           reference="unroll", loop=loop)
    assert report.fd_rel_error < 1e-6 and report.fd_cosine > 0.999999
    assert report.ref_rel_error < 1e-10
    assert "vs central finite differences" in capsys.readouterr().out


def test_check_random_directions_for_large_outer():
    problem, inner, outer, ib, ob = ridge(d=40)
    report = bilevel.check(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="unroll", reference=None,
                           loop=bilevel.InnerLoop(steps=20, lr=0.3), max_directions=8, verbose=False)
    assert report.directions == 8 and report.fd_rel_error < 1e-6


def test_check_flags_a_wrong_hypergradient():
    """A Neumann series without its leading alpha (the ITL pseudocode bug) is caught."""
    problem, inner, outer, ib, ob = ridge()

    @dataclasses.dataclass(frozen=True)
    class NoAlpha(bilevel.Implicit):
        def __call__(self, *args):
            result = super().__call__(*args)
            result.hypergrad = {k: v / self.linsolve.alpha for k, v in result.hypergrad.items()}
            return result

    loop = bilevel.InnerLoop(steps=2000, lr=0.5)
    report = bilevel.check(problem, inner, outer, inner_batch=ib, outer_batch=ob,
                           solver=NoAlpha(linsolve=bilevel.Neumann(alpha=0.3, terms=100), warm_start=False), reference="cg", loop=loop, verbose=False)
    assert report.fd_rel_error > 1.0 and report.ref_rel_error > 1.0
    good = bilevel.check(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="neumann:alpha=0.3,terms=100",
                         reference="cg", loop=loop, verbose=False)
    assert good.fd_rel_error < 1e-5 and good.ref_rel_error < 1e-5
