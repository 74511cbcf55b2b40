"""ITL: a Taylor-polynomial loss meta-learned for domain generalisation by implicit gradient.

Gao, Gouk, Yang, Hospedales, "Loss Function Learning for Domain Generalization by Implicit Gradient",
ICML 2022 (PMLR 162). The outer params are the 12 coefficients ω of the loss L_ω (eq. 10, see
:mod:`problems.losses.taylor`); the inner params are the weights θ of a network trained with L_ω:

    inner  G(θ, ω) = mean over the source domains D_s of L_ω(f_θ(x), y)          (eq. 3, ERM, eq. 1)
    outer  F(θ)    = cross-entropy of f_θ on the held-out domain D_t              (eq. 2, M = CE)
    dF/dω = −∂²G/∂ω∂θ · H⁻¹ ∇_θF,   H⁻¹ ≈ α Σ_{j<15} (I − αH)^j                   (eqs. 4–6, Alg. 2)

Each outer step (Alg. 1, "robust gradient estimation", Sec. 3.3) runs leave-one-domain-out: for every
meta-train domain a *freshly initialised* network is trained on the other domains with the current loss,
its hypergradient is computed by the chosen solver, and the per-domain hypergradients are combined by
PCGrad (:mod:`problems.gradient_surgery`; ``combine="mean"`` for plain averaging). The per-domain runs go
through ``ctx.map``, so they are split across Accelerate processes. The meta-test (:func:`meta_test`) trains plain ERM
with the frozen learned loss vs cross-entropy on new data with a new architecture.

Explicit choices (the paper leaves them open; docs/itl.md):
  - Neumann α (not reported): ``neumann_alpha=None`` sets α = 1/λ_max(H), λ_max from ``power_iterations``
    power-iteration HVPs at each held-out run's θ*, so the series converges whatever the loss scale; the
    leading α of the Neumann identity is applied (Alg. 2 omits it, digest E2).
  - ``damping`` (default 0.1; 0 is the paper): H + δI with δ = damping·λ_max via a proximal term ½δ‖θ − θ*‖²
    (same stationary point and mixed term), for the indefinite Hessians of trained MLPs.
  - Implicit solvers: the network is trained by minibatch SGD (lr 0.01, batch 32, §4.1; step count not
    reported) and H, ∂²G/∂ω∂θ are taken on the full source set at θ*. ``unroll``/``forward`` differentiate
    the same minibatch loop; ``cmaes`` scores each candidate by the mean LODO held-out CE (one joint
    problem of all held-out networks, whose summed inner loss separates, so the training is identical).
  - Outer optimiser Adam (``outer_optimizer``) instead of the paper's plain GD: Adam is invariant to
    the gradient scale, which the paper's pseudocode changes by 1/α (digest E2).
  - Init ω (not reported): the Brier score × C (exact in the family, bounded, coefficients of order C;
    the cross-entropy fit has coefficients of order 10²–10³, which a fixed outer step size barely moves).
  - MLP 784-256-10 (the paper's "1024-256-10" does not fit 28×28 inputs; digest §4).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.func import functional_call

import bilevel
from bilevel import RunContext, StepOutput, tree
from bilevel.solvers import CMAES, Implicit, ImplicitNeumann, parse_spec
from problems.gradient_surgery import combine_gradients, conflicts
from problems.losses import TaylorSpec, initial_theta, taylor_loss


@dataclass(frozen=True)
class Config:
    # meta-train DG task (§4.1): Rotated MNIST, 6 rotation domains
    dataset: str = "rotated_mnist"           # or "rotated_digits" (8×8, fast)
    angles: tuple[float, ...] = (0, 15, 30, 45, 60, 75)
    per_domain: Optional[int] = None         # images per domain (None: all 833 of the 5k-MNIST build)
    data_seed: int = 0
    hidden: int = 256                        # §4.1 2-layer MLP (0: softmax regression, for tests)
    # loss family (§2, eq. 10)
    parameterisation: str = "itl"
    order: int = 4                           # §4.4, Fig. 6
    init: str = "brier"                      # not reported; exact Brier × C (E3); or "cross_entropy" (fit)
    # inner problem (§4.1)
    inner_lr: float = 0.01
    inner_batch: int = 32                    # 0: full batch
    inner_steps: int = 1000                  # not reported ("to convergence")
    inner_optimizer: str = "sgd"             # not reported
    l2: float = 0.0                          # not in the paper; > 0 makes softmax regression strongly convex
    # hypergradient (§3.1, §4.1): Neumann with 15 terms
    neumann_alpha: Optional[float] = None    # None: α = 1/λ_max(H) by power iteration
    power_iterations: int = 10
    damping: float = 0.1                     # not in the paper (0): H + δI, δ = damping·λ_max (non-convex θ*)
    combine: str = "pcgrad"                  # §3.3; "mean" for the ablation
    # outer loop (§4.1, Alg. 1): 200 steps, lr 0.01
    outer_optimizer: str = "adam"            # paper: plain GD (see module docstring)
    outer_lr: float = 0.01
    # meta-test (§4.2, proxy): ERM + frozen loss vs CE, new data and a new architecture
    test_dataset: str = "rotated_animals"
    test_per_domain: Optional[int] = 300
    test_arch: str = "cnn"
    test_steps: int = 300
    test_lr: float = 0.05
    test_seeds: int = 3
    cache_dir: Optional[str] = None


SMOKE = Config(dataset="rotated_digits", angles=(0, 30, 60), per_domain=40, hidden=16, inner_steps=20,
               inner_batch=16, inner_lr=0.1, power_iterations=10, test_dataset="rotated_digits",
               test_per_domain=30, test_steps=10, test_seeds=1, test_arch="mlp", damping=1.0)
DEFAULT_SOLVER = "neumann:terms=15"


def load_domains(name: str, angles, per_domain, seed: int, cache_dir=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{domain: (X, y)}`` of a rotated-domains dataset from :mod:`problems.data`, or of a user's
    DomainBed-layout folder ``root/<domain>/<class>/<image>`` given as ``"folder:<root>"`` (PACS, VLCS,
    OfficeHome ...; RGB resized to 28×28, ``angles`` / ``per_domain`` unused)."""
    from problems import data
    if name.startswith("folder:"):
        ds = data.image_folder_domains(name.split(":", 1)[1], size=(28, 28), cache_dir=cache_dir)
        return {d: data.to_tensors(ds, domains=d) for d in data.domains_of(ds)}
    builders = {"rotated_mnist": data.rotated_mnist, "rotated_digits": data.rotated_digits,
                "rotated_animals": data.rotated_animals}
    if name not in builders:
        raise ValueError(f"ITL: unknown dataset {name!r}; valid: {', '.join(builders)} or 'folder:<root>'")
    ds = builders[name](angles=tuple(angles), per_domain=per_domain, seed=seed, cache_dir=cache_dir)
    return {d: data.to_tensors(ds, domains=d) for d in data.domains_of(ds)}


