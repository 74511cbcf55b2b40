"""Inputs of mixed dtypes or devices are refused before any work, with the tensor, both sides and the fix named.

Without the check, a float32 batch silently rounds float64 params' losses to 7 digits (and a float64 batch
silently promotes float32 params' gradients), and a tensor on another device fails deep inside a solver.
"""
import pytest
import torch
from torch.func import vmap

import bilevel
from oracles import rel_error, ridge, ridge_hypergrad

LOOP = bilevel.InnerLoop(steps=5, lr=0.5)


class Counting:
    """The ridge oracle with losses that count their calls: a refused call must evaluate neither."""

    def __init__(self):
        self.calls = 0
        problem, self.inner, self.outer, self.ib, self.ob = ridge(d=3, n=40, m=20)

        def counted(loss):
            def wrapper(i, o, b):
                self.calls += 1
                return loss(i, o, b)
            return wrapper

        self.problem = bilevel.BilevelProblem(counted(problem.inner_loss), counted(problem.outer_loss))

    def call(self, **overrides):
        args = dict(inner=self.inner, outer=self.outer, inner_batch=self.ib, outer_batch=self.ob, solver="cg",
                    loop=LOOP)
        args.update(overrides)
        return bilevel.hypergrad(self.problem, args.pop("inner"), args.pop("outer"), **args)


def refused(counting, match, **overrides):
    with pytest.raises(bilevel.StructureError, match=match):
        counting.call(**overrides)
    assert counting.calls == 0


def test_float32_outer_with_float64_inner_names_both_and_the_cast():
    c = Counting()
    outer32 = bilevel.tree.cast(c.outer, torch.float32)
    refused(c, r"inner\['w'\] has dtype torch.float64 but outer\['log_lambda'\] has dtype torch.float32.*"
               r"share one dtype.*Fix: cast the params with bilevel.tree.cast\(inner, torch.float32\) "
               r"\(or cast everything to torch.float64 instead\)", outer=outer32)


def test_float32_batch_with_float64_params_names_the_leaf_path_and_the_cast():
    c = Counting()
    X, y = c.ib
    refused(c, r"inner_batch\[0\] has dtype torch.float32 but outer\['log_lambda'\] has dtype torch.float64.*"
               r"Fix: cast that batch tensor with .to\(torch.float64\)", inner_batch=(X.float(), y))
    Xv, yv = c.ob
    refused(c, r"outer_batch\['target'\] has dtype torch.float32 but outer\['log_lambda'\] has dtype torch.float64",
            outer_batch={"x": Xv, "target": yv.float()})


def test_callable_inner_batch_is_checked_at_step_0():
    c = Counting()
    X, y = c.ib
    refused(c, r"inner_batch\(0\)\[1\] has dtype torch.float16 but outer\['log_lambda'\] has dtype torch.float64",
            inner_batch=lambda step: (X, y.half()))


def test_other_device_names_both_devices_and_the_move():
    c = Counting()
    X, y = c.ib  # the meta device stands in for a GPU: same check, no GPU needed
    refused(c, r"inner_batch\[0\] is on device meta but outer\['log_lambda'\] is on device cpu.*one device.*"
               r"Fix: move that batch tensor with .to\('cpu'\)", inner_batch=(X.to("meta"), y))
    refused(c, r"inner\['w'\] is on device meta but outer\['log_lambda'\] is on device cpu.*"
               r"Fix: move the params with \{k: v.to\('cpu'\) for k, v in inner.items\(\)\}",
            inner={"w": c.inner["w"].to("meta")})


def test_refused_without_validation_and_under_vmap_too():
    c = Counting()
    X, y = c.ib
    refused(c, "inner_batch\\[0\\] has dtype torch.float32", inner_batch=(X.float(), y), validate=False)
    phis = c.outer["log_lambda"].float() + torch.zeros(2, 1)
    with pytest.raises(bilevel.StructureError, match=r"inner\['w'\] has dtype torch.float64 but outer\['log_lambda'\] "
                                                     r"has dtype torch.float32"):
        vmap(lambda p: c.call(outer={"log_lambda": p}).hypergrad["log_lambda"])(phis)
    assert c.calls == 0


def test_integer_labels_are_fine_and_change_nothing():
    problem, inner, outer, (X, y), ob = ridge(d=3, n=40, m=20)
    labels = torch.arange(40)  # an integer leaf (e.g. class labels or indices) next to float64 data

    def inner_loss(i, o, b):
        return problem.inner_loss(i, o, (b["x"][b["index"]], b["y"]))

    with_labels = bilevel.BilevelProblem(inner_loss, problem.outer_loss)
    loop = bilevel.InnerLoop(steps=300, lr=0.5)
    result = bilevel.hypergrad(with_labels, inner, outer, inner_batch={"x": X, "y": y, "index": labels},
                               outer_batch=ob, solver="cg:maxiter=30,rtol=1e-12", loop=loop)
    assert rel_error(result.hypergrad, ridge_hypergrad(outer, (X, y), ob)) < 1e-8


def test_float32_everywhere_is_fine():
    problem, inner, outer, ib, ob = ridge(d=3, n=40, m=20, dtype=torch.float32)
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="cg:maxiter=30",
                               loop=bilevel.InnerLoop(steps=300, lr=0.5))
    exact = ridge_hypergrad(bilevel.tree.cast(outer, torch.float64), tuple(t.double() for t in ib),
                            tuple(t.double() for t in ob))
    assert result.hypergrad["log_lambda"].dtype == torch.float32
    assert rel_error(bilevel.tree.cast(result.hypergrad, torch.float64), exact) < 1e-4  # float32 rounding


def test_check_casts_mixed_inputs_to_float64_itself():
    """bilevel.check runs everything in float64, so mixed inputs are fine there (and its verdict is right)."""
    problem, inner, outer, (X, y), ob = ridge(d=3, n=40, m=20)
    report = bilevel.check(problem, inner, bilevel.tree.cast(outer, torch.float32), inner_batch=(X.float(), y),
                           outer_batch=ob, solver="unroll", reference=None, loop=LOOP, verbose=False)
    assert report.fd_rel_error < 1e-6
