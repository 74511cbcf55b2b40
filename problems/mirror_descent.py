"""Mirror descent with a learned quadratic mirror map: the optimiser of MetaMD.

Gao, Gouk, Lee, Hospedales, "Meta Mirror Descent: Optimiser Learning for Fast Convergence" (ICLR 2022
GroundedML workshop; PhD thesis of B. Gao, Edinburgh 2023, chapter 5 and appendix C).

Mirror descent (thesis eq. 5.1, 5.5) with the Bregman divergence of φ(θ) = ½ θᵀMθ (eq. 5.2)

    θ_{t+1} = argmin_θ ⟨∇L(θ_t), θ⟩ + (1/2η) B_φ(θ‖θ_t),     B_φ(θ‖θ') = ½ (θ − θ')ᵀ M (θ − θ')

has the closed form (App. C.1, eq. C.11)  θ_{t+1} = θ_t − η M⁻¹ ∇L(θ_t): a learned preconditioner. (C.11 is
the argmin of η⟨∇L, θ⟩ + B_φ(θ‖θ_t) as derived in C.1; eq. 5.1's printed weight 1/(2η) would double the
step. We follow C.1/C.11; the base η is tuned at meta-test anyway.)

Two mirror-map families (the outer parameters φ of the bilevel problem):

* :class:`KroneckerMap` (Sec. 5.4.3): M block-diagonal over parameter tensors, each block
  M_ζ = A_ζ ⊗ B_ζ with A = aaᵀ + I (κ×κ) and B = bbᵀ + I (ι×ι). A tensor of shape (ι, …) is read as the
  ι×κ matrix G (κ = product of the other dims; a bias is ι×1, so its A is the scalar 1 + a²). With the
  column-major vec, (A ⊗ B) vec G = vec(B G A), and by Sherman–Morrison (no SVD, unlike the thesis)
  (aaᵀ + I)⁻¹ = I − aaᵀ/(1 + |a|²),  (aaᵀ + I)^{-1/2} = I + c aaᵀ,  c = −1/(√(1+s)(1 + √(1+s))), s = |a|².
* :class:`DiagonalMap` (Sec. 5.6.1, synthetic tasks): M = diag(exp(s)); the thesis does not state its
  positivity parameterisation, the exponential is our choice.

Meta-objective (eq. 5.7, with the regulariser of Sec. 5.5, eq. 5.30–5.31)

    E(φ) = (1/n) Σ_i B_φ(θ_T⁽ⁱ⁾‖θ_1⁽ⁱ⁾) + k/λ_min(M) + γ ‖M − I‖_F².

The meta-gradient dE/dφ is computed here by reverse mode through the unrolled loop
(:func:`metagrad_reverse`), forward mode (:func:`metagrad_forward`), and the implicit / envelope
formula (:func:`metagrad_implicit`), which is the correct replacement of the thesis's eq. 5.28
(:func:`metagrad_thesis_eq528`, kept to document the discrepancy; see docs/metamd.md).
:func:`displacement_problem` recasts MetaMD as a :class:`bilevel.BilevelProblem` so that the
library's registered solvers apply. :class:`MirrorDescent` is the drop-in ``torch.optim`` optimiser.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

import bilevel
from bilevel.inner import batch_at

Params = dict[str, Tensor]
LossFn = Callable[[Params, Any], Tensor]


def _as_matrix(x: Tensor) -> Tensor:
    """A parameter tensor of shape (ι, …) as its ι×κ matrix (a bias: ι×1; a scalar: 1×1)."""
    return x.reshape(x.shape[0], -1) if x.dim() >= 1 else x.reshape(1, 1)


def _rank_one(v: Tensor, coef: Tensor | float) -> Tensor:
    """I + coef·vvᵀ as a dense matrix (only used for small factors and in tests)."""
    return torch.eye(v.numel(), dtype=v.dtype, device=v.device) + coef * torch.outer(v, v)


def _apply_rank_one(v: Tensor, coef: Tensor, x: Tensor, side: str) -> Tensor:
    """(I + coef vvᵀ) X (side='left') or X (I + coef vvᵀ) (side='right') in O(size of X)."""
    if side == "left":
        return x + coef * torch.outer(v, v @ x)
    return x + coef * torch.outer(x @ v, v)


class KroneckerMap:
    """M = blockdiag_ζ (a_ζa_ζᵀ + I) ⊗ (b_ζb_ζᵀ + I), one block per parameter tensor (thesis Sec. 5.4.3).

    Outer params: ``"{name}:a"`` (κ) and ``"{name}:b"`` (ι) for every inner parameter ``name``.
    Eigenvalues of a block: {1, 1+|a|², 1+|b|², (1+|a|²)(1+|b|²)} (a factor of size 1 has only 1+a²),
    so M ⪰ I: the learned preconditioner can only shrink the base step η along learned directions.
    """

    def __init__(self, shapes: Mapping[str, torch.Size]):
        if not shapes:
            raise ValueError("KroneckerMap needs at least one parameter shape; pass {name: p.shape for the model}")
        self.shapes = {k: torch.Size(v) for k, v in shapes.items()}

    def dims(self, name: str) -> tuple[int, int]:
        """(κ, ι): the sizes of A (columns of the matrix view) and B (rows)."""
        shape = self.shapes[name]
        iota = shape[0] if len(shape) >= 1 else 1
        return (math.prod(shape) // iota if iota else 0), iota

    def init(self, scale: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> Params:
        """a, b ~ N(0, scale²/dim). a = b = 0 gives M = I (gradient descent), but it is a stationary point
        of every term of E (M depends on aaᵀ), so meta-training needs scale > 0 (not stated in the thesis)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for name in self.shapes:
            kappa, iota = self.dims(name)
            out[f"{name}:a"] = scale * torch.randn(kappa, generator=g, dtype=dtype) / math.sqrt(kappa)
            out[f"{name}:b"] = scale * torch.randn(iota, generator=g, dtype=dtype) / math.sqrt(iota)
        return out

    def _check(self, phi: Params, theta: Mapping[str, Tensor]) -> None:
        missing = [k for k in theta if f"{k}:a" not in phi or f"{k}:b" not in phi]
        if missing:
            raise KeyError(f"KroneckerMap has no factors for parameters {missing}; build the map from the model's "
                           f"parameter shapes (KroneckerMap({{n: p.shape for n, p in model.named_parameters()}}))")

    def _power(self, phi: Params, theta: Mapping[str, Tensor], power: float) -> Params:
        """M^power applied blockwise: B^p G A^p, for power in {1, −1, −½}."""
        self._check(phi, theta)
        out = {}
        for name, x in theta.items():
            a, b = phi[f"{name}:a"], phi[f"{name}:b"]
            coefs = []
            for v in (a, b):
                s = v @ v
                if power == 1:
                    coefs.append(torch.ones_like(s))
                elif power == -1:
                    coefs.append(-1.0 / (1.0 + s))
                else:  # (I + vvᵀ)^{-1/2} = I + c vvᵀ, c = (1/√(1+s) − 1)/s written without the 0/0 at s = 0
                    r = torch.sqrt(1.0 + s)
                    coefs.append(-1.0 / (r * (1.0 + r)))
            g = _as_matrix(x)
            g = _apply_rank_one(b, coefs[1], g, "left")
            g = _apply_rank_one(a, coefs[0], g, "right")
            out[name] = g.reshape(x.shape)
        return out

    def apply(self, phi: Params, v: Mapping[str, Tensor]) -> Params:
        """M v."""
        return self._power(phi, v, 1)

    def inverse(self, phi: Params, v: Mapping[str, Tensor]) -> Params:
        """M⁻¹ v (the mirror-descent direction, App. C.1)."""
        return self._power(phi, v, -1)

    def inverse_sqrt(self, phi: Params, v: Mapping[str, Tensor]) -> Params:
        """M^{-1/2} v (the change of variables of :func:`displacement_problem`)."""
        return self._power(phi, v, -0.5)

    def min_eigenvalue(self, phi: Params) -> Tensor:
        """λ of eq. 5.7: min over blocks of λ_min(A)λ_min(B); λ_min(aaᵀ+I) = 1 when dim ≥ 2, else 1 + a²."""
        values = []
        for name in self.shapes:
            lam = 1.0
            for v in (phi[f"{name}:a"], phi[f"{name}:b"]):
                lam = lam * ((1.0 + v @ v) if v.numel() == 1 else torch.ones((), dtype=v.dtype, device=v.device))
            values.append(lam)
        return torch.stack(values).min()

    def distance_to_identity_sq(self, phi: Params) -> Tensor:
        """‖M − I‖_F² = Σ_ζ ‖A‖²‖B‖² − 2 tr A tr B + κι (eq. 5.30–5.31; eq. 5.32 as printed lacks the squares)."""
        total = 0.0
        for name in self.shapes:
            kappa, iota = self.dims(name)
            sa, sb = (phi[f"{name}:{c}"] @ phi[f"{name}:{c}"] for c in "ab")
            fro_a, fro_b = (1 + sa) ** 2 + kappa - 1, (1 + sb) ** 2 + iota - 1
            total = total + fro_a * fro_b - 2 * (kappa + sa) * (iota + sb) + kappa * iota
        return total

    def dense(self, phi: Params) -> Tensor:
        """The full M (tests only), in the order of ``self.shapes`` with column-major vec per block."""
        blocks = [torch.kron(_rank_one(phi[f"{n}:a"], 1.0), _rank_one(phi[f"{n}:b"], 1.0)) for n in self.shapes]
        return torch.block_diag(*blocks)

    @staticmethod
    def vec(theta: Mapping[str, Tensor]) -> Tensor:
        """Column-major vec of each block, concatenated: the coordinates :meth:`dense` acts on."""
        return torch.cat([_as_matrix(x).T.reshape(-1) for x in theta.values()])


