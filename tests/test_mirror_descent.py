"""Mirror descent with a learned quadratic mirror map (problems/mirror_descent.py): exact checks in float64."""
import pytest
import torch
from torch.func import functional_call, grad

import bilevel
from bilevel.problems import mirror_descent as md

torch.set_num_threads(1)
D = torch.float64


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def mlp_loss(model):
    def loss(theta, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(functional_call(model, theta, (x,)), y)
    return loss


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, 2, (n,), generator=g)


def kron_setup(scale=0.8, seed=3):
    model = tiny_mlp()
    mmap = md.KroneckerMap({n: p.shape for n, p in model.named_parameters()})
    return model, mmap, mmap.init(scale=scale, seed=seed, dtype=D)


def fd_grad(fn, phi, eps=1e-6):
    out = {}
    for key, v in phi.items():
        g = torch.zeros_like(v)
        for i in range(v.numel()):
            plus = {k: w.clone() for k, w in phi.items()}
            minus = {k: w.clone() for k, w in phi.items()}
            plus[key].view(-1)[i] += eps
            minus[key].view(-1)[i] -= eps
            g.view(-1)[i] = (fn(plus) - fn(minus)) / (2 * eps)
        out[key] = g
    return out


def flat(p):
    return torch.cat([v.reshape(-1) for v in p.values()])


def assert_close(a, b, rtol):
    a, b = flat(a), flat(b)
    assert float((a - b).norm() / b.norm()) < rtol, (a, b)


def test_kronecker_identities_against_dense_matrix():
    model, mmap, phi = kron_setup()
    v = {n: torch.randn_like(p) for n, p in params_of(model).items()}
    m = mmap.dense(phi)
    x = mmap.vec(v)
    assert torch.allclose(mmap.vec(mmap.apply(phi, v)), m @ x, atol=1e-12)
    assert torch.allclose(mmap.vec(mmap.inverse(phi, v)), torch.linalg.solve(m, x), atol=1e-12)
    evals, evecs = torch.linalg.eigh(m)
    inv_sqrt = evecs @ torch.diag(evals ** -0.5) @ evecs.T
    assert torch.allclose(mmap.vec(mmap.inverse_sqrt(phi, v)), inv_sqrt @ x, atol=1e-12)
    assert torch.allclose(mmap.min_eigenvalue(phi), evals.min(), atol=1e-12)
    eye = torch.eye(len(m), dtype=D)
    assert torch.allclose(mmap.distance_to_identity_sq(phi), ((m - eye) ** 2).sum(), atol=1e-10)
    # bregman is ½ dᵀ M d
    theta1 = {n: torch.zeros_like(w) for n, w in v.items()}
    assert torch.allclose(md.bregman(mmap, phi, v, theta1), 0.5 * x @ m @ x, atol=1e-12)


def test_inverse_sqrt_is_smooth_at_zero_factors():
    mmap = md.KroneckerMap({"w": torch.Size([3, 2])})
    phi = mmap.init(scale=0.0, dtype=D)
    v = {"w": torch.randn(3, 2, dtype=D)}
    assert torch.allclose(mmap.inverse_sqrt(phi, v)["w"], v["w"])
    g = grad(lambda p: mmap.inverse_sqrt(p, v)["w"].sum())(phi)
    assert all(torch.isfinite(t).all() for t in g.values())


def test_diagonal_map_identities():
    mmap = md.DiagonalMap({"x": torch.Size([2])})
    phi = {"x:s": torch.tensor([0.3, -1.2], dtype=D)}
    v = {"x": torch.randn(5, 2, dtype=D)}  # a batch of tasks along the leading dim
    m = phi["x:s"].exp()
    assert torch.allclose(mmap.inverse(phi, v)["x"], v["x"] / m)
    assert torch.allclose(mmap.inverse_sqrt(phi, v)["x"], v["x"] / m.sqrt())
    assert torch.allclose(mmap.min_eigenvalue(phi), m.min())
    assert torch.allclose(mmap.distance_to_identity_sq(phi), ((m - 1) ** 2).sum())


