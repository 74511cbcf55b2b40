"""Domain generalisation by regularised risk minimisation: Hessian alignment (HGP, Hutchinson; Hemati, Zhang,
Estiri, Chen, "Understanding Hessian Alignment for Domain Generalization", ICCV 2023) and DomainBed-style
baselines (ERM, IRM, V-REx, CORAL, Fishr) in one harness.

Modules: ``model`` (featurizer + linear head), ``curvature`` (H g by Eq. 21 and by HVP, Hutchinson diagonal),
``penalties`` (one function per algorithm, head only), ``algorithms`` (registry + objective), ``hparams``
(IRM protocol, DomainBed defaults and random search), ``data`` (per-domain tensors), ``harness`` (``DGTask``,
its ``bilevel.SingleLevel`` record), ``selection`` (model selection), ``theory`` (Theorem 3's transfer measure).
"""
from .algorithms import ALGORITHMS, Algorithm, get_algorithm, objective
from .curvature import (exact_head_hessian, head_grad, hessian_gradient_product, hgp_hvp, hgp_identity,
                        hutchinson_diagonal, rademacher_probes)
from .harness import DGConfig, DGTask, build_task
from .hparams import default_hparams, random_hparams

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm", "objective", "exact_head_hessian", "head_grad",
           "hessian_gradient_product", "hgp_hvp", "hgp_identity", "hutchinson_diagonal", "rademacher_probes",
           "DGConfig", "DGTask", "build_task", "default_hparams", "random_hparams"]
