"""Domain-generalisation harness: each penalty against an independent computation and float64 finite
differences, the objective's annealing, hyperparameter search, and every registered algorithm through the one
outer loop: its first gradients against R(φ, t) written out by hand in float64 (itself checked by finite
differences), its first Adam step against Adam's closed form, resume, per-process minibatches, and the refusal
of any hypergradient solver (API and CLI)."""
import dataclasses
import importlib
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel import tree
from bilevel.problems.domain_generalization import ALGORITHMS, DGConfig, DGTask, build_task, penalties
from bilevel.problems.domain_generalization import curvature as C
from bilevel.problems.domain_generalization.algorithms import get_algorithm, objective
from bilevel.problems.domain_generalization.hparams import default_hparams, random_hparams
from bilevel.problems.domain_generalization.model import features, logits, make_network, split

torch.set_num_threads(1)
NAMES = ["erm", "irm", "vrex", "coral", "fishr", "hgp", "hutchinson"]


def _tiny(num_outputs, seed=0, domains=3, n=7, d=4):
    g = torch.Generator().manual_seed(seed)
    net = make_network("mlp", (d,), num_outputs, hidden=3, seed=seed).double()
    # Random biases: with the zero-bias init, a sample whose first-layer ReLUs are all off sits exactly
    # on the second ReLU's kink, where finite differences are meaningless.
    params = {k: v.detach() + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in net.named_parameters()}
    batches = [(torch.randn(n + e, d, generator=g, dtype=torch.float64),
                torch.randint(0, max(2, num_outputs), (n + e,), generator=g)) for e in range(domains)]
    return net, params, batches


def _penalty_fn(name, net, batches, probes=None, **hp):
    alg = get_algorithm(name)
    hp = {"alpha": 0.7, "beta": 1.3, "hgp_mode": "identity", "reference": "mean", "reduction": "mean", **hp}

    def f(params):
        feat, head = split(params)
        zs = [features(net, feat, x) for x, _ in batches]
        return alg.penalty(head, zs, [y for _, y in batches], hp, probes)
    return f


def _probes(params, domains, s=5, pooled=False):
    head = split(params)[1]
    g = torch.Generator().manual_seed(3)
    return [C.rademacher_probes(head, s, g) for _ in range(domains)], (C.rademacher_probes(head, s, g) if pooled else None)


def _frozen_reference_penalty(name, net, batches, probes, params0):
    """The 'pooled' variant detaches its references, so its gradient is that of the penalty with the
    references frozen at their value at params0 (built here from the curvature functions directly)."""
    head0, zs0, ys = _zs(net, params0, batches)
    lbar = lambda h: torch.stack([C.head_loss(h, z, y) for z, y in zip(zs0, ys)]).mean()  # noqa: E731
    g_ref = torch.func.grad(lbar)(head0)
    if name == "hgp":
        q_ref = bilevel.hvp(lbar, head0, g_ref)
    else:
        _, vjp_fn = torch.func.vjp(torch.func.grad(lbar), head0)
        hr = torch.func.vmap(lambda r: vjp_fn(r)[0])(probes[1])
        q_ref = {k: (probes[1][k] * hr[k]).mean(0) for k in head0}

    def f(params):
        head, zs, _ = _zs(net, params, batches)
        total = 0.0
        for e, (z, y) in enumerate(zip(zs, ys)):
            q = C.hgp_hvp(head, z, y) if name == "hgp" else C.hutchinson_diagonal(head, z, y, probes[0][e])
            dq, dg = tree.sub(q, q_ref), tree.sub(C.head_grad(head, z, y), g_ref)
            total = total + 0.7 * tree.dot(dq, dq) + 1.3 * tree.dot(dg, dg)
        return total
    return f


CASES = [("irm", {}), ("vrex", {}), ("coral", {}), ("fishr", {}), ("hgp", {}), ("hgp", {"hgp_mode": "hvp"}),
         ("hgp", {"reference": "pooled", "reduction": "sum"}), ("hutchinson", {}),
         ("hutchinson", {"reference": "pooled", "reduction": "sum"})]


