"""Learnable loss families shared by the loss-learning problems (ITL, ARL)."""
from .taylor import (PUBLISHED, PUBLISHED_SIGN, PUBLISHED_SPECS, TaylorLoss, TaylorSpec, descent_raises_true_class, initial_theta,
                     loss_range, published_theta, taylor_loss, taylor_polynomial, true_class_rate)

__all__ = ["TaylorSpec", "taylor_loss", "taylor_polynomial", "initial_theta", "published_theta", "PUBLISHED",
           "PUBLISHED_SPECS", "PUBLISHED_SIGN", "descent_raises_true_class", "true_class_rate", "loss_range", "TaylorLoss"]
