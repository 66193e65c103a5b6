"""Learning-rate schedule: a pure function of the step, resolved once per run.

A run's schedule is fixed when it starts (:meth:`Schedule.from_profile`) and saved in every
checkpoint, so a resume continues the schedule it was saved with: a larger ``--max-steps`` trains
on past the end of the cosine (at its floor) instead of silently stretching it (which once made
the lr jump from 3.0e-4 to 9.75e-4 between steps 60 and 70). Changing the schedule is a
deliberate act: set ``scheduler.decay_steps``, ``scheduler.warmup_steps``, ``scheduler.kind``,
``scheduler.min_lr_ratio`` or ``optim.lr`` to new values and :func:`resume_schedule` takes
them, with one line saying what changed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ramgpt.config import SchedulerConfig

if TYPE_CHECKING:  # pragma: no cover
    from ramgpt.config import Profile


def lr_at(step: int, peak_lr: float, cfg: SchedulerConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based: the first update is step 1).

    Linear warmup gives step 1 ``peak/warmup`` (never 0), reaching the peak at ``warmup_steps``;
    then cosine decay to ``min_lr_ratio * peak`` at ``decay_steps`` (default ``max_steps``), flat
    after that. ``constant`` keeps the peak after warmup."""
    return Schedule(peak_lr, cfg.kind, cfg.warmup_steps, cfg.decay_steps or max_steps, cfg.min_lr_ratio).lr_at(step)


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: ``decay_end`` is a step number, never "whatever max_steps is"."""

    peak_lr: float
    kind: str
    warmup_steps: int
    decay_end: int
    min_lr_ratio: float

    @classmethod
    def from_profile(cls, profile: Profile) -> Schedule:
        s = profile.scheduler
        return cls(profile.optim.lr, s.kind, s.warmup_steps, s.decay_steps or profile.optim.max_steps, s.min_lr_ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(float(d["peak_lr"]), str(d["kind"]), int(d["warmup_steps"]), int(d["decay_end"]),
                   float(d["min_lr_ratio"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        step = max(step, 1)
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        span = max(self.decay_end - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        floor = self.min_lr_ratio * self.peak_lr
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> str:
        if self.kind == "constant":
            return f"peak lr {self.peak_lr:g}, warmup {self.warmup_steps}, then constant"
        return (f"peak lr {self.peak_lr:g}, warmup {self.warmup_steps}, cosine to "
                f"{self.min_lr_ratio:g}x at step {self.decay_end}")


def _saved_schedule(meta: dict[str, Any]) -> Schedule | None:
    """The schedule a checkpoint was trained with (checkpoints before this field existed: from
    their saved config, whose decay end was ``decay_steps or max_steps``)."""
    if isinstance(meta.get("schedule"), dict):
        return Schedule.from_dict(meta["schedule"])
    cfg = meta.get("config") or {}
    try:
        s, o = cfg["scheduler"], cfg["optim"]
        return Schedule(float(o["lr"]), s["kind"], int(s["warmup_steps"]), int(s.get("decay_steps") or o["max_steps"]),
                        float(s["min_lr_ratio"]))
    except (KeyError, TypeError, ValueError):
        return None


def resume_schedule(profile: Profile, meta: dict[str, Any]) -> tuple[Schedule, str | None]:
    """The schedule a resumed run follows, and a one-line notice when it is not the saved one.

    Every field the user did not change keeps its saved value; ``max_steps`` alone never moves the
    decay end. A field whose profile value differs from the saved config's is a deliberate change
    and wins."""
    saved = _saved_schedule(meta)
    fresh = Schedule.from_profile(profile)
    if saved is None:
        return fresh, None
    old_cfg = meta.get("config") or {}
    old_s, old_o = old_cfg.get("scheduler") or {}, old_cfg.get("optim") or {}
    s = profile.scheduler
    chosen = Schedule(
        peak_lr=profile.optim.lr if old_o.get("lr") != profile.optim.lr else saved.peak_lr,
        kind=s.kind if old_s.get("kind") != s.kind else saved.kind,
        warmup_steps=s.warmup_steps if old_s.get("warmup_steps") != s.warmup_steps else saved.warmup_steps,
        decay_end=s.decay_steps if (s.decay_steps and old_s.get("decay_steps") != s.decay_steps) else saved.decay_end,
        min_lr_ratio=s.min_lr_ratio if old_s.get("min_lr_ratio") != s.min_lr_ratio else saved.min_lr_ratio,
    )
    if chosen != saved:
        return chosen, f"schedule changed on resume: was {saved.describe()}; now {chosen.describe()}"
    if fresh.decay_end != saved.decay_end and saved.kind == "cosine":
        return saved, (
            f"continuing the saved schedule ({saved.describe()}); optim.max_steps is now {profile.optim.max_steps}, "
            f"so steps past {saved.decay_end} run at the floor lr (set scheduler.decay_steps to stretch the cosine)"
        )
    return saved, None
