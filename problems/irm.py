"""IRMv1 baseline in the domain-generalisation harness.

Arjovsky, Bottou, Gulrajani, Lopez-Paz, "Invariant Risk Minimization", arXiv:1907.02893, 2019.

    R = (1/n) Σ_e L_e + λ(t) (1/n) Σ_e ‖∇_{w|w=1} L_e(w · logits)‖²                    (IRM Eq. 6)

Not a nested problem: ``build`` declares a ``bilevel.SingleLevel`` objective R over the network params (see
``problems/domain_generalization/harness.py``). Defaults are the IRM Colored MNIST protocol the Hessian
alignment paper reuses (Sec. 5.2: full batch, Adam, 501 steps, penalty 1 → 91257.18 at step 190);
``hparam_trial=k`` switches to DomainBed's defaults (k = 0) or random-search trial k.
"""
from .domain_generalization.problem_file import algorithm_problem

Config, SMOKE, build = algorithm_problem("irm", __name__)
