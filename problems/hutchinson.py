"""Hutchinson: Hessian-diagonal alignment for domain generalisation.

Hemati, Zhang, Estiri, Chen, "Understanding Hessian Alignment for Domain Generalization", ICCV 2023.

    R = (1/n) Σ_e L_e + λ(t) (1/n) Σ_e [α‖D̂_e − mean_e D̂_e‖² + β‖g_e − ḡ‖²]           (Eq. 23)
    D̂_e = (1/S) Σ_s r_s ⊙ H_e r_s, r_s Rademacher (Eq. 22; S = ``probes``, 100 in the paper).

Not a nested problem: ``build`` declares a ``bilevel.SingleLevel`` objective R over the network params (see
``problems/domain_generalization/harness.py``). Defaults are the IRM Colored MNIST protocol the Hessian
alignment paper reuses (Sec. 5.2: full batch, Adam, 501 steps, penalty 1 → 91257.18 at step 190);
``hparam_trial=k`` switches to DomainBed's defaults (k = 0) or random-search trial k.
"""
from .domain_generalization.problem_file import algorithm_problem

Config, SMOKE, build = algorithm_problem("hutchinson", __name__)
