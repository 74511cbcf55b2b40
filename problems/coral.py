"""Deep CORAL baseline in the domain-generalisation harness.

Sun & Saenko, "Deep CORAL", ECCV-W 2016 (DomainBed form).

    R = (1/n) Σ_e L_e + λ mean_{pairs}[mean(μ_i − μ_j)² + mean(C_i − C_j)²]  (features z)

Not a nested problem: ``build`` declares a ``bilevel.SingleLevel`` objective R over the network params (see
``problems/domain_generalization/harness.py``). Defaults are the IRM Colored MNIST protocol the Hessian
alignment paper reuses (Sec. 5.2: full batch, Adam, 501 steps, penalty 1 → 91257.18 at step 190);
``hparam_trial=k`` switches to DomainBed's defaults (k = 0) or random-search trial k.
"""
from .domain_generalization.problem_file import algorithm_problem

Config, SMOKE, build = algorithm_problem("coral", __name__)