@pytest.mark.parametrize("num_outputs", [1, 3])
@pytest.mark.parametrize("name,hp", CASES)
def test_penalty_gradient_matches_float64_finite_differences(name, hp, num_outputs):
    net, params, batches = _tiny(num_outputs)
    probes = _probes(params, len(batches), pooled=hp.get("reference") == "pooled")
    f = _penalty_fn(name, net, batches, probes, **hp)
    g = torch.func.grad(f)(params)
    if hp.get("reference") == "pooled":
        f = _frozen_reference_penalty(name, net, batches, probes, params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        eps = 1e-6
        fd = (f(tree.axpy(eps, v, params)) - f(tree.axpy(-eps, v, params))) / (2 * eps)
        torch.testing.assert_close(tree.dot(g, v), fd, rtol=1e-5, atol=1e-9)


def _zs(net, params, batches):
    feat, head = split(params)
    return head, [features(net, feat, x) for x, _ in batches], [y for _, y in batches]


def test_irm_vrex_coral_values():
    net, params, batches = _tiny(1)
    head, zs, ys = _zs(net, params, batches)
    # IRMv1 with BCE: d/dw mean BCE(w a, y)|_{w=1} = mean((σ(a) − y) a).
    irm = torch.stack([((torch.sigmoid(logits(head, z)[:, 0]) - y) * logits(head, z)[:, 0]).mean() ** 2
                       for z, y in zip(zs, ys)]).mean()
    torch.testing.assert_close(penalties.irm(head, zs, ys), irm)
    losses = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(logits(head, z)[:, 0], y.double())
                          for z, y in zip(zs, ys)])
    torch.testing.assert_close(penalties.vrex(head, zs, ys), losses.var(unbiased=False))
    pairs = [(0, 1), (0, 2), (1, 2)]
    coral = sum(((zs[i].mean(0) - zs[j].mean(0)) ** 2).mean() + ((torch.cov(zs[i].T) - torch.cov(zs[j].T)) ** 2).mean()
                for i, j in pairs) / 3
    torch.testing.assert_close(penalties.coral(zs), coral)


def test_fishr_matches_a_per_sample_autograd_loop():
    net, params, batches = _tiny(3)
    head, zs, ys = _zs(net, params, batches)
    variances = []
    for z, y in zip(zs, ys):
        w = head["weight"].clone().requires_grad_(True)
        b = head["bias"].clone().requires_grad_(True)
        per = []
        for i in range(len(y)):
            loss = torch.nn.functional.cross_entropy((z[i:i + 1] @ w.T + b), y[i:i + 1])
            per.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, (w, b))]))
        variances.append(torch.stack(per).var(0, unbiased=False))
    vbar = torch.stack(variances).mean(0)
    expected = torch.stack([((v - vbar) ** 2).sum() for v in variances]).mean()
    torch.testing.assert_close(penalties.fishr(head, zs, ys), expected)


@pytest.mark.parametrize("reference,reduction", [("mean", "mean"), ("pooled", "sum")])
def test_hgp_and_hutchinson_match_explicit_hessians(reference, reduction):
    net, params, batches = _tiny(3)
    head, zs, ys = _zs(net, params, batches)
    Hs = [C.exact_head_hessian(head, z, y) for z, y in zip(zs, ys)]
    gs = [tree.flatten(C.head_grad(head, z, y)) for z, y in zip(zs, ys)]
    per_domain, ref = _probes(params, 3, pooled=True)
    R = [tree.flatten(p).reshape(-1, 5).T if False else torch.cat([p[k].reshape(5, -1) for k in head], 1)
         for p in per_domain]
    Rref = torch.cat([ref[k].reshape(5, -1) for k in head], 1)
    Ds = [(r * (r @ H)).mean(0) for r, H in zip(R, Hs)]       # (1/S) Σ r ⊙ H r (H symmetric)
    if reference == "mean":
        g_ref, q_ref, d_ref = sum(gs) / 3, sum(H @ g for H, g in zip(Hs, gs)) / 3, sum(Ds) / 3
    else:
        zc, yc = torch.cat(zs), torch.cat(ys)
        Hbar = sum(Hs) / 3
        g_ref = sum(gs) / 3
        q_ref, d_ref = Hbar @ g_ref, (Rref * (Rref @ Hbar)).mean(0)
    red = (lambda t: sum(t) / 3) if reduction == "mean" else sum
    hgp = red([0.7 * ((H @ g - q_ref) ** 2).sum() + 1.3 * ((g - g_ref) ** 2).sum() for H, g in zip(Hs, gs)])
    hut = red([0.7 * ((D - d_ref) ** 2).sum() + 1.3 * ((g - g_ref) ** 2).sum() for D, g in zip(Ds, gs)])
    torch.testing.assert_close(penalties.hgp(head, zs, ys, 0.7, 1.3, reference=reference, reduction=reduction), hgp)
    torch.testing.assert_close(penalties.hutchinson(head, zs, ys, 0.7, 1.3, per_domain, reference=reference,
                                                    reduction=reduction, reference_probes=ref), hut)


