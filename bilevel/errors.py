"""Exceptions and warnings raised by `bilevel`.

Each names the problem and the fix; none is raised for a condition the library could silently paper over.
"""


class BilevelError(Exception):
    """Base class of the library's own errors."""


class SpecError(BilevelError, ValueError):
    """A solver name or option is unknown or of the wrong type."""


class NonFiniteError(BilevelError, FloatingPointError):
    """A loss, hypergradient or iterate became NaN or Inf."""


class DivergenceError(NonFiniteError):
    """The outer loss or (hyper)gradient norm, though still finite, grew past ``divergence_factor`` times its
    running reference (see :mod:`bilevel.divergence`): the run is diverging and would reach Inf next."""


class NeumannDivergenceError(BilevelError, ArithmeticError):
    """The Neumann (or fixed-point) series grew instead of shrinking: the step size alpha is too large."""


class IndefiniteHessianError(BilevelError, ArithmeticError):
    """CG met a direction of zero or negative curvature: the inner Hessian is not positive definite."""


class StructureError(BilevelError, ValueError):
    """Two parameter dicts that must match (keys, shapes, dtypes) do not."""


class ConvergenceWarning(UserWarning):
    """An iterative linear solve stopped at its iteration cap before reaching its tolerance."""


class StationarityWarning(ConvergenceWarning):
    """Implicit differentiation ran at inner params that are far from stationary.

    The implicit function theorem assumes ∇θG(θ_K, φ) = 0; the solvers warn when
    ‖∇θG(θ_K, φ)‖ / ‖∇θG(θ_0, φ)‖ exceeds ``Implicit.stationarity_rtol``.
    """


class ZeroHypergradientWarning(UserWarning):
    """Every entry of a hypergradient is exactly zero: the outer params do not reach the outer loss here."""
