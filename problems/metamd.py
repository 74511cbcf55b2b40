"""MetaMD: meta-learned mirror descent (registered as ``metamd``).

Gao, Gouk, Lee, Hospedales, "Meta Mirror Descent: Optimiser Learning for Fast Convergence", ICLR 2022
GroundedML workshop (and B. Gao's PhD thesis, Edinburgh 2023, chapter 5). Outer params φ define the
quadratic mirror map φ(θ) = ½θᵀMθ of the inner optimiser (see :mod:`problems.mirror_descent`):

    inner  θ_{t+1} = θ_t − η M⁻¹∇L_i(θ_t),  t = 1..T, from a fresh θ_1 per task   (eq. 5.4–5.5, C.11)
    outer  E(φ) = (1/n) Σ_i B_φ(θ_T⁽ⁱ⁾‖θ_1⁽ⁱ⁾) + k/λ_min(M) + γ‖M − I‖_F²          (eq. 5.7, Sec. 5.5)

No validation data: E is the convergence-rate bound of Prop. 1. Two task families:

* ``family="quadratic"``: 2-D tasks θᵀQθ − bᵀθ, Q = CCᵀ, C lower-triangular, b ~ N([1,1], I), diagonal
  M = diag(eˢ) (Sec. 5.6.1). The C distribution is not stated in the thesis; ours is the digest's (E.5),
  and ``QUADRATIC_STIFF`` is a stiffer family standing in for Fig. 5.2's unnamed "other family". A meta-
  batch of n tasks is one inner problem with θ of shape (n, 2) (the tasks are independent).
* ``family="digits"`` / ``"mnist"``: leave-one-rotation-out on rotated sklearn digits (8×8) or Rotated
  MNIST (28×28), a 3-layer MLP, Kronecker-factored M (Sec. 5.4.3, 5.6.2). Each outer step trains one fresh
  MLP per training rotation (one sub-problem each) and averages their meta-gradients.

What ``build`` declares depends on ``Config.metagrad``:

* ``"solver"``: a :class:`bilevel.Nested` on :func:`~problems.mirror_descent.displacement_problem` (MD
  written as gradient descent on u = M^{1/2}(θ − θ_1) from u = 0, G(u, φ) = L(θ_1 + M^{-1/2}u),
  F(u, φ) = ½‖u‖²/n + k/λ_min(M) + γ‖M − I‖²). The sub-problems of an outer step are the quadratic
  family's one meta-batch (key ``"0"``) or one fresh MLP per training rotation (key = the rotation), with
  (θ_1, data) in the batch, drawn from (seed, step, rotation). The outer loop solves them (split across
  processes), averages their meta-gradients, clips the mean's norm to ``Config.clip`` and replaces a
  non-finite mean by zero (``outer_grad_norm``, ``clipped``, ``skipped`` in the log; they were
  ``metagrad_norm`` and ``diverged`` before the one outer loop). Solvers: ``unroll`` (default) and
  ``forward`` (the exact derivative of the T-step loop), ``cmaes``, and on the quadratic family only the
  implicit ones (``cg``, ``exact`` ...: the strongly convex tasks make the u-Hessian M^{-1/2}·2Q·M^{-1/2}
  invertible; they give the converged, T → ∞, meta-gradient, so they match ``unroll`` only once
  ``inner_steps`` lets the tasks converge). Not the implicit solvers on the MLP families (the u-Hessian
  of an over-parameterised MLP is singular or indefinite, and T = 100 steps are far from a stationary
  point), and not ``onestep`` (an online, warm-started one-step quantity: MetaMD retrains from a fresh
  θ_1 each step).
* ``"fmd"`` (quadratic family only: App. C.2's closed-form forward mode, equal to ``forward``),
  ``"envelope"`` (the corrected implicit formula) or ``"eq528"`` (the thesis's printed eq. 5.28,
  documented to be wrong; see docs/metamd.md): the meta-gradient is computed in closed form, so ``build``
  returns a :class:`bilevel.SingleLevel` with ``gradient=`` (the mean over the step's items; same
  clipping and non-finite rule), and asking it for ``--solver`` is an error.

Explicit choices: φ₀ is M = I for the diagonal map and a, b ~ N(0, init_scale²/dim) for the Kronecker
map (a = b = 0 is stationary); quadratic tasks of step t are drawn from seed·100003 + t, the MLP's θ_1
for rotation i from seed·100003 + 101·t + i; Adam on φ; the meta-gradient's norm is clipped (ours).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch.func import functional_call

import bilevel
from bilevel import RunContext
from . import mirror_descent as md

FAMILIES = ("quadratic", "digits", "mnist")
METAGRADS = ("solver", "fmd", "envelope", "eq528")


@dataclass(frozen=True)
class Config:
    family: str = "quadratic"           # Sec. 5.6.1 (quadratic) or 5.6.2 (rotated digits / MNIST)
    metagrad: str = "solver"            # "solver" (the run's --solver), "fmd" (App. C.2, quadratic only),
                                        # "envelope" or "eq528" (Sec. 5.4.4): closed forms, no --solver
    inner_steps: int = 500              # T; "to convergence" in the thesis, T=500 in its DiverseDigits runs
    inner_lr: float = 0.02              # base step η (not stated; digest E.5)
    k: float = 0.01                     # weight of k/λ in eq. 5.7 (not stated; digest E.5)
    reg: float = 0.0                    # γ on ‖M − I‖_F² (Sec. 5.5; weight not stated)
    outer_lr: float = 0.05              # meta learning rate ρ (not stated), Adam
    tasks_per_step: int = 8             # n in Alg. 9 (not stated); quadratic family
    c_mean: tuple = (3.0, 0.0, 0.3)     # means of (C00, C10, C11) (not stated; digest E.5)
    c_std: tuple = (0.1, 0.1, 0.05)
    angles: tuple = (0, 15, 30, 45, 60, 75)   # Sec. 5.6.2
    holdout: str = "0"                  # the held-out rotation (leave-one-domain-out)
    hidden: int = 64                    # MLP width (not stated in the thesis)
    init_scale: float = 0.0             # φ init: s = 0 (M = I); Kronecker maps need > 0 (a = b = 0 is stationary)
    test_fraction: float = 0.3          # per-domain held-out test split
    per_domain: Optional[int] = None    # Rotated MNIST images per domain (None: all ~833)
    clip: float = 10.0                  # meta-gradient norm clip (ours; the outer loop's clip_norm, applied to
                                        # the mean over sub-problems): past the stability edge of η/M the
                                        # unrolled E explodes, one such gradient would freeze Adam's step;
                                        # a non-finite meta-gradient (overflow) is replaced by zero
    eval_tasks: int = 20                # quadratic family: number of held-out tasks in evaluate()
    threshold: float = 1e-4             # gradient-norm threshold for iterations-to-convergence (not stated)
    max_iters: int = 100_000
    data_seed: int = 0
    cache_dir: Optional[str] = None


SMOKE = Config(inner_steps=20, tasks_per_step=3, eval_tasks=4, max_iters=2000)
QUADRATIC_STIFF = Config(c_mean=(3.0, 0.0, 0.06), c_std=(0.1, 0.1, 0.01), inner_steps=2000)
DIGITS = Config(family="digits", inner_steps=100, inner_lr=0.1, k=0.0, reg=1e-3, outer_lr=0.02, init_scale=0.5)
SMOKE_DIGITS = dataclasses.replace(DIGITS, inner_steps=5, hidden=8, angles=(0, 45, 90))
DEFAULT_SOLVER = "unroll"


# ---------------------------------------------------------------- quadratic tasks (Sec. 5.6.1)
def sample_quadratics(cfg: Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n tasks: Q = CCᵀ (n, 2, 2) with C lower-triangular, b ~ N([1,1], I) (n, 2), float64."""
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(cfg.c_mean, dtype=torch.float64), torch.tensor(cfg.c_std, dtype=torch.float64)
    c = mean + std * torch.randn(n, 3, generator=g, dtype=torch.float64)
    cmat = torch.zeros(n, 2, 2, dtype=torch.float64)
    cmat[:, 0, 0], cmat[:, 1, 0], cmat[:, 1, 1] = c[:, 0], c[:, 1], c[:, 2]
    return cmat @ cmat.transpose(1, 2), 1.0 + torch.randn(n, 2, generator=g, dtype=torch.float64)