def test_binary_head_hessian_closed_form():
    net, params, batches = _tiny(1)
    head, zs, ys = _zs(net, params, batches)
    torch.testing.assert_close(C.binary_head_hessian(head, zs[0]), C.exact_head_hessian(head, zs[0], ys[0]))


def test_objective_annealing_and_rescaling():
    net, params, batches = _tiny(1)
    alg = get_algorithm("vrex")
    hp = dict(penalty_weight=50.0, anneal_step=3, warmup_weight=1.0, rescale_after_anneal=True, l2_weight=0.01)
    head, zs, ys = _zs(net, params, batches)
    pen = penalties.vrex(head, zs, ys)
    l2 = sum((v ** 2).sum() for k, v in params.items() if k.endswith("weight"))
    before, m = objective(params, net, batches, alg, hp, step=2)
    after, _ = objective(params, net, batches, alg, hp, step=3)
    torch.testing.assert_close(before, m["nll"] + pen + 0.01 * l2)
    torch.testing.assert_close(after, (m["nll"] + 50.0 * pen + 0.01 * l2) / 50.0)


# ---- every algorithm through the one outer loop, against R(φ, t) written out by hand ---------------------

SEED = 1


def _module(name):
    return importlib.import_module(f"bilevel.problems.{name}")


def _smoke(name, **changes):
    """The problem's SMOKE config (synthetic data, hidden 16, λ: 1 → 10 at step 2, 8 probes) as a DGTask."""
    return DGTask(dataclasses.replace(_module(name).SMOKE, **changes), bilevel.local_context(seed=SEED))


def _mlp(params, x):
    """The IRM MLP written out (flatten, two ReLU layers, linear head): (features, logits)."""
    h = x.flatten(1)
    for i in (1, 3):
        h = torch.relu(h @ params[f"featurizer.{i}.weight"].T + params[f"featurizer.{i}.bias"])
    return h, h @ params["head.weight"].T + params["head.bias"]


def _hand_batches_and_probes(task, step, process_index=0):
    """The documented draws: one generator seeded ((seed·1,000,003) + step)·1009 + process; a randperm
    minibatch per training domain (when batch_size is set), then Hutchinson's S probes per domain."""
    cfg = task.cfg
    gen = torch.Generator().manual_seed(((SEED * 1_000_003) + step) * 1009 + process_index)
    batches = []
    for name in task.train_names:
        x, y = task.splits[name]["in"]
        if cfg.batch_size is not None and cfg.batch_size < len(y):
            idx = torch.randperm(len(y), generator=gen)[: cfg.batch_size]
            x, y = x[idx], y[idx]
        batches.append((x.double(), y))
    probes = None
    if cfg.algorithm == "hutchinson":
        head = {"weight": task.params["head.weight"].double(), "bias": task.params["head.bias"].double()}
        probes = [C.rademacher_probes(head, cfg.probes, gen) for _ in batches]
    return batches, probes


def _hand_penalty(cfg, head, zs, ys, probes):
    if cfg.algorithm == "erm":
        return torch.zeros((), dtype=torch.float64)
    if cfg.algorithm == "coral":
        return penalties.coral(zs)
    if cfg.algorithm == "hgp":
        return penalties.hgp(head, zs, ys, cfg.alpha, cfg.beta, mode=cfg.hgp_mode)
    if cfg.algorithm == "hutchinson":
        return penalties.hutchinson(head, zs, ys, cfg.alpha, cfg.beta, probes)
    return getattr(penalties, cfg.algorithm)(head, zs, ys)


def _hand_terms(task, step, process_index=0):
    """φ ↦ (mean_e BCE_e, P(φ)) in float64: the data term and the penalty on the step's documented draws."""
    cfg = task.cfg
    batches, probes = _hand_batches_and_probes(task, step, process_index)

    def terms(params):
        zs, nlls = [], []
        for x, y in batches:
            z, a = _mlp(params, x)
            zs.append(z)
            nlls.append(F.binary_cross_entropy_with_logits(a[:, 0], y.double()))
        head = {"weight": params["head.weight"], "bias": params["head.bias"]}
        return torch.stack(nlls).mean(), _hand_penalty(cfg, head, zs, [y for _, y in batches], probes)
    return terms


