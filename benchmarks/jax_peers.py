"""The JAX/jaxopt peers of benchmarks/peers.py: jitted JAX on the same problems, in a separate interpreter.

JAX is not a dependency of the project; it runs in its own virtual environment, driven as a subprocess:

    python3 -m venv /work/jaxenv && /work/jaxenv/bin/pip install jax jaxlib jaxopt numpy
    python benchmarks/peers.py --jax-python /work/jaxenv/bin/python ...

This file is both sides. Imported by peers.py (torch side, numpy only here): :func:`run_jax` writes a problem
(data, initial params, settings; ``peer_problems.export_npz``) to a ``.npz``, runs this file under the JAX
interpreter and reads back one JSON line. Run as a script (JAX side, no torch): it rebuilds the same losses in
jax.numpy (``kind``: ridge, mlp, cnn, hyperclean; the twins of benchmarks/peer_problems.py), and for each method

- ``jaxopt custom_root + solve_cg``: the inner loop (``lax.scan`` of (heavy-ball) GD steps) decorated with
  ``jaxopt.implicit_diff.custom_root(∇θG, solve=solve_cg(maxiter=cg_iters, tol=0, ridge=δ))``, then ``jax.grad``
  of F through it: K steps, then exactly ``cg_iters`` CG iterations on (H + δI) (tol 0 disables early stopping);
- ``jax.grad through lax.scan``: reverse mode through the scanned loop (the unrolled hypergradient),

compiles ``jax.jit(jax.grad(...))`` ahead of time (``.lower(φ).compile()``), calls it once, then times
``repeats`` calls with ``block_until_ready`` and measures the peak RSS increase of one call (VmHWM reset via
``/proc/self/clear_refs``, as benchmarks/common.py does). float32, one core: the driver sets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` and pins the process with
``taskset`` when asked. The data are compile-time constants of the jitted function (closures), as a user's
``jax.jit`` of a function closing over its dataset would make them.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {"custom_root": "jaxopt custom_root + solve_cg", "scan": "jax.grad through lax.scan"}
"""Method keys of this script and their row labels in the peer tables."""

XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# --------------------------------------------------------------------------------------------------
# torch side: the driver
# --------------------------------------------------------------------------------------------------
def jax_unavailable(python: str | None) -> str | None:
    """Why the JAX rows cannot run with interpreter ``python`` (None when they can)."""
    if not python:
        return "no JAX interpreter given (--jax-python PATH; see the docstring of benchmarks/jax_peers.py)"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"JAX interpreter {python!r} not found or not executable"
    try:
        proc = subprocess.run([python, "-c", "import jax, jaxopt"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"JAX interpreter {python!r} failed to start: {err}"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"JAX interpreter {python!r} cannot import jax and jaxopt: {tail}"
    return None


def run_jax(python: str, problem, settings: dict, methods: list[str], repeats: int, cpu: int | None = None,
            timeout: float = 3600, x64: bool = False) -> dict:
    """Run ``methods`` (keys of :data:`METHODS`) of ``problem`` under the JAX interpreter.

    The arrays keep the problem's dtype; JAX computes in float32 unless ``x64`` (``JAX_ENABLE_X64``, for tests
    of a float64 problem against float64 references).

    Returns ``{"versions": ..., "methods": {key: {"times": [...], "median": s, "compile": s, "mem": MiB,
    "value": {name: ndarray}} or {"error": text}}}``, or ``{"error": text}`` when the subprocess failed.
    """
    import peer_problems
    folder = tempfile.mkdtemp(prefix="jax_peers_")
    try:
        path = os.path.join(folder, "problem.npz")
        peer_problems.export_npz(problem, path, {"methods": methods, "repeats": repeats, **settings})
        env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3", JAX_ENABLE_X64="1" if x64 else "0")
        env.pop("PYTHONPATH", None)
        cmd = [python, os.path.abspath(__file__), path]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"JAX subprocess timed out after {timeout:.0f} s"}
        for line in reversed(proc.stdout.strip().splitlines()):
            if line.startswith("{"):
                out = json.loads(line)
                names = list(problem.outer)
                for rec in out.get("methods", {}).values():
                    if "value" in rec:
                        rec["value"] = {k: np.asarray(rec["value"][k], dtype=np.float64) for k in names}
                return out
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"JAX subprocess failed (exit {proc.returncode}): {tail[:300]}"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# JAX side
# --------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:  # common._status_kib's twin: this side runs where torch (common) is absent
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak_rss_increase_mib(fn) -> float:
    import gc
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return float("nan")
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0.0, (peak - base) / 1024.0)


def _losses(kind: str, meta: dict, data: dict):
    """(inner_loss(θ, φ), outer_loss(θ, φ)) in jax.numpy, the twins of benchmarks/peer_problems.py."""
    import jax
    import jax.numpy as jnp

    X, y = jnp.asarray(data["inner_batch/0"]), jnp.asarray(data["inner_batch/1"])
    Xv, yv = jnp.asarray(data["outer_batch/0"]), jnp.asarray(data["outer_batch/1"])

    def ce(logits, labels, reduce=True):
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None].astype(jnp.int32), axis=1)[:, 0]
        return -picked.mean() if reduce else -picked

    if kind == "ridge":
        index = jnp.asarray(data["group_index"]) if "group_index" in data else None

        def inner(th, ph):
            r = X @ th["w"] - y
            lam = jnp.exp(ph["log_lambda"])
            lam = lam[index] if index is not None else lam
            return 0.5 * jnp.mean(r * r) + 0.5 * jnp.sum(lam * th["w"] ** 2)

        def outer(th, ph):
            r = Xv @ th["w"] - yv
            return 0.5 * jnp.mean(r * r)
        return inner, outer

    if kind == "mlp":
        def net(th, x):
            return jnp.tanh(x @ th["W1"].T + th["b1"]) @ th["W2"].T + th["b2"]

        def inner(th, ph):
            penalty = 0.5 * jnp.sum(jnp.exp(ph["log_penalty"]) * jnp.sum(th["W1"] ** 2, axis=0))
            base = 0.5e-2 * sum(jnp.sum(v ** 2) for v in th.values())
            return ce(net(th, X), y) + penalty + base
        return inner, lambda th, ph: ce(net(th, Xv), yv)

    if kind == "cnn":
        C = int(meta["channels"])

        def net(th, x):
            h = jax.lax.conv_general_dilated(x, th["K"], window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
            h = jnp.tanh(h + th["c"][None, :, None, None])
            h = h.reshape(x.shape[0], C, 4, 2, 4, 2).mean(axis=(3, 5))
            return h.reshape(x.shape[0], 16 * C) @ th["W"].T + th["b"]

        def inner(th, ph):
            phi = ph["log_penalty"]
            conv = jnp.sum(jnp.exp(phi[:C]) * jnp.sum(th["K"] ** 2, axis=(1, 2, 3)))
            lin = jnp.sum(jnp.exp(phi[C:]) * jnp.sum(th["W"].reshape(10, C, 16) ** 2, axis=(0, 2)))
            base = 0.5e-2 * sum(jnp.sum(v ** 2) for v in th.values())
            return ce(net(th, X), y) + 0.5 * (conv + lin) + base
        return inner, lambda th, ph: ce(net(th, Xv), yv)

    if kind == "hyperclean":
        def logits(th, x):
            return x @ th["W"].T + th["b"]

        def inner(th, ph):
            weighted = jnp.mean(jax.nn.sigmoid(ph["logit_weight"]) * ce(logits(th, X), y, reduce=False))
            return weighted + 0.5e-3 * (jnp.sum(th["W"] ** 2) + jnp.sum(th["b"] ** 2))
        return inner, lambda th, ph: ce(logits(th, Xv), yv)

    raise ValueError(f"unknown problem kind {kind!r}")


def _hypergradients(meta: dict, data: dict) -> dict:
    """key -> a function φ ↦ dF/dφ (not yet jitted), for every key of :data:`METHODS`."""
    import jax
    import jax.numpy as jnp
    from jaxopt import implicit_diff, linear_solve

    inner, outer = _losses(meta["kind"], meta, data)
    theta0 = {k: jnp.asarray(data[f"inner/{k}"]) for k in meta["inner_names"]}
    lr, mu, steps = float(meta["lr"]), float(meta["momentum"]), int(meta["steps"])
    grad_inner = jax.grad(inner)

    def loop(theta, phi):
        def step(carry, _):
            th, v = carry
            g = grad_inner(th, phi)
            if mu:
                v = jax.tree_util.tree_map(lambda a, b: mu * a + b, v, g)
                th = jax.tree_util.tree_map(lambda a, b: a - lr * b, th, v)
            else:
                th = jax.tree_util.tree_map(lambda a, b: a - lr * b, th, g)
            return (th, v), None

        (th, _), _ = jax.lax.scan(step, (theta, jax.tree_util.tree_map(jnp.zeros_like, theta)), None, length=steps)
        return th

    damping = float(meta.get("damping") or 0.0)

    def solve(matvec, b):
        return linear_solve.solve_cg(matvec, b, ridge=damping or None, maxiter=int(meta["cg_iters"]), tol=0.0)

    root = implicit_diff.custom_root(grad_inner, solve=solve)(loop)
    return {"custom_root": jax.grad(lambda phi: outer(root(theta0, phi), phi)),
            "scan": jax.grad(lambda phi: outer(loop(theta0, phi), phi))}


def _main(path: str) -> None:
    import importlib.metadata as md

    import jax
    data = dict(np.load(path, allow_pickle=False))
    meta = json.loads(str(data.pop("meta")))
    phi = {k: jax.numpy.asarray(data[f"outer/{k}"]) for k in meta["outer_names"]}
    fns = _hypergradients(meta, data)
    out = {"versions": {"jax": jax.__version__, "jaxlib": md.version("jaxlib"), "jaxopt": md.version("jaxopt")},
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "methods": {}}
    for key in meta["methods"]:
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(fns[key]).lower(phi).compile()
            compile_s = time.perf_counter() - t0
            call = lambda: jax.block_until_ready(compiled(phi))  # noqa: E731
            value = call()  # warm-up
            times = []
            for _ in range(max(1, int(meta["repeats"]))):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            out["methods"][key] = {"times": times, "median": statistics.median(times), "compile": compile_s,
                                   "mem": _peak_rss_increase_mib(call),
                                   "value": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in value.items()}}
        except Exception as err:  # reported in the table, never raised
            out["methods"][key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    print(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1])
