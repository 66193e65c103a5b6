"""When and how training saves: the checkpointer owns saving, rotation and the ``on_saved``
hooks (a Hub push is such a hook, passed in by the caller), so the loop only says
``checkpointer.maybe_save(state, snapshot)``.

A save is due every ``checkpoint.save_interval_steps`` steps and/or every
``checkpoint.save_interval_minutes`` of wall time (either or both); the clock is injectable so
tests can drive it. A failed save (a full disk) is a warning and training continues: the previous
checkpoints are intact, and the next interval tries again.

Background saves (``checkpoint.background``, engines that can gate their updates: streamed). The
fp32 masters and the AdamW state do not change between optimizer steps, so they are written from
the live tensors (no second copy in RAM) by a writer thread while the next step's passes run. The
engine's next update of a chunk waits only until that chunk's tensors are on disk. The files go to
a temporary directory renamed into place at the end, so a SIGKILL at any moment leaves the previous
checkpoint loadable; Ctrl-C and the end of training wait for the write to finish. Rotation, hooks
and the messages of a finished save run on the training thread (:meth:`poll`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

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


def _freeze_scalars(obj: Any) -> Any:
    """A copy of an optimizer state_dict's structure with its 0-d tensors (AdamW's ``step``)
    cloned, so a background writer records this step's values; big tensors stay shared."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.dim() == 0 else obj
    if isinstance(obj, dict):
        return {k: _freeze_scalars(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_freeze_scalars(v) for v in obj)
    return obj


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


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
        status: Callable[[str | None], None] = lambda text: None,
        on_saved: Sequence[SavedHook] = (),
        last_saved_step: int = -1,
        clock: Callable[[], float] = time.monotonic,
        comm: Any = None,
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.engine = engine
        self.tokenizer = tokenizer
        self.context = context
        self.event = event
        self.status = status
        self.on_saved = list(on_saved)
        self.clock = clock
        # several ranks: rank 0 decides when (its clock) and writes; every rank waits at the save
        self.comm = comm
        self.main = comm is None or comm.ctx.main
        self.last_path: Path | None = None
        self.last_step = last_saved_step
        self._last_time = clock()
        self.background = bool(cfg.background) and engine.set_update_gate(self._wait_written)
        self._cv = threading.Condition()
        self._pending: set[int] = set()  # data_ptrs of tensors a background save has not written yet
        self._writer: threading.Thread | None = None
        self._done: list[tuple[int, float, Path | None, RamgptError | None]] = []

    # -- timing ------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        by_steps = self.cfg.save_interval_steps is not None and step % self.cfg.save_interval_steps == 0
        minutes = self.cfg.save_interval_minutes
        by_clock = minutes is not None and self.clock() - self._last_time >= minutes * 60.0
        return by_steps or by_clock

    def maybe_save(self, state: TrainState, snapshot: Snapshot) -> Path | None:
        self.poll()
        due = self.due(state.step)
        if self.comm is not None and self.cfg.save_interval_minutes is not None:
            due = self.comm.broadcast_object(due)  # rank 0's clock decides (steps agree on every rank)
        return self.save(state, snapshot, "interval") if due else None

    # -- saving ------------------------------------------------------------------------------
    def save(self, state: TrainState, snapshot: Snapshot, reason: str, *, wait: bool = False,
             solo: bool = False) -> Path | None:
        """Write a checkpoint of ``state`` (no-op if this step is already saved). In the
        background unless ``wait`` or the engine cannot gate; returns the path once written.
        Several ranks: every rank calls it, rank 0 writes; ``solo`` (after Ctrl-C, when the ranks
        stopped at different points) skips the collectives and saves rank 0's view alone."""
        self.finish()  # one save at a time
        if state.step == self.last_step or state.step <= 0:
            return None
        if self.comm is not None:
            return self._save_ranks(state, snapshot, reason, solo)
        t0 = time.perf_counter()
        self._last_time = self.clock()
        meta = self._meta(state, snapshot, reason)
        model_state = self.engine.state_dict()
        opt_state = _freeze_scalars(self.engine.optimizer_state())
        step = state.step
        if not self.background or wait:
            self._write(step, t0, model_state, opt_state, meta, self.engine.tensor_saved)
            self.poll()
            return self.last_path if self.last_step == step else None
        with self._cv:
            self._pending = {t.data_ptr() for t in (*model_state.values(), *_tensors(opt_state)) if t.numel() > 0}
        self.status(f"saving {ckpt.step_dir_name(step)} in the background")
        self._writer = threading.Thread(target=self._write, args=(step, t0, model_state, opt_state, meta,
                                                                   self._written), name="ramgpt-ckpt", daemon=True)
        self._writer.start()
        return None

    def _save_ranks(self, state: TrainState, snapshot: Snapshot, reason: str, solo: bool) -> Path | None:
        try:
            self.engine.wait_optimizer()  # every owner's update of this step is in the shared state
        except TimeoutError as e:
            self.event("warning", f"no checkpoint at step {state.step}: {e}; the last checkpoint is intact")
            return None
        self._last_time = self.clock()
        rngs = [snapshot.rng] if solo else self.comm.gather_objects(snapshot.rng)
        path = None
        if self.main:
            # every rank's RNG, so a resume on as many ranks draws the same dropout masks
            extra = {"rng_ranks": rngs if len(rngs) > 1 else [], "world_size": self.comm.ctx.world}
            self._write(state.step, time.perf_counter(), self.engine.state_dict(),
                        _freeze_scalars(self.engine.optimizer_state()), self._meta(state, snapshot, reason, extra),
                        self.engine.tensor_saved)
            self.poll()
            path = self.last_path if self.last_step == state.step else None
        else:
            self.last_step = state.step
        if not solo:
            self.comm.barrier()  # nobody updates the shared state while rank 0 reads it
        return path

    def _meta(self, state: TrainState, snapshot: Snapshot, reason: str, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        return {
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
            **(extra or {}),
        }

    def _write(self, step: int, t0: float, model_state: dict, opt_state: Any, meta: dict,
               after_tensor: Callable[[torch.Tensor], None] | None) -> None:
        path, err = None, None
        try:
            path = ckpt.save_checkpoint(self.run_dir, step, model_state, opt_state, meta, self.tokenizer,
                                        after_tensor=after_tensor)
        except RamgptError as e:
            err = e
        finally:
            with self._cv:
                self._pending.clear()  # done or failed: nothing waits on this save any more
                self._done.append((step, time.perf_counter() - t0, path, err))
                self._cv.notify_all()

    def _written(self, t: torch.Tensor) -> None:
        self.engine.tensor_saved(t)
        with self._cv:
            self._pending.discard(t.data_ptr())
            self._cv.notify_all()

    def _wait_written(self, tensors: Iterable[torch.Tensor]) -> None:
        """The engine's update gate: block until none of ``tensors`` is still to be written."""
        ptrs = {t.data_ptr() for t in tensors}
        with self._cv:
            while self._pending & ptrs:
                self._cv.wait()

    def poll(self) -> None:
        """Report finished saves, rotate and run the hooks (on the training thread)."""
        if not self.main:
            return
        with self._cv:
            done, self._done = self._done, []
        for step, seconds, path, err in done:
            self.status(None)
            if err is not None:
                self.event("warning", f"{err} (training continues)")
                continue
            if path is None:  # the write stopped with neither a path nor an error (Ctrl-C in a waited save)
                self.event("warning", f"the checkpoint of step {step} was not written (training continues)")
                continue
            self.last_path, self.last_step = path, step
            how = " in the background" if self.background else ""
            self.event("checkpoint", f"saved {path} in {seconds:.1f}s{how}")
            removed = self._rotate()
            for hook in self.on_saved:
                try:
                    hook(path, step, removed, self.event)
                except Exception as e:  # noqa: BLE001 - a hook never stops training
                    self.event("warning", f"after saving {path.name}: {e} (training continues)")

    def finish(self) -> None:
        """Wait for a background save to be on disk (Ctrl-C, the end of training, the next save)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self.poll()

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
        self.finish()
        for hook in self.on_saved:
            hook.close()