def _hand_objective(task, step, process_index=0):
    """φ ↦ R(φ, t) in float64: mean_e BCE_e + λ(t)·P + ρ Σ_W ‖W‖², divided by λ(t) once λ(t) > 1."""
    cfg = task.cfg
    terms = _hand_terms(task, step, process_index)
    lam = cfg.penalty_weight if step >= cfg.anneal_step else cfg.warmup_weight

    def R(params):
        nll, penalty = terms(params)
        r = nll + lam * penalty
        r = r + cfg.l2_weight * sum((v ** 2).sum() for k, v in params.items() if k.endswith("weight"))
        return r / lam if cfg.rescale_after_anneal and lam > 1 else r
    return R


def _float64(params):
    return {k: v.detach().double() for k, v in params.items()}


def _assert_close_trees(got, want, rel):
    """‖got − want‖ ≤ rel·‖want‖ (float32 gradient against its float64 value)."""
    err = float(tree.norm(tree.sub({k: v.double() for k, v in got.items()}, want)))
    assert err <= rel * float(tree.norm(want)), (err, float(tree.norm(want)))


PENALTY_RTOL = 1e-5
"""float32 penalty vs its float64 value: the penalties are squared differences of nearly equal per-domain
quantities, so float32 cancellation costs a few digits (measured ≤ 6e-7 relative, V-REx and HGP)."""


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_gradient_and_adam_step_match_a_hand_computation(name):
    task = _smoke(name)
    decl = _module(name).build(task.cfg, bilevel.local_context(seed=SEED))
    assert isinstance(decl, bilevel.SingleLevel) and decl.optimizer == "adam" and decl.lr == task.cfg.lr
    loop = bilevel.OuterLoop(decl, None, bilevel.local_context(seed=SEED))
    phi0 = _float64(decl.params)
    gen = torch.Generator().manual_seed(0)
    for step in (0, 3):      # λ = 1 (warm-up) and λ = 10 (annealed: R is divided by λ)
        R = _hand_objective(task, step)
        g_hand = torch.func.grad(R)(phi0)
        # The hand gradient is R's: float64 central differences along two random directions (error O(ε²)).
        for _ in range(2):
            v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in phi0.items()}
            eps = 1e-6
            fd = (R(tree.axpy(eps, v, phi0)) - R(tree.axpy(-eps, v, phi0))) / (2 * eps)
            torch.testing.assert_close(tree.dot(g_hand, v), fd, rtol=1e-6, atol=1e-9)
        # The loop's float32 gradient is the float64 one within float32 rounding (measured ≤ 2e-7 relative).
        grads, metrics = loop.gradient(step)
        _assert_close_trees(grads, g_hand, rel=2e-6)
        # the logged terms: the data term and the penalty's value, by hand on the step's tiny batches
        nll, penalty = (float(t) for t in _hand_terms(task, step)(phi0))
        assert metrics["nll"] == pytest.approx(nll, rel=1e-6)
        assert metrics["penalty"] == pytest.approx(penalty, rel=PENALTY_RTOL, abs=1e-12)
        assert (penalty == 0.0) == (name == "erm")  # every penalty but ERM's is non-zero here: a real check
        assert metrics["outer_loss"] == pytest.approx(float(R(phi0)), rel=1e-6)
        assert metrics["outer_grad_norm"] == pytest.approx(float(tree.norm(g_hand)), rel=2e-6)
    # One step of run_locally is Adam's first step with step 0's gradient: m̂ = g, v̂ = g², so
    # φ₁ = φ₀ − lr·g/(|g| + 1e-8) (torch.optim.Adam's defaults, lr 4.9e-4 per coordinate); the two float32
    # evaluations differ by rounding only (measured ≤ 2e-8).
    g0, _ = loop.gradient(0)
    phi1, history, _ = bilevel.run_locally(decl, 1, seed=SEED)
    for k in phi1:
        expected = decl.params[k] - decl.lr * g0[k] / (g0[k].abs() + 1e-8)
        torch.testing.assert_close(phi1[k], expected, rtol=0, atol=1e-7)
    assert history[0]["outer_loss"] == pytest.approx(float(_hand_objective(task, 0)(phi0)), rel=1e-6)


@pytest.mark.parametrize("name", ["erm", "hutchinson"])
def test_evaluate_is_the_accuracy_of_the_sign_of_the_logit(name):
    task = _smoke(name)
    phi, _, loop = bilevel.run_locally(task.declaration(), 3, seed=SEED)
    ev = loop.evaluate()

    def acc(x, y):
        return float(((_mlp(phi, x)[1][:, 0] > 0).long() == y).float().mean())
    assert ev["train_acc"] == pytest.approx(sum(acc(*task.splits[d]["in"]) for d in ("+90%", "+80%")) / 2, abs=1e-7)
    assert ev["test_acc"] == pytest.approx(acc(*task.splits["-90%"]["in"]), abs=1e-7)


