"""When and how training saves: the checkpointer owns saving, rotation and the ``on_saved``
hooks (a Hub push is such a hook, passed in by the caller), so the loop only says
``checkpointer.maybe_save(state, snapshot)``.

A save is due every ``checkpoint.save_interval_steps`` steps and/or every
``checkpoint.save_interval_minutes`` of wall time (either or both); the clock is injectable so
tests can drive it. A failed save (a full disk) is a warning and training continues: the previous
checkpoints are intact, and the next interval tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ramgpt import checkpoint as ckpt
from ramgpt.errors import RamgptError
from ramgpt.train.state import Snapshot, TrainState


class SavedHook(Protocol):
    """Called after every successful save with the new checkpoint, what rotation removed, and the
    run's event function (for one-line reports); ``close()`` runs when training ends."""

    def __call__(self, path: Path, step: int, removed: list[Path], event: Callable[[str, str], None]) -> None: ...

    def close(self) -> None: ...


@dataclass
class SaveContext:
    """What every checkpoint's meta.json records besides the state (fixed for the run)."""

    public_config: dict[str, Any]
    engine_name: str
    precision: str
    schedule: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        cfg: Any,  # CheckpointConfig
        engine: Any,
        tokenizer: Any,
        context: SaveContext,
        *,
        event: Callable[[str, str], None],
        on_saved: Sequence[SavedHook] = (),
        last_saved_step: int = -1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.engine = engine
        self.tokenizer = tokenizer
        self.context = context
        self.event = event
        self.on_saved = list(on_saved)
        self.clock = clock
        self.last_path: Path | None = None
        self.last_step = last_saved_step
        self._last_time = clock()

    # -- timing ------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        by_steps = self.cfg.save_interval_steps is not None and step % self.cfg.save_interval_steps == 0
        minutes = self.cfg.save_interval_minutes
        by_clock = minutes is not None and self.clock() - self._last_time >= minutes * 60.0
        return by_steps or by_clock

    def maybe_save(self, state: TrainState, snapshot: Snapshot) -> Path | None:
        return self.save(state, snapshot, "interval") if self.due(state.step) else None

    # -- saving ------------------------------------------------------------------------------
    def save(self, state: TrainState, snapshot: Snapshot, reason: str) -> Path | None:
        """Write a checkpoint of ``state`` now (no-op if this step is already saved)."""
        if state.step == self.last_step or state.step <= 0:
            return None
        t0 = time.perf_counter()
        meta = {
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "data_state": snapshot.data_state,
            "rng": snapshot.rng,
            "config": self.context.public_config,
            "eval_loss": state.last_eval_loss,
            "train_state": state.to_dict(),
            "loss_scaler": self.engine.scaler_state(),
            "engine": self.context.engine_name,
            "precision": self.context.precision,
            "schedule": self.context.schedule,
            "reason": reason,
            **self.context.extra,
        }
        try:
            path = ckpt.save_checkpoint(
                self.run_dir, state.step, self.engine.state_dict(), self.engine.optimizer_state(), meta, self.tokenizer
            )
        except RamgptError as e:
            self.event("warning", f"{e} (training continues)")
            return None
        self.last_path, self.last_step = path, state.step
        self._last_time = self.clock()
        self.event("checkpoint", f"saved {path} in {time.perf_counter() - t0:.1f}s")
        removed = self._rotate()
        for hook in self.on_saved:
            try:
                hook(path, state.step, removed, self.event)
            except Exception as e:  # noqa: BLE001 - a hook never stops training
                self.event("warning", f"after saving {path.name}: {e} (training continues)")
        return path

    def _rotate(self) -> list[Path]:
        try:
            report = ckpt.prune_checkpoints(self.run_dir, keep_last=self.cfg.keep_last_n, keep_best=True)
        except RamgptError as e:
            self.event("warning", f"checkpoint rotation failed: {e}")
            return []
        if report.removed:
            self.event("info", f"rotated away {len(report.removed)} old checkpoint(s)")
        for p in report.partial_removed:
            why = report.reasons.get(p, "incomplete")
            self.event("warning", f"rotation removed {p.name}, which was not a complete checkpoint ({why})")
        return list(report.removed)

    def close(self) -> None:
        for hook in self.on_saved:
            hook.close()
