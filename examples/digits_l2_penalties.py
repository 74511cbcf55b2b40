"""Learn one L2 penalty per input pixel of a logistic regression on scikit-learn's digits.

    inner  G(W, φ) = cross-entropy(train) + ½ Σ_j exp(φ_j) ‖W[:, j]‖² + ½·10⁻³‖(W, b)‖²   (64 penalties)
    outer  F(W)    = cross-entropy(validation)

First the same hypergradient is computed with every registered solver and compared (relative error and
cosine against the dense exact IFT solve, time per call). Then φ is trained for a few outer steps with
the solver named on the command line, and the validation loss and test accuracy are printed.

    python examples/digits_l2_penalties.py [--solver cg] [--outer-steps 30]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import bilevel

torch.set_num_threads(1)
torch.manual_seed(0)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--solver", default="cg:maxiter=100,rtol=1e-4", help="solver spec used for the outer loop")
parser.add_argument("--outer-steps", type=int, default=30)
parser.add_argument("--outer-lr", type=float, default=0.5)
args = parser.parse_args()

# --- data: 1,797 real 8x8 digits, split 50/25/25, pixels scaled to [0, 1] -------------------------
digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(y))
train, val, test = perm[:900], perm[900:1350], perm[1350:]
train_batch, val_batch, test_batch = (X[train], y[train]), (X[val], y[val]), (X[test], y[test])


# --- the problem: two pure functions of (inner, outer, batch) ---------------------------------------
def inner_loss(inner, outer, batch):
    x, labels = batch
    logits = x @ inner["W"].T + inner["b"]
    penalty = 0.5 * (torch.exp(outer["log_penalty"]) * (inner["W"] ** 2).sum(0)).sum()
    # A small fixed ridge on every weight keeps the inner problem strongly convex: without it the softmax
    # is invariant to shifting all class scores, H is singular, and no implicit solver is well posed.
    base = 0.5e-3 * ((inner["W"] ** 2).sum() + (inner["b"] ** 2).sum())
    return F.cross_entropy(logits, labels) + penalty + base


def outer_loss(inner, outer, batch):
    x, labels = batch
    return F.cross_entropy(x @ inner["W"].T + inner["b"], labels)


problem = bilevel.BilevelProblem(inner_loss, outer_loss)
inner0 = {"W": torch.zeros(10, 64), "b": torch.zeros(10)}
outer = {"log_penalty": torch.full((64,), -4.0)}
loop = bilevel.InnerLoop(steps=300, lr=0.2, optimizer="momentum", momentum=0.9)

# --- 1. every solver on the same hypergradient --------------------------------------------------------
specs = {"exact": "exact", "cg": "cg:maxiter=200,rtol=1e-8", "neumann": "neumann:alpha=1.0,terms=200",
         "fixedpoint": "fixedpoint:alpha=1.0,maxiter=1000,rtol=1e-3", "unroll": "unroll",
         "unroll (checkpointed)": "unroll:checkpoint=true", "unroll (last 20 steps)": "unroll:truncate=20",
         "forward": "forward:chunk_size=64", "onestep": "onestep", "cmaes": "cmaes:popsize=8,sigma=0.3"}
reference, trained = None, None
print(f"{'solver':24s} {'time (s)':>9s} {'rel. error':>11s} {'cosine':>8s}   vs dense exact IFT")
for name, spec in specs.items():
    # onestep is an online method: it looks one step ahead of the model being trained, so start it from
    # the trained weights (from zero weights its hypergradient is exactly zero: dW'/dφ ∝ W).
    start_inner = trained if name == "onestep" else inner0
    start = time.perf_counter()
    result = bilevel.hypergrad(problem, start_inner, outer, inner_batch=train_batch, outer_batch=val_batch,
                               solver=spec, loop=loop)
    seconds = time.perf_counter() - start
    g = result.hypergrad["log_penalty"]
    if reference is None:
        reference, trained = g, result.inner
    rel = float((g - reference).norm() / reference.norm())
    cos = float(g @ reference / (g.norm() * reference.norm()))
    print(f"{name:24s} {seconds:9.3f} {rel:11.2e} {cos:8.4f}")
print("(unroll/forward differentiate the 300-step loop, so they differ from IFT by the loop's "
      "non-convergence; onestep and cmaes estimate a direction only: their scale is not a hypergradient's.)\n")

# --- 2. train the penalties with one solver, through the library's outer loop ----------------------------
# The declaration says what the problem is; the loop keeps the warm starts (the inner weights and the
# solver's state continue from the previous outer step) and steps Adam on φ.
def report(outer_params, inners):
    inner = inners["0"]
    logits = test_batch[0] @ inner["W"].T + inner["b"]
    return {"validation_loss": float(outer_loss(inner, outer_params, val_batch)),
            "test_accuracy": float((logits.argmax(1) == test_batch[1]).float().mean()),
            "mean_log_penalty": float(outer_params["log_penalty"].mean())}


declaration = bilevel.Nested(
    problem=problem, outer=outer, loop=loop, default_solver=args.solver, optimizer="adam", lr=args.outer_lr,
    subproblems=lambda info: [bilevel.SubProblem(inner=inner0, inner_batch=train_batch, outer_batch=val_batch)],
    warm_start=True, evaluate=report)
outer_loop = bilevel.OuterLoop(declaration, args.solver, bilevel.local_context())
for done in range(0, args.outer_steps + 1, 10):
    outer_loop.run(done)
    if done:
        values = outer_loop.evaluate()
        print(f"outer step {done:3d}: validation loss {values['validation_loss']:.4f}  "
              f"test accuracy {values['test_accuracy']:.3f}  mean log-penalty {values['mean_log_penalty']:+.2f}")
