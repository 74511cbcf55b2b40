"""ERM baseline in the domain-generalisation harness.

Vapnik, 1999 (as run by DomainBed, Gulrajani & Lopez-Paz, ICLR 2021).

    R = (1/n) Σ_e L_e (+ the IRM protocol's L2 term).

Not a nested problem: ``build`` declares a ``bilevel.SingleLevel`` objective R over the network params (see
``problems/domain_generalization/harness.py``). Defaults are the IRM Colored MNIST protocol the Hessian
alignment paper reuses (Sec. 5.2: full batch, Adam, 501 steps, penalty 1 → 91257.18 at step 190);
``hparam_trial=k`` switches to DomainBed's defaults (k = 0) or random-search trial k.
"""
from .domain_generalization.problem_file import algorithm_problem

Config, SMOKE, build = algorithm_problem("erm", __name__)
