"""Running problems: the ``bilevel`` CLI, the Accelerate outer loop, checkpoints and the run folder.

Only :mod:`bilevel.run.loop` imports accelerate; import it lazily (``bilevel list`` stays fast).
"""
from .checkpoint import CheckpointError, find_resume_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import resolve_config

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "find_resume_checkpoint",
           "resolve_config"]
