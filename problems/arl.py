"""ARL (Automated Robust Loss): a label-noise-robust Taylor loss searched by CMA-ES.

B. Gao, PhD thesis ch. 3 (Gao, Gouk, Hospedales, "Searching for Robustness: Loss Learning for Noisy
Classification Tasks", ICCV 2021). θ = the 12 coefficients of the order-4 Taylor loss (eq. 3.4–3.5, with
the min–max rescaling of App. A.3, eq. A.2), ω = network weights (the thesis's Ch. 3 notation):

    max_θ  E_{D,f} [ M(f_{ω*_D}, D^val) ]   s.t.  ω*_D = argmin_ω L_θ(f_ω, D^train)      (3.1)
    E_{D,f}[M] ≈ (1/N) Σ_j M(f^(j)_{ω_j}, D_j^val)                                        (3.2)

D^train carries synthetic label noise (80 % symmetric or 40 % pair-flip), D^val is clean, M is accuracy.
Algorithm 6: each generation samples candidate losses from N(µ, σ²C), trains every
(architecture, dataset) pair from scratch with each candidate, and moves the search distribution with
CMA-ES towards the candidates with the highest mean clean-validation accuracy. Two meta-training
conditions: architecture randomisation (AR: several networks, one dataset) and dataset randomisation
(DR: one network, several datasets).

As a bilevel problem (one sub-problem per outer step = per CMA-ES generation):

    G(ω, θ) = Σ_k L̂_θ(f_k(x_k; ω_k), ỹ_k)     each network's rescaled Taylor loss on its own noisy minibatch
    F(ω)    = 1 − (1/N) Σ_k acc(f_k(x_k^val; ω_k), y_k^val)     (NaN for a diverged network: ranked last)

The inner params are the union of the condition's networks (keys ``"{k}.{name}"``); G separates, so the
networks train independently. F is piecewise constant in θ: only a zeroth-order solver applies, and the
declaration allows only that kind (``cmaes``). :func:`build` declares the problem; the library's outer
loop (:class:`bilevel.OuterLoop`) runs one CMA-ES generation per outer step, keeps the CMA-ES state,
scores the candidates through ``ctx.map`` (split across processes) and moves θ to the new mean (SGD,
lr 1, on the pseudo-gradient m_old − m_new).

Explicit choices (the thesis is silent): 8×8 data (``problems.noisy_training``), η = 10 in eq. A.2, the
Brier score as the initial mean (a proper loss of O(1) coefficients, so one σ suits every coordinate),
σ₀ = 0.5 and popsize 8 (options of ``DEFAULT_SOLVER``; they were ``Config.sigma`` / ``Config.popsize``,
which duplicated the solver spec and were never read), a fixed budget of inner steps ("trained to
convergence" is unaffordable here), and fresh network initialisations every generation, drawn from
(data_seed, generation) with a private generator, so a resumed run repeats the uninterrupted one. The
learned loss is the final CMA-ES mean (the thesis does not say mean or best).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call

import bilevel
from bilevel import RunContext
from .losses.shapes import plot_loss_shapes
from .losses.taylor import TaylorLoss, TaylorSpec, descent_raises_true_class, initial_theta, taylor_loss
from .noisy_training import ARCHITECTURES, DATASETS, accuracy, load_split, make_model, minibatch_indices, train


@dataclass(frozen=True)
class Config:
    condition: str = "ar"                               # "ar" | "dr" (Sec. 3.4.2)
    noise: str = "symmetric"                            # "symmetric" (80 %) | "pairflip" (40 %), Sec. 3.5.1
    rate: float = 0.8
    architectures: tuple[str, ...] = ("mlp2", "mlp3", "cnn")   # AR pool (Table A.1 analogues)
    datasets: tuple[str, ...] = ("digits",)                     # AR: one dataset (MNIST in the thesis)
    dr_architecture: str = "mlp2"                       # DR: one network (the thesis's CNN; an MLP is cheaper)
    dr_datasets: tuple[str, ...] = ("digits", "digits_rot90", "digits_inverted")  # DR pool (MNIST/KMNIST/CIFAR-10)
    inner_steps: int = 600                              # "trained to convergence": a fixed budget here
    batch: int = 64                                     # not stated in the thesis
    inner_lr: float = 0.01                              # SGD lr 0.01, momentum 0.9 (Sec. 3.5.1)
    momentum: float = 0.9
    eta: float = 10.0                                   # η of eq. A.2 (not stated)
    init: str = "brier"                                 # initial CMA-ES mean (not stated)
    data_seed: int = 0
    # The held-out test at the end (Tables 3.1/3.2's protocol, on cells no meta-training pair used): train each
    # "architecture:dataset" cell from scratch on noisy labels with the learned loss, cross-entropy and the
    # un-searched start loss, seeds 0 … test_seeds − 1 (the seed sets the split, the label noise, the init
    # and the batches, the same for all three), and score clean test accuracy. test_seeds = 0 skips it.
    test_cells: tuple[str, ...] = ("mlp_wide:mnist8",)
    test_seeds: int = 5
    test_steps: int = 600


SMOKE = Config(architectures=("linear", "mlp2"), inner_steps=5, batch=32, test_cells=("linear:digits",), test_seeds=2,
               test_steps=10)
# popsize 8: not stated (pycma's default for 12-d is 11); σ₀ = 0.5: not stated.
DEFAULT_SOLVER = "cmaes:popsize=8,sigma=0.5,seed=1"
# The claim of Tables 3.1/3.2: under label noise the searched loss beats cross-entropy on unseen cells. The
# start loss is the control that says how much of that the search itself adds.
VERDICT = bilevel.Verdict(method="test_acc_learned", baseline="test_acc_cross_entropy", controls=("test_acc_start",),
                          metric="clean test accuracy (%) on held-out cells",
                          labels={"test_acc_learned": "learned loss", "test_acc_cross_entropy": "cross-entropy",
                                  "test_acc_start": "start loss (not searched)"})
EVALUATION_GENERATION = 10**6  # seeds the final evaluation's networks apart from every search generation's


def pairs(cfg: Config) -> list[tuple[str, str]]:
    """The (architecture, dataset) pairs every candidate is trained on: F × D of Algorithm 6."""
    if cfg.condition == "ar":
        return [(a, d) for a in cfg.architectures for d in cfg.datasets]
    if cfg.condition == "dr":
        return [(cfg.dr_architecture, d) for d in cfg.dr_datasets]
    raise ValueError(f"arl: condition must be 'ar' (architecture randomisation) or 'dr' (dataset "
                     f"randomisation), got {cfg.condition!r}")


def taylor_spec(cfg: Config) -> TaylorSpec:
    """The loss family searched: order-4 Taylor polynomial, eq. 3.5 factorials, rescaled to [0, η] (eq. A.2)."""
    return TaylorSpec("arl", 4, normalise=cfg.eta)


def learned_loss(cfg: Config, outer) -> TaylorLoss:
    """The loss θ = ``outer["theta"]`` as a drop-in ``loss_fn(logits, targets)`` (``.save(path)`` /
    ``TaylorLoss.load``)."""
    return TaylorLoss(outer["theta"].detach().cpu(), taylor_spec(cfg))


def test_cells(cfg: Config) -> list[tuple[str, str]]:
    """The held-out (architecture, dataset) cells of ``cfg.test_cells``, checked."""
    cells = []
    for cell in cfg.test_cells:
        arch, _, dataset = cell.partition(":")
        if arch not in ARCHITECTURES or dataset not in DATASETS:
            raise ValueError(f"arl: test cell {cell!r} must be 'architecture:dataset' with an architecture in "
                             f"{ARCHITECTURES} and a dataset in {DATASETS}")
        cells.append((arch, dataset))
    return cells


def compared_losses(cfg: Config, outer) -> dict:
    """What the held-out test trains with: the learned loss θ, cross-entropy and the un-searched start loss."""
    spec = taylor_spec(cfg)
    return {"learned": learned_loss(cfg, outer), "cross_entropy": torch.nn.functional.cross_entropy,
            "start": TaylorLoss(initial_theta(spec, cfg.init), spec)}


def held_out_test(losses: dict, cfg: Config, seed: int) -> dict[str, float]:
    """Clean test accuracy (%) of each loss, averaged over ``cfg``'s test cells, for one seed.

    Every loss trains the same network from the same initialisation on the same noisy labels and batches
    (all drawn from ``seed``) for ≈ ``cfg.test_steps`` SGD steps (whole epochs, at least 2), with the thesis's
    optimiser (lr ``inner_lr``, momentum); the score is the final epoch's clean test accuracy.
    """
    scores = {name: 0.0 for name in losses}
    cells = test_cells(cfg)
    for arch, dataset in cells:
        data = load_split(dataset, cfg.noise, cfg.rate, seed=seed)
        epochs = max(2, cfg.test_steps // max(len(data.y_train) // cfg.batch, 1))
        for name, loss_fn in losses.items():
            record = train(loss_fn, arch, data, epochs=epochs, batch=cfg.batch, lr=cfg.inner_lr,
                           momentum=cfg.momentum, seed=seed, eval_every=epochs)
            scores[name] += 100 * record.final / len(cells)
    return scores


def default_init(models: list[nn.Module], generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """PyTorch's default initialisation of every network, drawn from ``generator``; keys ``"{k}.{name}"``.

    Linear and Conv2d: W ~ kaiming_uniform(a=√5) = U(±1/√fan_in), b ~ U(±1/√fan_in), module by module,
    weight before bias: the draws of ``reset_parameters()`` after ``torch.manual_seed(s)`` when the
    generator is seeded with ``s``, so the numbers are those of the global-RNG version without touching the
    global RNG (tests/test_arl.py checks the equality bitwise).
    """
    inner = {}
    for k, model in enumerate(models):
        for name, module in model.named_modules():
            prefix = f"{k}.{name}." if name else f"{k}."
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                weight = torch.empty(module.weight.shape)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                inner[prefix + "weight"] = weight.to(device)
                if module.bias is not None:
                    bound = 1 / math.sqrt(weight[0].numel())  # fan_in = in_features (× kernel size)
                    inner[prefix + "bias"] = torch.empty(module.bias.shape).uniform_(
                        -bound, bound, generator=generator).to(device)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"arl: no default initialisation for {type(module).__name__}")
    return inner


def build(cfg: Config, ctx: RunContext) -> bilevel.Nested:
    """ARL as a bilevel problem: θ the Taylor coefficients, the inner params the condition's networks."""
    if cfg.noise not in ("symmetric", "pairflip") or not 0 <= cfg.rate < 1:
        raise ValueError(f"arl: noise must be 'symmetric' or 'pairflip' with rate in [0, 1), got "
                         f"{cfg.noise!r} at {cfg.rate}")
    if cfg.test_seeds < 0 or cfg.test_steps < 1:
        raise ValueError(f"arl: test_seeds must be ≥ 0 and test_steps ≥ 1, got {cfg.test_seeds} and "
                         f"{cfg.test_steps}")
    test_cells(cfg)
    spec, device = taylor_spec(cfg), ctx.device
    pool = pairs(cfg)
    data = {d: load_split(d, cfg.noise, cfg.rate, cfg.data_seed) for d in {d for _, d in pool}}
    splits = [data[d] for _, d in pool]
    with torch.device("meta"):  # architectures only: functional_call supplies every weight
        models = [make_model(a, s.in_shape) for (a, _), s in zip(pool, splits)]

    def per_network(inner: dict) -> list[dict]:
        return [{k.split(".", 1)[1]: v for k, v in inner.items() if k.split(".", 1)[0] == str(i)}
                for i in range(len(models))]

    def inner_loss(inner, outer, batch):
        """Σ_k L̂_θ(f_k(x_k), ỹ_k): each network's rescaled Taylor loss (eq. 3.4–3.5, A.2) on its own
        noisy minibatch."""
        return sum(taylor_loss(functional_call(m, p, (x,)), y, outer["theta"], spec)
                   for m, p, (x, y) in zip(models, per_network(inner), batch))

    def outer_loss(inner, outer, batch):
        """1 − mean clean-validation accuracy (eq. 3.2); NaN if any network diverged."""
        accs = [accuracy(functional_call(m, p, (x,)), y) for m, p, (x, y) in zip(models, per_network(inner), batch)]
        return torch.tensor(1.0 - sum(accs) / len(accs), dtype=outer["theta"].dtype)

    def inner_batch(step: int):
        """Inner step ``step``'s noisy minibatch of every network (its own seeded epoch order)."""
        out = []
        for k, s in enumerate(splits):
            idx = minibatch_indices(len(s.y_train), cfg.batch, step, cfg.data_seed * 131 + k)
            out.append((s.x_train[idx].to(device), s.y_train[idx].to(device)))
        return tuple(out)

    outer_batch = tuple((s.x_val.to(device), s.y_val.to(device)) for s in splits)

    def init_inner(generation: int) -> dict:
        """Fresh networks for generation ``generation``, seeded from (data_seed, generation)."""
        return default_init(models, torch.Generator().manual_seed(10_007 * cfg.data_seed + generation), device)

    def subproblems(info: bilevel.StepInfo) -> list[bilevel.SubProblem]:
        return [bilevel.SubProblem(inner=init_inner(info.step), inner_batch=inner_batch, outer_batch=outer_batch)]

    problem = bilevel.BilevelProblem(inner_loss, outer_loss)
    loop = bilevel.InnerLoop(steps=cfg.inner_steps, optimizer="momentum", lr=cfg.inner_lr, momentum=cfg.momentum)

    def metrics(sub, result, outer) -> dict[str, float]:
        """Clean meta-validation accuracy at the new mean and of the generation's best candidate."""
        out = {"clean_val_acc_mean": 1.0 - result.diagnostics["outer_loss"]}
        if "best_candidate_loss" in result.diagnostics:
            out["clean_val_acc_best_candidate"] = 1.0 - result.diagnostics["best_candidate_loss"]
        return out

    def evaluate(outer, inners) -> dict:
        """Clean validation accuracy of the meta-training pairs trained with the loss θ, its sign check, and
        the held-out test (:func:`held_out_test`): per-seed lists ``test_acc_<loss>`` for the learned loss,
        cross-entropy and the start loss, the seeds split across processes."""
        theta = {"theta": outer["theta"].detach()}
        with torch.no_grad():
            inner, _, _ = loop.run(problem, init_inner(EVALUATION_GENERATION), theta, inner_batch,
                                   check_finite=False)
            acc = 1.0 - float(outer_loss(inner, theta, outer_batch))
        out: dict = {"clean_val_acc": acc,
                     "descent_raises_true_class": float(descent_raises_true_class(theta["theta"].cpu(), spec))}
        losses = compared_losses(cfg, outer)
        per_seed = ctx.map(lambda seed: held_out_test(losses, cfg, seed), list(range(cfg.test_seeds)))
        for name in losses if per_seed else ():
            out[f"test_acc_{name}"] = [scores[name] for scores in per_seed]
        return out

    def plot(outer, final, run_dir) -> list:
        """``loss_shape.png``: the learned loss against cross-entropy and the start loss."""
        losses = {VERDICT.label(f"test_acc_{name}"): fn for name, fn in compared_losses(cfg, outer).items()}
        title = f"ARL: learned loss under {cfg.rate:.0%} {cfg.noise} label noise"
        return [plot_loss_shapes(losses, run_dir / "loss_shape.png", title)]

    return bilevel.Nested(
        problem=problem, outer={"theta": initial_theta(spec, cfg.init).to(device)}, loop=loop,
        subproblems=subproblems, default_solver=DEFAULT_SOLVER,
        # Never used: a zeroth-order solver replaces the outer optimiser by its own update (SGD, lr 1, on
        # m_old − m_new lands θ on the new CMA-ES mean). Declared as that update to say so.
        optimizer="sgd", lr=1.0,
        solvers=("zeroth_order",),
        solver_note="the fitness, clean validation accuracy, is piecewise constant in θ: it has no useful "
                    "gradient, so only a zeroth-order search applies",
        # validate stays on: validate_problem needs θ to reach G (it does) and finite losses, not F to be
        # differentiable (it accepts an F with no gradient path).
        metrics=metrics, evaluate=evaluate, verdict=VERDICT if cfg.test_seeds else None, plot=plot)


def with_condition(cfg: Config, condition: str, noise: str, rate: float) -> Config:
    """``cfg`` with another meta-training condition / noise (for scripts)."""
    return replace(cfg, condition=condition, noise=noise, rate=rate)
