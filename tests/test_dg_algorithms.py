"""Domain-generalisation harness: each penalty against an independent computation and float64 finite
differences, the objective's annealing, hyperparameter search, and a smoke run of every registered algorithm."""
import dataclasses
import importlib
import io

import pytest
import torch

import bilevel
from bilevel import tree
from problems.domain_generalization import ALGORITHMS, DGConfig, build_task, penalties
from problems.domain_generalization import curvature as C
from problems.domain_generalization.algorithms import get_algorithm, objective
from problems.domain_generalization.hparams import default_hparams, random_hparams
from problems.domain_generalization.model import features, logits, make_network, split

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


@pytest.mark.parametrize("name", NAMES)
def test_smoke_every_algorithm_via_run_locally(name):
    module = importlib.import_module(f"problems.{name}")
    ctx = bilevel.local_context(module.DEFAULT_SOLVER, seed=1)
    task = module.build(module.SMOKE, ctx)
    assert isinstance(task, bilevel.Task) and task.check_instance() is None
    params, history = bilevel.run_locally(task, ctx, steps=4)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert history[-1]["penalty"] > 0 or name == "erm"
    assert set(params) == set(task.outer) and any((params[k] != task.outer[k]).any() for k in params)
    ev = task.evaluate(params, ctx)
    assert 0.0 <= ev["test_acc"] <= 1.0 and 0.0 <= ev["train_acc"] <= 1.0
    buf = io.BytesIO()
    torch.save(task.state_dict(), buf)
    buf.seek(0)
    task.load_state_dict(torch.load(buf, weights_only=False))


def test_minibatches_are_per_process_and_deterministic():
    cfg = dataclasses.replace(importlib.import_module("problems.hutchinson").SMOKE, batch_size=16)
    ctx0 = bilevel.local_context("cg", seed=1)
    ctx1 = dataclasses.replace(ctx0, process_index=1, num_processes=2)
    task = build_task(cfg, ctx0)
    a = task.step(task.outer, ctx0, 5).grads
    b = task.step(task.outer, ctx0, 5).grads
    c = task.step(task.outer, ctx1, 5).grads
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_hparams_defaults_and_seeded_random_search():
    assert default_hparams("irm")["penalty_weight"] == 1e2
    assert random_hparams("hgp", 3) == random_hparams("hgp", 3) != random_hparams("hgp", 4)
    for trial in range(1, 20):
        hp = random_hparams("hgp", trial)
        assert 1e-5 <= hp["alpha"] <= 1e-3 and 1e-3 <= hp["beta"] <= 1e-1 and 8 <= hp["batch_size"] <= 512
    cfg = dataclasses.replace(importlib.import_module("problems.hgp").SMOKE, hparam_trial=2)
    task = build_task(cfg, bilevel.local_context("cg"))
    assert task.hp["alpha"] == random_hparams("hgp", 2)["alpha"] and task.lr == random_hparams("hgp", 2)["lr"]


def test_colored_mnist_through_the_data_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    hgp = importlib.import_module("problems.hgp")
    for dataset in ("colored_mnist", "colored_mnist_imbalanced"):
        cfg = hgp.Config(dataset=dataset, hidden=8, cache_dir=str(tmp_path))
        ctx = bilevel.local_context("cg", seed=1)
        task = hgp.build(cfg, ctx)
        assert sorted(task.train_names) == ["+80%", "+90%"]
        params, hist = bilevel.run_locally(task, ctx, 2)
        assert torch.isfinite(torch.tensor(hist[-1]["outer_loss"]))
    y0 = task.splits["+90%"]["in"][1]
    assert len(y0) < 1667   # the minority class was subsampled


def test_bad_input_names_the_problem():
    ctx = bilevel.local_context("cg")
    with pytest.raises(KeyError, match="unknown domain-generalisation algorithm"):
        build_task(DGConfig(algorithm="mixup", dataset="synthetic"), ctx)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_task(DGConfig(dataset="pacs"), ctx)
    with pytest.raises(ValueError, match="test_domains"):
        build_task(DGConfig(dataset="synthetic", test_domains=("+95%",)), ctx)
    with pytest.raises(ValueError, match="builds algorithm 'hgp'"):
        importlib.import_module("problems.hgp").build(DGConfig(algorithm="irm", dataset="synthetic"), ctx)
    net, params, batches = _tiny(1)
    head, zs, ys = _zs(net, params, batches)
    with pytest.raises(ValueError, match="unknown reference"):
        penalties.hgp(head, zs, ys, 1.0, 1.0, reference="median")
    with pytest.raises(ValueError, match="one probe set per domain"):
        penalties.hutchinson(head, zs, ys, 1.0, 1.0, probes=[])
    assert set(ALGORITHMS) == set(NAMES)


def test_model_selection_rows_and_protocols():
    from problems.domain_generalization.selection import rows_for, select

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