def test_md_step_is_the_argmin_of_its_defining_problem():
    """θ_{t+1} = argmin_θ η⟨g, θ⟩ + B_φ(θ‖θ_t) (App. C.1, eq. C.2 → C.11): stationarity and the dense solve.

    Eq. 5.1 prints the weight 1/(2η) on B; with B = ½(θ−θ')ᵀM(θ−θ') that argmin is a step of 2η, so the
    printed 5.1 and the closed form C.11 differ by a factor 2 in η. We follow C.1/C.11 (η is tuned anyway)."""
    model, mmap, phi = kron_setup()
    theta = params_of(model)
    g = grad(mlp_loss(model))(theta, data())
    lr = 0.3
    new = md.md_step(mmap, phi, theta, g, lr)

    def defining(t):
        return lr * sum((g[n] * t[n]).sum() for n in t) + md.bregman(mmap, phi, t, theta)

    stationarity = grad(defining)(new)
    assert float(flat(stationarity).abs().max()) < 1e-12
    m = mmap.dense(phi)
    expected = mmap.vec(theta) - lr * torch.linalg.solve(m, mmap.vec(g))
    assert torch.allclose(mmap.vec(new), expected, atol=1e-12)
    # strictly convex defining problem: any other point is worse
    other = {n: t + 1e-3 * torch.randn_like(t) for n, t in new.items()}
    assert float(defining(other)) > float(defining(new))


@pytest.mark.parametrize("how", ["reverse", "forward"])
def test_unrolled_metagradient_matches_finite_differences(how):
    model, mmap, phi = kron_setup()
    theta1, batch, loss = params_of(model), data(), mlp_loss(model)
    kw = dict(steps=6, lr=0.5, k=0.1, reg=0.05, weight_decay=0.01)
    fn = md.metagrad_reverse if how == "reverse" else md.metagrad_forward
    g, value, _, losses = fn(loss, mmap, phi, theta1, batch, **kw)

    def objective(p):
        th, _ = md.md_run(loss, mmap, p, theta1, batch, kw["steps"], kw["lr"], kw["weight_decay"])
        return float(md.meta_objective(mmap, p, th, theta1, kw["k"], kw["reg"]))

    assert abs(float(value) - objective(phi)) < 1e-12
    assert losses.shape == (6,)
    assert_close(g, fd_grad(objective, phi), 1e-6)


def test_diagonal_metagradient_on_batched_quadratic_tasks():
    """Diagonal M, a batch of 2-D quadratic tasks θᵀQθ − bᵀθ (Sec. 5.6.1), forward = reverse = FD."""
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([[[4.0, 0.5], [0.5, 0.3]], [[2.0, 0.1], [0.1, 0.5]]], dtype=D)
    b = torch.randn(2, 2, generator=g, dtype=D) + 1

    def loss(theta, batch):
        qq, bb = batch
        x = theta["x"]
        return (torch.einsum("ni,nij,nj->n", x, qq, x) - (bb * x).sum(-1)).sum()

    mmap = md.DiagonalMap({"x": torch.Size([2])})
    phi = {"x:s": torch.tensor([0.2, -0.5], dtype=D)}
    theta1 = {"x": torch.zeros(2, 2, dtype=D)}
    kw = dict(steps=30, lr=0.05, k=0.01)
    rev = md.metagrad_reverse(loss, mmap, phi, theta1, (q, b), **kw)[0]
    fwd = md.metagrad_forward(loss, mmap, phi, theta1, (q, b), **kw)[0]

    def objective(p):
        th, _ = md.md_run(loss, mmap, p, theta1, (q, b), kw["steps"], kw["lr"])
        return float(md.meta_objective(mmap, p, th, theta1, kw["k"]))

    exact = fd_grad(objective, phi)
    assert_close(rev, exact, 1e-7)
    assert_close(fwd, exact, 1e-7)


