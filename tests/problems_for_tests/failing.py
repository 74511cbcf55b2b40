"""A problem whose process 1 raises at outer step 2: the runner test checks the job exits promptly."""
from dataclasses import dataclass

import torch

from bilevel import StepOutput, TaskDefaults


@dataclass(frozen=True)
class Config:
    fail_step: int = 2
    fail_process: int = 1
    nan_step: int = -1          # >= 0: return a NaN gradient at this step instead of raising


SMOKE = Config()
DEFAULT_SOLVER = "cg"


class FailingTask(TaskDefaults):
    optimizer, lr = "sgd", 0.1

    def __init__(self, cfg, ctx):
        self.cfg, self.outer = cfg, {"x": torch.ones(3)}

    def step(self, outer, ctx, step):
        if step == self.cfg.nan_step:
            return StepOutput({"x": torch.full((3,), float("nan"))}, {"outer_loss": 1.0})
        if self.cfg.nan_step < 0 and step == self.cfg.fail_step and ctx.process_index == self.cfg.fail_process:
            raise RuntimeError(f"deliberate failure on process {ctx.process_index} at step {step}")
        return StepOutput({"x": outer["x"].clone()}, {"outer_loss": float((outer["x"] ** 2).sum())})


def build(cfg, ctx):
    return FailingTask(cfg, ctx)