def make_model(arch: str, shape: tuple[int, ...], hidden: int, num_classes: int) -> torch.nn.Module:
    """``mlp`` (flatten → hidden → ReLU → C; ``hidden=0``: linear) or ``cnn`` (two 3×3 conv + pool blocks)."""
    if arch == "mlp":
        d = math.prod(shape)
        if hidden == 0:
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, num_classes))
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, num_classes))
    if arch == "cnn":
        c, h, w = shape
        side = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
        return torch.nn.Sequential(torch.nn.Conv2d(c, 16, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                   torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                   torch.nn.Flatten(), torch.nn.Linear(32 * side[0] * side[1], num_classes))
    raise ValueError(f"ITL: unknown architecture {arch!r}; valid: 'mlp', 'cnn'")


def fresh_params(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default init (U(±1/√fan_in) for weights and biases), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        fan_in = p.shape[1] * math.prod(p.shape[2:]) if p.dim() > 1 else None
        if fan_in is None:  # a bias: the fan-in of its layer's weight
            fan_in = math.prod(dict(model.named_parameters())[name.replace("bias", "weight")].shape[1:])
        out[name] = (torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(fan_in)
    return out


class ITLTask:
    """Meta-learning ω by leave-one-domain-out implicit hypergradients (Alg. 1)."""

    def __init__(self, cfg: Config, ctx: RunContext, domains: Optional[dict] = None):
        if cfg.combine not in ("pcgrad", "mean"):
            raise ValueError(f"ITL: combine must be 'pcgrad' or 'mean', got {cfg.combine!r}")
        self.cfg = cfg
        self.domains = domains if domains is not None else load_domains(
            cfg.dataset, cfg.angles, cfg.per_domain, cfg.data_seed, cfg.cache_dir)
        if len(self.domains) < 2:
            raise ValueError(f"ITL needs at least 2 meta-train domains for leave-one-domain-out, got {len(self.domains)}")
        self.names = list(self.domains)
        x0, _ = self.domains[self.names[0]]
        self.num_classes = int(max(int(y.max()) for _, y in self.domains.values())) + 1
        self.model = make_model("mlp", tuple(x0.shape[1:]), cfg.hidden, self.num_classes)
        self.spec = TaylorSpec(cfg.parameterisation, cfg.order)
        self.outer = {"omega": initial_theta(self.spec, cfg.init, scale=float(self.num_classes)).to(ctx.device)}
        self.optimizer, self.lr = cfg.outer_optimizer, cfg.outer_lr
        if isinstance(ctx.solver, CMAES):  # its pseudo-gradient m_old − m_new is meant for SGD with lr 1
            self.optimizer, self.lr = "sgd", 1.0
        self.problem = bilevel.BilevelProblem(self.inner_loss, self.outer_loss)
        self.solver_state: Any = None  # CMA-ES distribution (the gradient solvers are stateless here)

    # ---- the bilevel problem of one held-out domain (eqs. 2–3)
    def inner_loss(self, theta, outer, batch):
        x, y = batch
        loss = taylor_loss(functional_call(self.model, theta, (x,)), y, outer["omega"], self.spec)
        if self.cfg.l2:
            loss = loss + 0.5 * self.cfg.l2 * sum((p ** 2).sum() for p in theta.values())
        return loss

    def outer_loss(self, theta, outer, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(functional_call(self.model, theta, (x,)), y)

    def split(self, held_out: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(source set: all other domains, target set: the held-out domain)."""
        src = [self.domains[n] for i, n in enumerate(self.names) if i != held_out]
        return (torch.cat([x for x, _ in src]), torch.cat([y for _, y in src])), self.domains[self.names[held_out]]

    def minibatches(self, source, seed: int):
        """``k -> batch``: SGD minibatches (batch ``inner_batch``, seeded) for k < inner_steps, and the
        full source set at k = inner_steps, where the implicit solvers take H and the mixed term."""
        x, y = source
        if self.cfg.inner_batch <= 0 or self.cfg.inner_batch >= len(y):  # full-batch gradient descent
            return lambda k: (x, y)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(y), (self.cfg.inner_steps, min(self.cfg.inner_batch, len(y))), generator=g)
        return lambda k: (x[idx[k]], y[idx[k]]) if k < self.cfg.inner_steps else (x, y)

    def loop(self, steps: Optional[int] = None) -> bilevel.InnerLoop:
        return bilevel.InnerLoop(steps=self.cfg.inner_steps if steps is None else steps,
                                 optimizer=self.cfg.inner_optimizer, lr=self.cfg.inner_lr)

    def _seed(self, ctx: RunContext, step: int, held_out: int) -> int:
        return (ctx.seed * 1_000_003 + step * 101 + held_out) % (2 ** 31)

    def lambda_max(self, theta, omega, batch) -> float:
        """Largest eigenvalue of H = ∂²G/∂θ² at θ* by power iteration (``power_iterations`` HVPs)."""
        matvec = bilevel.hvp_operator(lambda t: self.problem.inner(t, {"omega": omega}, batch), theta)
        v = tree.tree_map(lambda p: torch.randn(p.shape, generator=torch.Generator().manual_seed(0)), theta)
        lam = torch.zeros(())
        for _ in range(self.cfg.power_iterations):
            v = tree.scale(v, 1.0 / float(tree.norm(v)))
            hv = matvec(v)
            lam = tree.dot(v, hv)
            v = hv
        return float(lam)

    def damped(self, anchor, delta: float) -> bilevel.BilevelProblem:
        """G + ½δ‖θ − θ*‖²: the same stationary point and mixed term ∂²G/∂ω∂θ, Hessian H + δI."""
        anchor = tree.detach(anchor)

        def inner(theta, outer, batch):
            prox = sum(((theta[k] - anchor[k]) ** 2).sum() for k in theta)
            return self.inner_loss(theta, outer, batch) + 0.5 * delta * prox
        return bilevel.BilevelProblem(inner, self.outer_loss)

    def held_out_run(self, outer, ctx: RunContext, step: int, held_out: int) -> dict[str, Any]:
        """One LODO run: fresh network, training with L_ω on the sources, hypergradient of the held-out CE."""
        source, target = self.split(held_out)
        seed = self._seed(ctx, step, held_out)
        theta0 = {k: v.to(ctx.device, source[0].dtype) for k, v in fresh_params(self.model, seed).items()}
        batches = self.minibatches(source, seed)
        solver = ctx.solver
        metrics: dict[str, float] = {}
        if isinstance(solver, Implicit):  # train, then differentiate at θ* on the full source set
            theta, _, _ = self.loop().run(self.problem, theta0, outer, batches)
            theta = tree.detach(theta)
            auto_alpha = isinstance(solver, ImplicitNeumann) and self.cfg.neumann_alpha is None \
                and "alpha" not in parse_spec(ctx.solver_spec)[1]
            problem = self.problem
            if auto_alpha or self.cfg.damping:
                lam = self.lambda_max(theta, outer["omega"], source)
                delta = self.cfg.damping * abs(lam)
                metrics["lambda_max"], metrics["damping"] = lam, delta
                if delta:
                    problem = self.damped(theta, delta)
                if auto_alpha:
                    solver = dataclasses.replace(solver, alpha=1.0 / max(abs(lam) + delta, 1e-8))
            elif isinstance(solver, ImplicitNeumann) and self.cfg.neumann_alpha is not None:
                solver = dataclasses.replace(solver, alpha=self.cfg.neumann_alpha)
            if isinstance(solver, ImplicitNeumann):
                metrics["neumann_alpha"] = solver.alpha
            result = bilevel.hypergrad(problem, theta, outer, inner_batch=source, outer_batch=target,
                                       solver=solver, loop=self.loop(0), validate=step == 0)
        else:
            result = bilevel.hypergrad(self.problem, theta0, outer, inner_batch=batches, outer_batch=target,
                                       solver=solver, loop=self.loop(), validate=step == 0)
            theta = result.inner
        grad_norm = tree.norm(torch.func.grad(self.problem.inner)(theta, outer, source))
        with torch.no_grad():
            acc = (functional_call(self.model, theta, (target[0],)).argmax(-1) == target[1]).float().mean()
        metrics.update({k: float(v) for k, v in result.diagnostics.items() if isinstance(v, (int, float))})
        if isinstance(solver, Implicit):  # count the training done here and the power-iteration HVPs
            metrics["inner_steps"] = metrics["evaluations"] = float(self.cfg.inner_steps)
            metrics["hvp_count"] += self.cfg.power_iterations if "lambda_max" in metrics else 0
        metrics.update(held_out_accuracy=float(acc), inner_grad_norm=float(grad_norm),
                       inner_loss=float(self.problem.inner(theta, outer, source)))
        return {"grad": result.hypergrad["omega"].detach().cpu(), "metrics": metrics}

    def step(self, outer, ctx: RunContext, step: int) -> StepOutput:
        if isinstance(ctx.solver, CMAES):
            return self._cmaes_step(outer, ctx, step)
        runs = ctx.map(lambda i: self.held_out_run(outer, ctx, step, i), list(range(len(self.names))))
        grads = [{"omega": r["grad"].to(outer["omega"].device)} for r in runs]
        combined = combine_gradients(grads, self.cfg.combine, seed=self._seed(ctx, step, 0))
        metrics = {k: sum(r["metrics"][k] for r in runs) / len(runs) for k in runs[0]["metrics"]}
        metrics["conflicting_pairs"] = float(conflicts(grads))
        for name, r in zip(self.names, runs):
            metrics[f"held_out_accuracy/{name}"] = r["metrics"]["held_out_accuracy"]
        return StepOutput(grads=combined, metrics=metrics)

    # ---- CMA-ES: all held-out networks as one joint problem (their inner losses separate)
    def joint_problem(self, ctx: RunContext, step: int):
        n = len(self.names)
        splits = [self.split(i) for i in range(n)]
        batchers = [self.minibatches(s, self._seed(ctx, step, i)) for i, (s, _) in enumerate(splits)]
        sub = lambda theta, i: {k.split("/", 1)[1]: v for k, v in theta.items() if k.startswith(f"{i}/")}
        inner = lambda th, om, b: sum(self.inner_loss(sub(th, i), om, b[i]) for i in range(n))
        outer = lambda th, om, b: sum(self.outer_loss(sub(th, i), om, b[i]) for i in range(n)) / n
        theta0 = {f"{i}/{k}": v.to(ctx.device) for i in range(n)
                  for k, v in fresh_params(self.model, self._seed(ctx, step, i)).items()}
        return (bilevel.BilevelProblem(inner, outer), theta0, lambda k: [b(k) for b in batchers],
                [t for _, t in splits])

    def _cmaes_step(self, outer, ctx: RunContext, step: int) -> StepOutput:
        problem, theta0, batches, targets = self.joint_problem(ctx, step)
        result = bilevel.hypergrad(problem, theta0, outer, inner_batch=batches, outer_batch=targets,
                                   solver=ctx.solver, loop=self.loop(), state=self.solver_state, validate=False)
        self.solver_state = result.state
        metrics = {k: float(v) for k, v in result.diagnostics.items() if isinstance(v, (int, float))}
        return StepOutput(grads=result.hypergrad, metrics=metrics)

    # ---- runner interface
    def evaluate(self, outer, ctx: RunContext) -> dict[str, float]:
        """The meta-test (:func:`meta_test`) on ``test_dataset`` with ``test_arch``: learned loss vs CE."""
        return meta_test(outer["omega"].detach().cpu(), self.spec, self.cfg)

    def state_dict(self) -> dict[str, Any]:
        # Networks are re-initialised every outer step (Alg. 1 line 9) and seeded by (seed, step, domain),
        # so only the CMA-ES distribution carries over between steps.
        return {"solver_state": self.solver_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.solver_state = state["solver_state"]

    def check_instance(self) -> Optional[dict[str, Any]]:
        source, target = self.split(0)
        return dict(problem=self.problem, inner=fresh_params(self.model, 0), outer=self.outer,
                    inner_batch=source, outer_batch=target, loop=self.loop(min(self.cfg.inner_steps, 200)))


def build(cfg: Config, ctx: RunContext) -> ITLTask:
    return ITLTask(cfg, ctx)


def erm(loss_fn, train, arch: str, steps: int, lr: float, seed: int, hidden: int = 256, batch: int = 64,
        num_classes: Optional[int] = None) -> torch.nn.Module:
    """Plain ERM (eq. 1) with ``loss_fn(logits, y)``: SGD with momentum 0.9, seeded init and batches."""
    x, y = train
    torch.manual_seed(seed)
    model = make_model(arch, tuple(x.shape[1:]), hidden, num_classes or int(y.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=g)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def _scores(model, data, loss_fn) -> tuple[float, float, float]:
    with torch.no_grad():
        logits = model(data[0])
        return (float((logits.argmax(-1) == data[1]).float().mean()),
                float(torch.nn.functional.cross_entropy(logits, data[1])), float(loss_fn(logits, data[1])))


def meta_test(omega: torch.Tensor, spec: TaylorSpec, cfg: Config, dataset: Optional[str] = None,
              seeds: Optional[int] = None, targets: Optional[list[str]] = None, lrs: Optional[tuple] = None,
              data_seed: int = 1, extra: Optional[dict] = None) -> dict[str, float]:
    """ERM with the frozen loss vs cross-entropy (§4.2 proxy), leave-one-domain-out on a rotated dataset.

    For each target domain and seed, trains ``test_arch`` on the other domains (80 %; 20 % held as
    in-domain validation) with each loss and reports the mean over targets and seeds of: target accuracy
    and CE (out-of-domain), in-domain validation accuracy, and the final training CE. With several
    ``lrs`` each loss picks its learning rate by in-domain validation accuracy (training-domain
    validation, DomainBed), the same budget for both losses. ``extra`` adds losses ``{name: loss_fn}``.
    """
    from problems.losses import TaylorLoss
    doms = load_domains(dataset or cfg.test_dataset, cfg.angles, cfg.test_per_domain, data_seed, cfg.cache_dir)
    names = targets or list(doms)
    num_classes = int(max(int(y.max()) for _, y in doms.values())) + 1
    losses = {"ce": torch.nn.functional.cross_entropy, "learned": TaylorLoss(omega.float(), spec), **(extra or {})}
    out: dict[str, float] = {}
    for lname, loss_fn in losses.items():
        rows: dict[int, list] = {}
        for tname in names:
            src = [doms[n] for n in doms if n != tname]
            x, y = torch.cat([a for a, _ in src]), torch.cat([b for _, b in src])
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed))
            cut = int(0.8 * len(y))
            train, val = (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])
            for s in range(seeds or cfg.test_seeds):
                best = None
                for lr in lrs or (cfg.test_lr,):
                    model = erm(loss_fn, train, cfg.test_arch, cfg.test_steps, lr, s, hidden=64, num_classes=num_classes)
                    val_acc = _scores(model, val, loss_fn)[0]
                    if best is None or val_acc > best[0]:
                        best = (val_acc, model)
                val_acc, model = best
                tacc, tce, _ = _scores(model, doms[tname], loss_fn)
                _, train_ce, train_loss = _scores(model, train, loss_fn)
                rows.setdefault(s, []).append((tacc, tce, val_acc, train_ce, train_loss))
        # mean over target domains per seed, then mean ± std over seeds
        t = torch.stack([torch.tensor(r, dtype=torch.float64).mean(0) for r in rows.values()])
        for j, key in enumerate(("target_accuracy", "target_ce", "in_domain_accuracy", "train_ce", "train_loss")):
            out[f"{lname}/{key}"] = float(t[:, j].mean())
            out[f"{lname}/{key}_std"] = float(t[:, j].std()) if len(t) > 1 else 0.0
    return out
