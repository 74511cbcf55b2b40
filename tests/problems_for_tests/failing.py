"""A problem whose process 1 raises at outer step 2: the runner test checks the job exits promptly."""
from dataclasses import dataclass

import torch

import bilevel


@dataclass(frozen=True)
class Config:
    fail_step: int = 2
    fail_process: int = 1
    nan_step: int = -1          # >= 0: return a NaN gradient at this step instead of raising


SMOKE = Config()


def build(cfg, ctx):
    def gradient(params, info):
        if info.step == cfg.nan_step:
            return {"x": torch.full((3,), float("nan"))}, {"outer_loss": 1.0}
        if cfg.nan_step < 0 and info.step == cfg.fail_step and info.process_index == cfg.fail_process:
            raise RuntimeError(f"deliberate failure on process {info.process_index} at step {info.step}")
        return {"x": params["x"].clone()}, {"outer_loss": float((params["x"] ** 2).sum())}

    return bilevel.SingleLevel(params={"x": torch.ones(3)}, gradient=gradient, optimizer="sgd", lr=0.1,
                               kind="a test objective ½‖x‖²")