def quadratic_loss(theta: dict, batch) -> torch.Tensor:
    """Σ_i θ_iᵀQ_iθ_i − b_iᵀθ_i over the stacked tasks (their gradients are independent)."""
    q, b = batch
    x = theta["x"]
    return (torch.einsum("ni,nij,nj->n", x, q, x) - (b * x).sum(-1)).sum()


def quadratic_fmd(cfg: Config, s: torch.Tensor, q: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact forward-mode dE/ds for M = diag(eˢ) on stacked quadratic tasks (App. C.2, eq. C.12–C.17).

    With m = eˢ, g_t = 2Qθ_t − b, θ_{t+1} = θ_t − η m⁻¹⊙g_t and Z_t = dθ_t/ds (n×2×2):

        Z_{t+1} = (I − 2η diag(m⁻¹) Q) Z_t + η diag(m⁻¹ ⊙ g_t)          (C.15, C.16 without its factor 2)
        dE/ds_j = (1/n) Σ_i [½ m_j d_ij² + (m ⊙ d_i)ᵀ Z_T,i e_j] + ∂_s(k/λ + γ‖M − I‖²),  d = θ_T − θ_1.

    The same number as the library's ``forward``/``unroll`` solvers (tested), without torch.func's per-op
    overhead: this is what makes hundreds of meta-steps of T = 500–5000 affordable on a CPU."""
    s = s.detach().double()
    m_inv = torch.exp(-s)
    n = b.shape[0]
    theta = torch.zeros_like(b)
    z = torch.zeros(n, 2, 2, dtype=torch.float64)
    a_mat = torch.eye(2, dtype=torch.float64) - 2 * cfg.inner_lr * m_inv[:, None] * q
    for _ in range(cfg.inner_steps):
        g = 2 * torch.einsum("nij,nj->ni", q, theta) - b
        z = a_mat @ z + torch.diag_embed(cfg.inner_lr * m_inv * g)
        theta = theta - cfg.inner_lr * m_inv * g
    m = torch.exp(s)
    grad_s = (0.5 * m * theta ** 2 + torch.einsum("ni,nij->nj", m * theta, z)).mean(0)
    value = float((0.5 * m * theta ** 2).sum(-1).mean())
    phi = {"x:s": s.clone().requires_grad_(True)}
    mmap = md.DiagonalMap({"x": torch.Size([2])})
    rest = (cfg.k / mmap.min_eigenvalue(phi) if cfg.k else 0.0) + cfg.reg * mmap.distance_to_identity_sq(phi)
    if isinstance(rest, torch.Tensor):
        grad_s = grad_s + torch.autograd.grad(rest, phi["x:s"])[0]
        value += float(rest.detach())
    return grad_s, value


def iterations_to_threshold(q, b, update, threshold: float, max_iters: int, configs: int = 0) -> torch.Tensor:
    """Per task (and per leading config dim), the first iteration with ‖2Qθ − b‖ < threshold from θ = 0.

    ``update(theta, grad, state, t) -> (theta, state)`` acts on θ of shape (..., n, 2); diverged or
    unconverged runs count ``max_iters``. With ``configs`` > 0, θ gets a leading dim of that size (one per
    hyperparameter setting, broadcast in ``update``), so a whole grid costs one loop."""
    theta = torch.zeros(((configs,) if configs else ()) + tuple(b.shape), dtype=torch.float64)
    done = torch.full(theta.shape[:-1], max_iters, dtype=torch.long)
    state = None
    for t in range(max_iters):
        g = 2 * torch.einsum("nij,...nj->...ni", q, theta) - b
        norm = g.norm(dim=-1)
        newly = (norm < threshold) & (done == max_iters)
        done = torch.where(newly, torch.full_like(done, t), done)
        if t % 64 == 0 and bool(((done < max_iters) | ~torch.isfinite(norm)).all()):
            break
        theta, state = update(theta, g, state, t)
    return done


# ---------------------------------------------------------------- rotated digits (Sec. 5.6.2)
def make_mlp(cfg: Config, in_features: int) -> torch.nn.Module:
    """The 3-layer MLP (widths not stated in the thesis)."""
    h = cfg.hidden
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, h), torch.nn.ReLU(),
                               torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 10))


def load_domains(cfg: Config) -> dict[str, tuple[torch.Tensor, ...]]:
    """{angle: (x_train, y_train, x_test, y_test)} from problems.data (offline; cached under cfg.cache_dir)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from . import data

    if cfg.family == "digits":
        ds = data.rotated_digits(angles=cfg.angles, seed=cfg.data_seed, cache_dir=cfg.cache_dir)
    else:
        ds = data.rotated_mnist(angles=cfg.angles, per_domain=cfg.per_domain, seed=cfg.data_seed,
                                cache_dir=cfg.cache_dir)
    out = {}
    for i, name in enumerate(data.domains_of(ds)):
        x, y = data.to_tensors(ds, domains=name)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.data_seed * 1000 + i))
        n_test = int(cfg.test_fraction * len(y))
        test, train = perm[:n_test], perm[n_test:]
        out[name] = (x[train], y[train], x[test], y[test])
    return out