def test_evaluation_names_the_method_and_its_penalty_and_the_summaries_differ():
    """The end-of-run evaluation holds the algorithm, the mean training-domain risk and the algorithm's own
    unweighted penalty at the final params, on the full in-splits (written out with penalties.*), so the
    seven methods' run summaries differ even where 2 smoke steps leave their accuracies equal."""
    from bilevel.run.cli import final_summary
    summaries = set()
    for name in NAMES:
        task = _smoke(name)
        phi = task.params
        ev = task.evaluate(phi)
        batches = [task.splits[d]["in"] for d in task.train_names]
        zs = [_mlp(phi, x)[0] for x, _ in batches]
        logit = [_mlp(phi, x)[1] for x, _ in batches]
        risk = sum(float(F.binary_cross_entropy_with_logits(a[:, 0], y.float())) for a, (_, y) in zip(logit, batches))
        assert ev["algorithm"].startswith(f"{name}: ") and ev["train_risk"] == pytest.approx(risk / len(batches), rel=1e-5)
        head = {"weight": phi["head.weight"], "bias": phi["head.bias"]}
        ys = [y for _, y in batches]
        expected = {"irm": lambda: penalties.irm(head, zs, ys), "vrex": lambda: penalties.vrex(head, zs, ys),
                    "coral": lambda: penalties.coral(zs), "fishr": lambda: penalties.fishr(head, zs, ys)}
        if name in expected:
            assert ev[f"penalty_{name}"] == pytest.approx(float(expected[name]()), rel=1e-4, abs=1e-9)
        elif name == "erm":
            assert not any(k.startswith("penalty_") for k in ev)
        else:  # hgp / hutchinson: finite, and nothing but its own penalty key
            assert [k for k in ev if k.startswith("penalty_")] == [f"penalty_{name}"]
        summaries.add(final_summary(ev))
    assert len(summaries) == len(NAMES)


def test_resume_equals_an_uninterrupted_run():
    # Minibatches and probes come from (seed, step, process) alone: 2 steps, save, 2 more = 4 steps, bitwise.
    cfg = dataclasses.replace(_module("hutchinson").SMOKE, batch_size=16)
    ctx = bilevel.local_context(seed=SEED)
    straight, _, _ = bilevel.run_locally(build_task(cfg, ctx), 4, seed=SEED)
    first = bilevel.OuterLoop(build_task(cfg, ctx), None, ctx)
    first.run(2)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = bilevel.OuterLoop(build_task(cfg, ctx), None, ctx)
    second.load_state_dict(torch.load(buf, weights_only=False))
    second.run(4)
    assert all(torch.equal(second.outer[k].detach(), straight[k]) for k in straight)