def underdetermined_least_squares(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, 6, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    return x, y


def converged_objective(mmap, phi, x, y, theta1):
    """E at the exact MD limit: the M-closest interpolant θ* = θ_1 + M⁻¹Xᵀ(XM⁻¹Xᵀ)⁻¹(y − Xθ_1)."""
    minv = torch.linalg.inv(mmap.dense(phi))
    t = theta1["w"] + minv @ x.T @ torch.linalg.solve(x @ minv @ x.T, y - x @ theta1["w"])
    return md.bregman(mmap, phi, {"w": t}, theta1), {"w": t}


def test_implicit_metagradient_is_the_envelope_and_eq528_is_not():
    """Digest E.4: on an underdetermined least-squares task the true dE/dM (FD of the converged objective)
    equals the direct term; the thesis's eq. 5.28 adds exactly twice that term."""
    x, y = underdetermined_least_squares()
    mmap = md.DiagonalMap({"w": torch.Size([6])})
    phi = {"w:s": torch.linspace(-0.5, 0.7, 6, dtype=D)}
    theta1 = {"w": torch.zeros(6, dtype=D)}
    loss = lambda th, _: 0.5 * ((x @ th["w"] - y) ** 2).sum()
    theta_t, _ = md.md_run(loss, mmap, phi, theta1, None, steps=4000, lr=0.1)
    _, theta_star = converged_objective(mmap, phi, x, y, theta1)
    assert torch.allclose(theta_t["w"], theta_star["w"], atol=1e-10)  # MD reaches the Bregman projection
    exact = fd_grad(lambda p: float(converged_objective(mmap, p, x, y, theta1)[0]), phi)
    implicit = md.metagrad_implicit(mmap, phi, theta_t, theta1)
    assert_close(implicit, exact, 1e-7)
    printed = md.metagrad_thesis_eq528(mmap, phi, theta_t, theta1)
    assert_close(printed, {"w:s": 3 * exact["w:s"]}, 1e-7)
    ift_sign = md.metagrad_thesis_eq528(mmap, phi, theta_t, theta1, sign=-1.0)
    assert_close(ift_sign, {"w:s": -exact["w:s"]}, 1e-7)


def test_implicit_metagradient_kronecker_linear_model():
    """Same envelope identity with a Kronecker map on a linear model with a bias."""
    x, y = underdetermined_least_squares(seed=2)
    shapes = {"w": torch.Size([6])}
    mmap = md.KroneckerMap(shapes)
    phi = mmap.init(scale=1.0, seed=1, dtype=D)
    theta1 = {"w": torch.randn(6, dtype=D)}
    loss = lambda th, _: 0.5 * ((x @ th["w"] - y) ** 2).sum()
    theta_t, _ = md.md_run(loss, mmap, phi, theta1, None, steps=4000, lr=0.1)
    exact = fd_grad(lambda p: float(converged_objective(mmap, p, x, y, theta1)[0]), phi)
    assert_close(md.metagrad_implicit(mmap, phi, theta_t, theta1), exact, 1e-6)


def test_displacement_problem_runs_mirror_descent():
    model, mmap, phi = kron_setup()
    theta1, batch, loss = params_of(model), data(), mlp_loss(model)
    problem = md.displacement_problem(loss, mmap)
    loop = bilevel.InnerLoop(steps=5, lr=0.4, optimizer="sgd")
    u0 = {n: torch.zeros_like(p) for n, p in theta1.items()}
    u, _, _ = loop.run(problem, u0, phi, (theta1, batch))
    theta_md, _ = md.md_run(loss, mmap, phi, theta1, batch, 5, 0.4)
    theta_u = md.to_theta(mmap, phi, u, theta1)
    assert_close(theta_u, theta_md, 1e-12)
    assert abs(float(problem.outer(u, phi, None)) - float(md.bregman(mmap, phi, theta_md, theta1))) < 1e-12


@pytest.mark.parametrize("solver", ["unroll", "forward", "unroll:checkpoint=true"])
def test_library_unrolled_solvers_on_metamd(solver):
    model, mmap, phi = kron_setup()
    theta1, batch, loss = params_of(model), data(), mlp_loss(model)
    problem = md.displacement_problem(loss, mmap, k=0.1, reg=0.05)
    loop = bilevel.InnerLoop(steps=6, lr=0.5, optimizer="sgd")
    u0 = {n: torch.zeros_like(p) for n, p in theta1.items()}
    report = bilevel.check(problem, u0, phi, inner_batch=(theta1, batch), outer_batch=(theta1, batch),
                           solver=solver, reference=None, loop=loop, verbose=False)
    assert report.fd_rel_error < 1e-6
    ours = md.metagrad_reverse(loss, mmap, phi, theta1, batch, steps=6, lr=0.5, k=0.1, reg=0.05)[0]
    lib = bilevel.hypergrad(problem, u0, phi, inner_batch=(theta1, batch), outer_batch=(theta1, batch),
                            solver=solver, loop=loop).hypergrad
    assert_close(lib, ours, 1e-10)


@pytest.mark.parametrize("solver", ["exact", "cg:maxiter=50,rtol=1e-12"])
def test_library_implicit_solvers_on_strongly_convex_task(solver):
    """Implicit solvers apply when L is strongly convex and the loop converged: they equal the envelope
    formula and finite differences of the converged objective (θ* = Q⁻¹b/2 does not depend on M)."""
    q = torch.tensor([[3.0, 0.4], [0.4, 0.5]], dtype=D)
    b = torch.tensor([1.0, -0.7], dtype=D)
    loss = lambda th, _: th["x"] @ q @ th["x"] - b @ th["x"]
    mmap = md.DiagonalMap({"x": torch.Size([2])})
    phi = {"x:s": torch.tensor([0.4, -0.3], dtype=D)}
    theta1 = {"x": torch.tensor([0.2, 0.1], dtype=D)}
    problem = md.displacement_problem(loss, mmap, k=0.05)
    loop = bilevel.InnerLoop(steps=800, lr=0.1, optimizer="sgd")
    u0 = {"x": torch.zeros(2, dtype=D)}
    res = bilevel.hypergrad(problem, u0, phi, inner_batch=(theta1, None), outer_batch=(theta1, None),
                            solver=solver, loop=loop)
    theta_star = {"x": torch.linalg.solve(2 * q, b)}

    def converged(p):
        return float(md.meta_objective(mmap, p, theta_star, theta1, k=0.05))

    exact = fd_grad(converged, phi)
    assert_close(res.hypergrad, exact, 1e-6)
    assert_close(md.metagrad_implicit(mmap, phi, theta_star, theta1, k=0.05), exact, 1e-7)


def test_drop_in_optimizer_matches_functional_steps():
    model, mmap, phi = kron_setup()
    theta1, batch, loss = params_of(model), data(), mlp_loss(model)
    theta_fn = dict(theta1)
    opt = md.MirrorDescent(model.named_parameters(), mmap, phi, lr=0.3, weight_decay=0.01)
    for _ in range(5):
        opt.zero_grad()
        x, y = batch
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        g = grad(loss)(theta_fn, batch)
        theta_fn = md.md_step(mmap, phi, theta_fn, g, 0.3, 0.01)
        assert_close(params_of(model), theta_fn, 1e-12)


def test_bad_input_raises_clear_errors():
    model, mmap, phi = kron_setup()
    with pytest.raises(TypeError, match="named_parameters"):
        md.MirrorDescent(list(model.parameters()), mmap, phi)
    with pytest.raises(ValueError, match="lr must be > 0"):
        md.MirrorDescent(model.named_parameters(), mmap, phi, lr=0.0)
    other = torch.nn.Linear(5, 5).double()
    with pytest.raises(ValueError, match="not in the mirror map"):
        md.MirrorDescent(other.named_parameters(), mmap, phi)
    with pytest.raises(KeyError, match="no factors"):
        mmap.inverse(phi, {"nope": torch.zeros(2, dtype=D)})
    with pytest.raises(ValueError, match="at least one"):
        md.KroneckerMap({})


def test_converged_meta_objective_is_minimised_by_plain_gradient_descent():
    """Where L has one minimiser θ* (strongly convex), d = θ* − θ₁ does not depend on M, and a Kronecker map has
    M ⪰ I, so E∞(M) = ½dᵀMd + γ‖M − I‖² ≥ ½dᵀd = E∞(I): the converged meta-objective's optimum is plain gradient
    descent (M = I). Checked at random maps, and meta-gradient descent with the exact converged meta-gradient
    (metagrad_implicit) walks from a random map back towards M = I, E falling at every step."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(20, 6, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)  # full column rank
    mmap = md.KroneckerMap({"w": torch.Size([2, 3])})
    theta1 = {"w": torch.randn(2, 3, generator=g, dtype=D)}
    theta_star = {"w": torch.linalg.lstsq(x, y).solution.reshape(2, 3)}   # the unique minimiser, any M
    gamma = 1e-3
    e = lambda phi: float(md.meta_objective(mmap, phi, theta_star, theta1, reg=gamma))
    at_identity = e(mmap.init(scale=0.0, dtype=D))
    d = theta_star["w"] - theta1["w"]
    assert at_identity == pytest.approx(0.5 * float((d ** 2).sum()), rel=1e-12)
    for seed in range(5):
        assert e(mmap.init(scale=1.0, seed=seed, dtype=D)) > at_identity
    phi = mmap.init(scale=1.0, seed=7, dtype=D)
    size0 = float(flat(phi).norm())
    values = [e(phi)]
    for _ in range(300):
        step = md.metagrad_implicit(mmap, phi, theta_star, theta1, reg=gamma)
        phi = {k: phi[k] - 0.05 * step[k] for k in phi}
        values.append(e(phi))
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert float(flat(phi).norm()) < 0.2 * size0 and values[-1] - at_identity < 1e-4 * (values[0] - at_identity)