def mlp_loss(model: torch.nn.Module):
    def loss(theta, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(functional_call(model, theta, (x,)), y)
    return loss


def init_params(model: torch.nn.Module, seed: int) -> dict:
    """A fresh θ_1 (PyTorch's default init) drawn from ``seed``: deterministic per (step, domain)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for layer in model.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class Family:
    """What a task family fixes for a whole run (a function of the Config alone).

    Attributes:
        loss: the inner loss L(θ; data).
        mmap: the mirror map M(φ).
        outer: φ₀.
        items: the sub-problem keys of an outer step: ``("0",)`` (the quadratic meta-batch) or the
            training rotations (every rotation but ``Config.holdout``), in the data's order.
        model: the MLP whose parameters θ are (digits / mnist); None for quadratics.
        domains: ``{rotation: (x_train, y_train, x_test, y_test)}`` (digits / mnist); empty for quadratics.
    """

    loss: Callable[[dict, Any], torch.Tensor]
    mmap: Union[md.DiagonalMap, md.KroneckerMap]
    outer: dict
    items: tuple[str, ...]
    model: Optional[torch.nn.Module] = None
    domains: Optional[dict] = None


def check_config(cfg: Config) -> None:
    """Reject unknown families / meta-gradients and settings that cannot run."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"metamd: unknown family {cfg.family!r}; choose one of {FAMILIES}")
    if cfg.metagrad not in METAGRADS:
        raise ValueError(f"metamd: unknown metagrad {cfg.metagrad!r}; choose one of {METAGRADS}")
    if cfg.inner_steps < 1 or not cfg.inner_lr > 0:
        raise ValueError("metamd: inner_steps must be >= 1 and inner_lr > 0")
    if cfg.metagrad == "fmd" and cfg.family != "quadratic":
        raise ValueError("metamd: metagrad='fmd' is the closed-form diagonal FMD of the quadratic family; "
                         "use metagrad='solver' with 'unroll' or 'forward' for the MLP families")


def family_of(cfg: Config) -> Family:
    """The loss, mirror map, φ₀ and sub-problem keys of ``cfg.family`` (loads the rotated data)."""
    check_config(cfg)
    if cfg.family == "quadratic":
        mmap = md.DiagonalMap({"x": torch.Size([2])})
        return Family(quadratic_loss, mmap, mmap.init(cfg.init_scale, seed=cfg.data_seed, dtype=torch.float64),
                      ("0",), None, {})
    domains = load_domains(cfg)
    if cfg.holdout not in domains:
        raise ValueError(f"metamd: holdout {cfg.holdout!r} is not a domain; domains: {list(domains)}")
    model = make_mlp(cfg, domains[cfg.holdout][0][0].numel())
    mmap = md.KroneckerMap({n: p.shape for n, p in model.named_parameters()})
    return Family(mlp_loss(model), mmap, mmap.init(cfg.init_scale, seed=cfg.data_seed),
                  tuple(d for d in domains if d != cfg.holdout), model, domains)


def instance(cfg: Config, fam: Family, seed: int, step: int, item: str) -> tuple[dict, Any]:
    """(θ_1, data) of one inner problem of outer step ``step``: the step's meta-batch of quadratics
    (θ_1 = 0), or a fresh MLP init on training rotation ``item``. A function of (seed, step, item) only."""
    if cfg.family == "quadratic":
        q, b = sample_quadratics(cfg, cfg.tasks_per_step, seed * 100_003 + step)
        return {"x": torch.zeros_like(b)}, (q, b)
    x, y = fam.domains[item][:2]
    return init_params(fam.model, seed * 100_003 + step * 101 + fam.items.index(item)), (x, y)


def map_metrics(mmap, outer: dict) -> dict[str, float]:
    """λ_min(M) and ‖M − I‖²_F at φ (logged every outer step)."""
    return {"min_eigenvalue": float(mmap.min_eigenvalue(outer)),
            "distance_to_identity_sq": float(mmap.distance_to_identity_sq(outer))}


def closed_form_metagrad(cfg: Config, fam: Family, outer: dict, theta1: dict, data: Any) -> tuple[dict, dict]:
    """dE/dφ of one inner problem by ``cfg.metagrad`` ∈ {fmd, envelope, eq528}; returns (gradient, metrics).

    ``fmd``: :func:`quadratic_fmd`. ``envelope`` / ``eq528``: T steps of MD, then the Bregman part by
    :func:`~problems.mirror_descent.metagrad_implicit` / ``metagrad_thesis_eq528`` plus the exact gradient
    of k/λ + γ‖M − I‖²; for stacked quadratics the Bregman sum is divided by n (eq. 5.7's mean)."""
    if cfg.metagrad == "fmd":
        g, value = quadratic_fmd(cfg, outer["x:s"], *data)
        return {"x:s": g.to(outer["x:s"])}, {"outer_loss": value}
    mmap = fam.mmap
    theta_t, losses = md.md_run(fam.loss, mmap, outer, theta1, data, cfg.inner_steps, cfg.inner_lr)
    scale = 1.0 / cfg.tasks_per_step if cfg.family == "quadratic" else 1.0
    fn = md.metagrad_implicit if cfg.metagrad == "envelope" else md.metagrad_thesis_eq528
    g_breg = fn(mmap, outer, theta_t, theta1)
    g_rest = torch.func.grad(lambda p: md.meta_objective(mmap, p, theta_t, theta1, cfg.k, cfg.reg)
                             - md.bregman(mmap, p, theta_t, theta1))(outer)
    value = scale * md.bregman(mmap, outer, theta_t, theta1)
    grads = {n: scale * g_breg[n] + g_rest[n] for n in outer}
    return grads, {"outer_loss": float(value), "inner_loss": float(losses[-1])}


def evaluate_map(cfg: Config, fam: Family, outer: dict, seed: int) -> dict[str, float]:
    """Quadratic: median iterations to ‖∇‖ < threshold on held-out tasks (MD and GD at the same η).
    Digits: held-out-rotation test accuracy after ``inner_steps`` of MD and of GD at the same η."""
    if cfg.family == "quadratic":
        q, b = sample_quadratics(cfg, cfg.eval_tasks, seed=10_000_019 + cfg.data_seed)
        m_inv = torch.exp(-outer["x:s"].double())
        out = {}
        for name, pre in (("metamd", m_inv), ("gd_same_lr", torch.ones(2, dtype=torch.float64))):
            iters = iterations_to_threshold(q, b, lambda th, g, s, t, p=pre: (th - cfg.inner_lr * p * g, s),
                                            cfg.threshold, cfg.max_iters)
            out[f"{name}_median_iterations"] = float(iters.double().median())
        return out
    x, y, xt, yt = fam.domains[cfg.holdout]
    theta1 = init_params(fam.model, 7_777 + seed)
    out = {}
    for name, phi in (("metamd", outer), ("gd_same_lr", fam.mmap.init(0.0))):
        theta, losses = md.md_run(fam.loss, fam.mmap, phi, theta1, (x, y), cfg.inner_steps, cfg.inner_lr)
        acc = (functional_call(fam.model, theta, (xt,)).argmax(-1) == yt).double().mean()
        out[f"{name}_test_accuracy"], out[f"{name}_final_train_loss"] = float(acc), float(losses[-1])
    return out


SOLVER_NOTE = ("MetaMD retrains a fresh θ_1 every outer step, so the online kind (onestep) does not apply; the "
               "implicit solvers give the converged meta-gradient and apply only to the strongly convex quadratic "
               "family (the MLP's u-Hessian is singular or indefinite and its T-step loop is far from converged)")


def build(cfg: Config, ctx: RunContext) -> Union[bilevel.Nested, bilevel.SingleLevel]:
    """``metagrad="solver"``: MetaMD as a nested problem; otherwise a closed-form meta-gradient (see above)."""
    fam = family_of(cfg)

    def draw(info: bilevel.StepInfo, item: str) -> tuple[dict, Any]:
        theta1, data = instance(cfg, fam, info.seed, info.step, item)
        return ({n: v.to(ctx.device) for n, v in theta1.items()},
                tuple(t.to(ctx.device) for t in data))

    def evaluate(outer: dict, inners: dict) -> dict[str, float]:
        return evaluate_map(cfg, fam, outer, ctx.seed)

    if cfg.metagrad != "solver":
        def gradient(outer: dict, info: bilevel.StepInfo) -> tuple[dict, dict]:
            """The mean over the step's items (every process computes all of them: a few, and cheap)."""
            results = [closed_form_metagrad(cfg, fam, outer, *draw(info, item)) for item in fam.items]
            grads = {n: torch.stack([r[0][n].to(outer[n]) for r in results]).mean(0) for n in outer}
            metrics = {key: sum(r[1][key] for r in results) / len(results) for key in results[0][1]}
            return grads, {**metrics, **map_metrics(fam.mmap, outer)}

        return bilevel.SingleLevel(params=fam.outer, gradient=gradient, optimizer="adam", lr=cfg.outer_lr,
                                   evaluate=evaluate, clip_norm=cfg.clip, skip_nonfinite=True,
                                   kind=f"MetaMD with the closed-form meta-gradient {cfg.metagrad!r}")

    n_tasks = cfg.tasks_per_step if cfg.family == "quadratic" else 1

    def subproblems(info: bilevel.StepInfo) -> list[bilevel.SubProblem]:
        subs = []
        for item in fam.items:
            theta1, data = draw(info, item)
            u0 = {n: torch.zeros_like(v) for n, v in theta1.items()}
            subs.append(bilevel.SubProblem(inner=u0, inner_batch=(theta1, data), outer_batch=(theta1, data),
                                           key=item))
        return subs

    return bilevel.Nested(
        problem=md.displacement_problem(fam.loss, fam.mmap, cfg.k, cfg.reg, n_tasks=n_tasks),
        outer=fam.outer,
        loop=bilevel.InnerLoop(steps=cfg.inner_steps, lr=cfg.inner_lr, optimizer="sgd"),
        subproblems=subproblems, default_solver=DEFAULT_SOLVER, optimizer="adam", lr=cfg.outer_lr,
        combine="mean",
        solvers=("unrolled", "implicit", "zeroth_order") if cfg.family == "quadratic" else ("unrolled", "zeroth_order"),
        solver_note=SOLVER_NOTE, evaluate=evaluate, metrics=lambda sub, result, outer: map_metrics(fam.mmap, outer),
        clip_norm=cfg.clip, skip_nonfinite=True)