def test_minibatches_are_per_process_and_deterministic():
    task = _smoke("hutchinson", batch_size=16)
    ctx0 = bilevel.local_context(seed=SEED)
    ctx1 = dataclasses.replace(ctx0, process_index=1, num_processes=2)
    decl = task.declaration()
    a, _ = bilevel.OuterLoop(decl, None, ctx0).gradient(5)
    b, _ = bilevel.OuterLoop(decl, None, ctx0).gradient(5)
    c, _ = bilevel.OuterLoop(decl, None, ctx1).gradient(5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Each process's gradient is R's on its own minibatches and probes (drawn as documented).
    phi0 = _float64(decl.params)
    for process, grads in ((0, a), (1, c)):
        _assert_close_trees(grads, torch.func.grad(_hand_objective(task, 5, process))(phi0), rel=2e-6)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_refuses_a_hypergradient_solver(name):
    decl = _module(name).build(_module(name).SMOKE, bilevel.local_context(seed=SEED))
    assert not hasattr(_module(name), "DEFAULT_SOLVER")
    for spec in ("cmaes", "cg", "unroll"):
        with pytest.raises(bilevel.SpecError, match=rf"single-level objective.*--solver {spec} would do nothing"):
            bilevel.OuterLoop(decl, spec, bilevel.local_context(seed=SEED))
    with pytest.raises(bilevel.SpecError, match="drop --solver"):
        bilevel.run_locally(decl, 1, solver="neumann", seed=SEED)


def test_cli_refuses_a_solver_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "bilevel.run.cli", "run", "erm", "--solver", "cmaes", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bilevel run: error: problem 'erm' is a single-level objective")
    assert "--solver cmaes would do nothing" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_hparams_defaults_and_seeded_random_search():
    assert default_hparams("irm")["penalty_weight"] == 1e2
    assert random_hparams("hgp", 3) == random_hparams("hgp", 3) != random_hparams("hgp", 4)
    for trial in range(1, 20):
        hp = random_hparams("hgp", trial)
        assert 1e-5 <= hp["alpha"] <= 1e-3 and 1e-3 <= hp["beta"] <= 1e-1 and 8 <= hp["batch_size"] <= 512
    cfg = dataclasses.replace(_module("hgp").SMOKE, hparam_trial=2)
    draw = random_hparams("hgp", 2)
    task = DGTask(cfg, bilevel.local_context())
    assert task.hp["alpha"] == draw["alpha"] and task.cfg.batch_size == draw["batch_size"]
    assert build_task(cfg, bilevel.local_context()).lr == draw["lr"]


def test_colored_mnist_through_the_data_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    hgp = _module("hgp")
    for dataset in ("colored_mnist", "colored_mnist_imbalanced"):
        cfg = hgp.Config(dataset=dataset, hidden=8, cache_dir=str(tmp_path))
        task = DGTask(cfg, bilevel.local_context(seed=SEED))
        assert sorted(task.train_names) == ["+80%", "+90%"]
        _, hist, _ = bilevel.run_locally(hgp.build(cfg, bilevel.local_context(seed=SEED)), 2, seed=SEED)
        assert hist[0]["outer_loss"] == pytest.approx(float(_hand_objective(task, 0)(_float64(task.params))), rel=1e-6)
    y0 = task.splits["+90%"]["in"][1]
    assert len(y0) < 1667   # the minority class was subsampled


def test_bad_input_names_the_problem():
    ctx = bilevel.local_context()
    with pytest.raises(KeyError, match="unknown domain-generalisation algorithm"):
        build_task(DGConfig(algorithm="mixup", dataset="synthetic"), ctx)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_task(DGConfig(dataset="pacs"), ctx)
    with pytest.raises(ValueError, match="test_domains"):
        build_task(DGConfig(dataset="synthetic", test_domains=("+95%",)), ctx)
    with pytest.raises(ValueError, match="builds algorithm 'hgp'"):
        _module("hgp").build(DGConfig(algorithm="irm", dataset="synthetic"), ctx)
    net, params, batches = _tiny(1)
    head, zs, ys = _zs(net, params, batches)
    with pytest.raises(ValueError, match="unknown reference"):
        penalties.hgp(head, zs, ys, 1.0, 1.0, reference="median")
    with pytest.raises(ValueError, match="one probe set per domain"):
        penalties.hutchinson(head, zs, ys, 1.0, 1.0, probes=[])
    assert set(ALGORITHMS) == set(NAMES)


def test_model_selection_rows_and_protocols():
    from bilevel.problems.domain_generalization.selection import rows_for, select

    def m(a_out, b_out, t_in, t_out, a_in=0.5, b_in=0.5):
        return {"acc/A/in": a_in, "acc/A/out": a_out, "acc/B/in": b_in, "acc/B/out": b_out,
                "acc/T/in": t_in, "acc/T/out": t_out}
    records = [("h1", 10, None, m(0.9, 0.7, 0.40, 0.60)), ("h2", 10, None, m(0.6, 0.6, 0.80, 0.90)),
               ("h1", 10, "A", m(0.3, 0.9, 0.5, 0.5, a_in=0.3)), ("h2", 10, "A", m(0.7, 0.9, 0.5, 0.5, a_in=0.7)),
               ("h1", 10, "B", m(0.9, 0.3, 0.5, 0.5, b_in=0.3)), ("h2", 10, "B", m(0.9, 0.5, 0.5, 0.5, b_in=0.5))]
    rows = rows_for("training_domain", records, "T", ["A", "B"])
    assert rows[0]["val_acc"] == pytest.approx(0.8) and rows[0]["test_acc"] == pytest.approx(0.5)
    assert select("training_domain", records, "T", ["A", "B"])["hparams"] == "h1"     # best source val
    assert select("oracle", records, "T", ["A", "B"])["hparams"] == "h2"              # best test out-split
    lodo = select("leave_one_domain_out", records, "T", ["A", "B"])
    assert lodo["hparams"] == "h2" and lodo["val_acc"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="unknown model-selection protocol"):
        select("best", records, "T", ["A", "B"])