class DiagonalMap:
    """M = diag(exp(s)) per parameter tensor (synthetic experiment, Sec. 5.6.1 / App. C.2).

    ``s`` has the shape of the parameter's trailing dims, so one M can act on a batch of tasks stacked
    along the leading dims (θ of shape (n, 2) with s of shape (2,)).
    """

    def __init__(self, shapes: Mapping[str, torch.Size]):
        if not shapes:
            raise ValueError("DiagonalMap needs at least one parameter shape")
        self.shapes = {k: torch.Size(v) for k, v in shapes.items()}

    def init(self, scale: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> Params:
        g = torch.Generator().manual_seed(seed)
        return {f"{k}:s": scale * torch.randn(v, generator=g, dtype=dtype) for k, v in self.shapes.items()}

    def _scale(self, phi: Params, v: Mapping[str, Tensor], power: float) -> Params:
        missing = [k for k in v if f"{k}:s" not in phi]
        if missing:
            raise KeyError(f"DiagonalMap has no entries for parameters {missing}; build it from their shapes")
        return {k: x * torch.exp(power * phi[f"{k}:s"]) for k, x in v.items()}

    def apply(self, phi, v):
        return self._scale(phi, v, 1.0)

    def inverse(self, phi, v):
        return self._scale(phi, v, -1.0)

    def inverse_sqrt(self, phi, v):
        return self._scale(phi, v, -0.5)

    def min_eigenvalue(self, phi: Params) -> Tensor:
        return torch.cat([phi[f"{k}:s"].reshape(-1) for k in self.shapes]).exp().min()

    def distance_to_identity_sq(self, phi: Params) -> Tensor:
        return sum(((phi[f"{k}:s"].exp() - 1) ** 2).sum() for k in self.shapes)

    def dense(self, phi: Params) -> Tensor:
        return torch.diag(torch.cat([phi[f"{k}:s"].reshape(-1) for k in self.shapes]).exp())

    @staticmethod
    def vec(theta: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([x.reshape(-1) for x in theta.values()])


MirrorMap = KroneckerMap | DiagonalMap


def bregman(mmap: MirrorMap, phi: Params, theta: Params, theta1: Params) -> Tensor:
    """B_φ(θ‖θ_1) = ½ (θ − θ_1)ᵀ M (θ − θ_1) (eq. 5.2 for φ(θ) = ½θᵀMθ)."""
    d = {k: theta[k] - theta1[k] for k in theta}
    md = mmap.apply(phi, d)
    return 0.5 * sum((d[k] * md[k]).sum() for k in d)


def meta_objective(mmap: MirrorMap, phi: Params, theta_t: Params, theta1: Params, k: float = 0.0,
                   reg: float = 0.0) -> Tensor:
    """E(φ) = B_φ(θ_T‖θ_1) + k/λ_min(M) + γ‖M − I‖_F² (eq. 5.7 and Sec. 5.5; γ = ``reg``, unstated in the thesis).

    For a batch of tasks stacked along leading dims (DiagonalMap), the Bregman term is their sum; divide
    by n outside to get eq. 5.7's mean."""
    value = bregman(mmap, phi, theta_t, theta1)
    if k:
        value = value + k / mmap.min_eigenvalue(phi)
    if reg:
        value = value + reg * mmap.distance_to_identity_sq(phi)
    return value


def md_step(mmap: MirrorMap, phi: Params, theta: Params, grads: Params, lr: float,
            weight_decay: float = 0.0) -> Params:
    """θ − η M⁻¹ (∇L + wd·θ): the closed-form mirror step (eq. C.11); coupled weight decay as in torch.optim.SGD."""
    if weight_decay:
        grads = {k: grads[k] + weight_decay * theta[k] for k in grads}
    direction = mmap.inverse(phi, grads)
    return {k: theta[k] - lr * direction[k] for k in theta}


def md_run(loss_fn: LossFn, mmap: MirrorMap, phi: Params, theta1: Params, batches: Any, steps: int, lr: float,
           weight_decay: float = 0.0) -> tuple[Params, Tensor]:
    """T steps of mirror descent from θ_1, pure torch.func (differentiable in φ by grad, jvp, vmap).

    ``batches`` is one batch or a callable ``t -> batch``. Returns θ_T and the losses seen (detached)."""
    if steps < 0:
        raise ValueError(f"md_run: steps must be >= 0, got {steps}")
    theta, losses = dict(theta1), []
    for t in range(steps):
        g, value = grad_and_value(loss_fn)(theta, batch_at(batches, t))
        theta = md_step(mmap, phi, theta, g, lr, weight_decay)
        losses.append(value.detach())
    return theta, (torch.stack(losses) if losses else torch.zeros(0))


def _unrolled_objective(loss_fn, mmap, theta1, batches, steps, lr, k, reg, weight_decay):
    def objective(phi):
        theta_t, losses = md_run(loss_fn, mmap, phi, theta1, batches, steps, lr, weight_decay)
        return meta_objective(mmap, phi, theta_t, theta1, k, reg), ({n: v.detach() for n, v in theta_t.items()},
                                                                     losses)
    return objective


def metagrad_reverse(loss_fn: LossFn, mmap: MirrorMap, phi: Params, theta1: Params, batches: Any, steps: int,
                     lr: float, k: float = 0.0, reg: float = 0.0, weight_decay: float = 0.0):
    """dE/dφ of the T-step loop by reverse mode through the unrolled loop (the target of App. C.2, eq.
    C.12–C.14, computed by autodiff; memory linear in T). Returns (gradient, E, θ_T, losses)."""
    objective = _unrolled_objective(loss_fn, mmap, theta1, batches, steps, lr, k, reg, weight_decay)

    def with_value(p):
        value, aux = objective(p)
        return value, (value.detach(), aux)

    g, (value, (theta_t, losses)) = grad(with_value, has_aux=True)(phi)
    return g, value, theta_t, losses


def metagrad_forward(loss_fn: LossFn, mmap: MirrorMap, phi: Params, theta1: Params, batches: Any, steps: int,
                     lr: float, k: float = 0.0, reg: float = 0.0, weight_decay: float = 0.0):
    """dE/dφ of the T-step loop by forward mode: one jvp through the loop per coordinate of φ (the exact FMD
    of App. C.2, eq. C.15–C.17, with the tangent recursion done by autodiff; memory flat in T, cost ∝ dim φ).

    Note on eq. C.16: ∂/∂m_i of θ − ηM⁻¹g is η g_i/m_i²; the thesis's factor 2 is not used. Returns
    (gradient, E, θ_T, losses)."""
    objective = _unrolled_objective(loss_fn, mmap, theta1, batches, steps, lr, k, reg, weight_decay)
    flat = torch.cat([v.reshape(-1) for v in phi.values()])
    out, value, aux = torch.zeros_like(flat), None, None
    for i in range(flat.numel()):
        basis = torch.zeros_like(flat)
        basis[i] = 1.0
        tangent, start = {}, 0
        for key, v in phi.items():
            tangent[key] = basis[start:start + v.numel()].reshape(v.shape)
            start += v.numel()
        value, derivative, aux = jvp(objective, (phi,), (tangent,), has_aux=True)
        out[i] = derivative
    g, start = {}, 0
    for key, v in phi.items():
        g[key] = out[start:start + v.numel()].reshape(v.shape)
        start += v.numel()
    return g, value.detach(), aux[0], aux[1]


def metagrad_implicit(mmap: MirrorMap, phi: Params, theta_t: Params, theta1: Params, k: float = 0.0,
                      reg: float = 0.0) -> Params:
    """The implicit meta-gradient at a converged inner solution: ∂E/∂φ with θ* held fixed.

    Derivation (replaces eq. 5.28). Mirror descent with φ = ½θᵀMθ converges to the Bregman projection
    θ*(M) = argmin_{θ ∈ S} B_M(θ‖θ_1), S = argmin L (eq. 5.25–5.26; exactly for linear models). Hence
    B_M(θ*(M)‖θ_1) = min_{θ∈S} B_M(θ‖θ_1), and by the envelope theorem (KKT: ∇_θB ⟂ tangent space of S,
    which contains dθ*/dM) the indirect term ∇_θB·dθ*/dφ vanishes:

        dE/dφ = ∂/∂φ [½ dᵀ M(φ) d] + ∂/∂φ [k/λ + γ‖M−I‖²],       d = θ* − θ_1 fixed.

    For a strongly convex L the solution set is a point and dθ*/dφ = 0 gives the same formula. It costs one
    gradient and no Hessian. It is the T → ∞ limit of the unrolled meta-gradient, and it is blind to how fast
    the loop converges: speed enters E only through θ_T ≠ θ* at finite T (see docs/metamd.md)."""
    fixed = {n: v.detach() for n, v in theta_t.items()}
    return grad(lambda p: meta_objective(mmap, p, fixed, theta1, k, reg))(phi)


def metagrad_thesis_eq528(mmap: MirrorMap, phi: Params, theta_t: Params, theta1: Params, k: float = 0.0,
                          reg: float = 0.0, sign: float = 1.0) -> Params:
    """The meta-gradient as printed in the thesis: the direct term plus eq. 5.28,

        ∂E/∂φ = ∂E/∂θ · (∂²B/∂θ∂θ)⁻¹ · ∂²B/∂θ∂φ |_{θ*}       (no minus sign, as printed; ``sign=-1``: IFT sign)

    computed generically (∂²B/∂θ² = M, so the inverse is applied in closed form; the mixed term by vjp).
    For quadratic φ the printed term is dᵀ(∂M/∂φ)d = 2 × the direct term, so this returns 3 × (or with
    sign=−1, −1 ×) the Bregman part of :func:`metagrad_implicit`, which finite differences contradict.
    Kept only to document and test the discrepancy."""
    fixed = {n: v.detach() for n, v in theta_t.items()}
    direct = grad(lambda p: meta_objective(mmap, p, fixed, theta1, k, reg))(phi)
    de_dtheta = grad(lambda t: bregman(mmap, phi, t, theta1))(fixed)
    v = mmap.inverse(phi, de_dtheta)
    _, pullback = vjp(lambda p: grad(lambda t: bregman(mmap, p, t, theta1))(fixed), phi)
    (term,) = pullback(v)
    return {n: direct[n] + sign * term[n] for n in direct}


def displacement_problem(loss_fn: LossFn, mmap: MirrorMap, k: float = 0.0, reg: float = 0.0, n_tasks: int = 1
                         ) -> bilevel.BilevelProblem:
    """MetaMD as a :class:`bilevel.BilevelProblem`, so the library's registered solvers apply.

    Change of variables θ = θ_1 + M^{-1/2} u. Gradient descent on u with step η,
    u ← u − η M^{-1/2} ∇L(θ), is θ ← θ − η M⁻¹ ∇L(θ): exactly mirror descent (eq. C.11), started at u_0 = 0
    (independent of φ, as the core InnerLoop requires). And B_φ(θ‖θ_1) = ½ (M^{-1/2}u)ᵀM(M^{-1/2}u) = ½‖u‖². So

        G(u, φ; (θ_1, batch)) = L(θ_1 + M^{-1/2}u; batch),     F(u, φ) = ½‖u‖² + k/λ(M) + γ‖M − I‖²,

    and ``InnerLoop(optimizer="sgd", lr=η, steps=T)`` from u_0 = 0 runs MetaMD's inner loop. ``unroll``,
    ``forward`` and ``onestep`` differentiate that loop; the implicit solvers (``cg``, ``exact`` ...) apply
    when L is strongly convex (the u-Hessian M^{-1/2}∇²L M^{-1/2} is then invertible) and the loop has
    converged; ``cmaes`` applies always. Batches are pairs (θ_1, data): θ_1 rides in the batch so that
    :func:`bilevel.check` casts it to float64 with the data. ``n_tasks``: ½‖u‖² is divided by it, for n
    independent tasks stacked into one inner problem (eq. 5.7's mean).
    """
    def inner_loss(u, phi, batch):
        theta1, data = batch
        return loss_fn(to_theta(mmap, phi, u, theta1), data)

    def outer_loss(u, phi, batch):
        value = 0.5 * sum((x * x).sum() for x in u.values()) / n_tasks
        if k:
            value = value + k / mmap.min_eigenvalue(phi)
        if reg:
            value = value + reg * mmap.distance_to_identity_sq(phi)
        return value

    return bilevel.BilevelProblem(inner_loss, outer_loss)


def to_theta(mmap: MirrorMap, phi: Params, u: Params, theta1: Params) -> Params:
    """θ = θ_1 + M^{-1/2} u (see :func:`displacement_problem`)."""
    du = mmap.inverse_sqrt(phi, u)
    return {n: theta1[n] + du[n] for n in theta1}


class MirrorDescent(torch.optim.Optimizer):
    """Drop-in ``torch.optim`` optimiser for a learned mirror map: p ← p − η M⁻¹(∇p + wd·p) (eq. C.11).

    Args:
        named_params: ``model.named_parameters()`` (names must match the map's shapes).
        mirror_map: a :class:`KroneckerMap` or :class:`DiagonalMap`.
        phi: the learned outer params (detached copies are kept).
        lr: the base step η; weight_decay: coupled L2, as in torch.optim.SGD.
    """

    def __init__(self, named_params: Iterable[tuple[str, Tensor]], mirror_map: MirrorMap, phi: Params,
                 lr: float = 0.01, weight_decay: float = 0.0):
        named = list(named_params)
        if not named or not all(isinstance(item, tuple) and len(item) == 2 for item in named):
            raise TypeError("MirrorDescent takes model.named_parameters() (pairs of name and tensor), not bare tensors")
        if not lr > 0:
            raise ValueError(f"MirrorDescent: lr must be > 0, got {lr}")
        unknown = [n for n, p in named if n not in mirror_map.shapes or mirror_map.shapes[n] != p.shape]
        if unknown:
            raise ValueError(f"MirrorDescent: parameters {unknown} are not in the mirror map or have other shapes; "
                             "build the map from this model's named_parameters()")
        self.names = [n for n, _ in named]
        self.mirror_map = mirror_map
        self.phi = {key: v.detach().clone() for key, v in phi.items()}
        super().__init__([p for _, p in named], dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params = dict(zip(self.names, group["params"]))
        with_grad = {n: p for n, p in params.items() if p.grad is not None}
        if with_grad:
            grads = {n: p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
                     for n, p in with_grad.items()}
            phi = {key: v.to(next(iter(with_grad.values()))) for key, v in self.phi.items()}
            direction = self.mirror_map.inverse(phi, grads)
            for n, p in with_grad.items():
                p.add_(direction[n], alpha=-group["lr"])
        return loss
