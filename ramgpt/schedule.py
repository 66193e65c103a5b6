"""Learning-rate schedule: a pure function of the step."""

from __future__ import annotations

import math

from ramgpt.config import SchedulerConfig


def lr_at(step: int, peak_lr: float, cfg: SchedulerConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based: the first update is step 1).

    Linear warmup gives step 1 ``peak/warmup`` (never 0), reaching the peak at ``warmup_steps``;
    then cosine decay to ``min_lr_ratio * peak`` at ``decay_steps`` (default ``max_steps``), flat
    after that. ``constant`` keeps the peak after warmup."""
    if step < 1:
        step = 1
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return peak_lr * step / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak_lr
    decay_end = cfg.decay_steps or max_steps
    span = max(decay_end - cfg.warmup_steps, 1)
    progress = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
    floor = cfg.min_lr_ratio * peak_lr
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
