"""Per-call costs behind the peer comparison: torch.func vs the autograd tape, torchopt vs plain updates.

One inner step on ridge (n = 200, d = 500, 1 thread): the gradient by ``torch.func.grad_and_value`` (what our
inner loop uses) and by ``torch.autograd.grad`` (what higher / torchopt's ``custom_root`` loops use), and the
update by torchopt's functional SGD (``inplace=False``) and by plain tensor arithmetic. Prints microseconds per
call and the ratios side by side.

    python benchmarks/overhead.py
"""
import time

import torch
import torchopt
from torch.func import grad_and_value

torch.set_num_threads(1)
torch.manual_seed(0)
n, d = 200, 500
X, y, lam = torch.randn(n, d), torch.randn(n), torch.rand(d)
params = {"w": torch.zeros(d)}


def loss(p):
    return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * (lam * p["w"] ** 2).sum()


def per_call_us(fn, calls: int = 500) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def autograd_grad():
    w = params["w"].detach().requires_grad_(True)
    return torch.autograd.grad(loss({"w": w}), w)


func_grad = grad_and_value(loss)
sgd = torchopt.sgd(0.1)
state = sgd.init(params)
g, _ = func_grad(params)


def torchopt_update():
    updates, _ = sgd.update(g, state, params=params, inplace=False)
    return torchopt.apply_updates(params, updates, inplace=False)


rows = [("gradient", "torch.func.grad_and_value", per_call_us(lambda: func_grad(params)),
         "torch.autograd.grad", per_call_us(autograd_grad)),
        ("update", "torchopt sgd (inplace=False)", per_call_us(torchopt_update),
         "plain w - lr * g", per_call_us(lambda: {k: v - 0.1 * g[k] for k, v in params.items()}))]
print(f"{'':10s} {'ours':32s} {'µs':>8s}   {'alternative':28s} {'µs':>8s}   ratio")
for what, a, ta, b, tb in rows:
    print(f"{what:10s} {a:32s} {ta:8.1f}   {b:28s} {tb:8.1f}   {ta / tb:5.2f}x")
