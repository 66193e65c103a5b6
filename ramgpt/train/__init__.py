"""Training: :func:`train` runs a profile; the loop (:mod:`.loop`) reads as a table of contents
over components that each decide their own timing: :mod:`.checkpointer` (saves, rotation, hooks),
:mod:`.metrics` (the metrics row), :mod:`.evaluator` (held-out loss), :mod:`.rundir` (the locked
run directory), :mod:`.setup` (everything before the first step), :mod:`.state` (TrainState)."""

from ramgpt.train.loop import MAX_NONFINITE_STEPS, run_steps, train
from ramgpt.train.state import TrainResult, TrainState

__all__ = ["MAX_NONFINITE_STEPS", "TrainResult", "TrainState", "run_steps", "train"]
