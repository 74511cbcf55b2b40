"""The ITL job's inner step against its hand-written limit, and where an outer step's time goes.

The ITL job (``bilevel run itl``, the README's main job until ARL replaced it) trains a 784-256-10 MLP on
28×28 images with the learned Taylor loss, batch 32,
plain SGD. This times ``bilevel.InnerLoop.run`` on the autograd tape against a hand-written ``torch.autograd.grad``
SGD loop of the same maths (alternating, medians of 7 rounds of 200 steps, one thread), and one Hessian-vector
product on a 4,165-image Hessian batch (the main job's five training domains), to show which part of an outer
step is library overhead and which is arithmetic.

    python benchmarks/main_job_step.py
"""
import statistics
import time

import torch

import bilevel
from bilevel.problems import itl
from bilevel.problems.losses.taylor import TaylorSpec, initial_theta

torch.set_num_threads(1)
STEPS, ROUNDS, HESSIAN_BATCH = 200, 7, 4165


def setup():
    cfg = itl.Config()
    spec = TaylorSpec(cfg.parameterisation, cfg.order)
    model = itl.make_model("mlp", (1, 28, 28), cfg.hidden, 10)
    theta = itl.fresh_params(model, 0)
    outer = {"omega": initial_theta(spec, cfg.init, scale=10.0)}
    problem = itl.itl_problem(model, spec, l2=cfg.l2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(HESSIAN_BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (HESSIAN_BATCH,), generator=g)
    index = [torch.randint(0, HESSIAN_BATCH, (cfg.inner_batch,), generator=g) for _ in range(STEPS)]
    return cfg, problem, theta, outer, (x, y), lambda k: (x[index[k]], y[index[k]])


def main() -> None:
    cfg, problem, theta, outer, full, batches = setup()
    loop = bilevel.InnerLoop(steps=STEPS, lr=cfg.inner_lr)

    def ours():
        loop.run(problem, theta, outer, batches, path="autograd", create_graph=False)

    def hand_written():
        params = {k: v.clone() for k, v in theta.items()}
        for k in range(STEPS):
            leaves = {name: v.requires_grad_(True) for name, v in params.items()}
            grads = torch.autograd.grad(problem.inner(leaves, outer, batches(k)), list(leaves.values()))
            with torch.no_grad():
                params = {name: v - cfg.inner_lr * g for (name, v), g in zip(leaves.items(), grads)}

    hessian = bilevel.autodiff.TapeHessian(lambda t, p: problem.inner(t, p, full), theta, outer)
    v = {k: torch.randn_like(t) for k, t in theta.items()}

    def hvp():
        hessian(v)

    times = {"ours": [], "hand-written": [], "hvp": []}
    for fn in (ours, hand_written, hvp):
        fn()  # warm-up
    for _ in range(ROUNDS):
        for name, fn in (("ours", ours), ("hand-written", hand_written)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / STEPS * 1e3)
        start = time.perf_counter()
        hvp()
        times["hvp"].append((time.perf_counter() - start) * 1e3)
    ratio = statistics.median(a / b for a, b in zip(times["ours"], times["hand-written"]))
    print(f"inner step (MLP 784-256-10, batch {cfg.inner_batch}, Taylor loss, SGD): "
          f"bilevel {statistics.median(times['ours']):.3f} ms | hand-written autograd "
          f"{statistics.median(times['hand-written']):.3f} ms | ratio {ratio:.3f}")
    print(f"one HVP on the {HESSIAN_BATCH}-image Hessian batch: {statistics.median(times['hvp']):.1f} ms "
          f"(= {statistics.median(times['hvp']) / statistics.median(times['hand-written']):.0f} inner steps)")


if __name__ == "__main__":
    main()
