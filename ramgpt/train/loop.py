"""The training loop. :func:`train` sets a run up (:mod:`ramgpt.train.setup`) and
:func:`run_steps` reads like a table of contents: next batch, engine step, metrics, evaluation,
checkpoint; each component decides its own timing.

A notebook user can call ``ramgpt.train.train(load_profile("micro-test"))``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ramgpt.checkpoint import capture_rng_state
from ramgpt.config import Profile
from ramgpt.errors import NonFiniteLossError, OutOfMemoryError, RamgptError, is_out_of_memory
from ramgpt.numerics import ensure_reproducible_env
from ramgpt.train.checkpointer import SavedHook
from ramgpt.train.setup import Run, oom_message, setup_run
from ramgpt.train.state import Snapshot, TrainResult

MAX_NONFINITE_STEPS = 3


def train(profile: Profile, resume: str | None = None, sinks: list | None = None,
          on_saved: Sequence[SavedHook] = ()) -> TrainResult:
    """Train ``profile`` (from scratch, or ``resume`` = "latest" or a checkpoint path) and return
    a summary. ``sinks`` replaces the default metric sinks; ``on_saved`` hooks run after every
    checkpoint (the CLI passes the Hub push here). Raises RamgptError subclasses for user problems."""
    ensure_reproducible_env()
    t_start = time.perf_counter()
    run: Run | None = None
    interrupted = False
    try:
        run = setup_run(profile, resume=resume, sinks=sinks, on_saved=on_saved, t_start=t_start)
        interrupted = run_steps(run)
    except RamgptError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemoryError(oom_message(profile, run.engine if run else None, run.state.step if run else 0)) from e
        raise
    finally:
        if run is not None:
            run.close()
    result = run.result(interrupted, time.perf_counter() - t_start)
    if run.comm is None or run.comm.ctx.main:
        run.run_dir.write_json("last_run.json", result.to_dict())
    return result


def run_steps(run: Run) -> bool:
    """Train from ``run.state.step`` to ``max_steps``; True when Ctrl-C stopped it (after saving)."""
    state, out = run.state, run.out
    try:
        while state.step < run.max_steps:
            step = state.step + 1
            lr = run.schedule.lr_at(step)
            x, y = run.data.next_batch(run.seqs_per_step)  # the global batch; each rank trains its share
            report = run.engine.train_step(run.shard(x), run.shard(y), lr, n_tokens=y.numel())
            n_tokens = y.numel()
            loss = report.loss_sum / n_tokens

            state.step, state.tokens_seen = step, state.tokens_seen + n_tokens
            run.snapshot = Snapshot(run.data.state_dict(), capture_rng_state())
            for ev in run.data.pop_events():
                out.event("epoch", f"{ev} (at step {step})")
            _check_finite(run, step, loss, report)
            run.metrics.record(n_tokens, loss, report.optimizer_time_s)

            eval_loss = run.evaluator.maybe_eval(step)
            if eval_loss is not None:
                state.last_eval_loss = eval_loss
                state.best_eval_loss = min(eval_loss, state.best_eval_loss or math.inf)
            run.metrics.maybe_log(step, state.tokens_seen, loss, lr, report.grad_norm, eval_loss)
            if eval_loss is not None:
                out.event("eval", f"step {step}: eval loss {eval_loss:.4f}")  # after the row: tagged with its step
            run.checkpointer.maybe_save(state, run.snapshot)
        if run.profile.checkpoint.save_final:
            run.checkpointer.save(state, run.snapshot, "final", wait=True)
        return False
    except KeyboardInterrupt:
        out.event("warning", f"interrupted at step {state.step}")
        if run.profile.checkpoint.save_on_interrupt and state.step > 0:
            with _sigint_ignored():  # a second Ctrl-C must not abort the save it is waiting for
                out.event("info", "saving a checkpoint before stopping (Ctrl-C is ignored until it is written)")
                run.checkpointer.finish()  # a background save in progress completes first
                run.checkpointer.save(state, run.snapshot, "interrupt", wait=True, solo=True)
        out.progress(state.step, tokens_seen=state.tokens_seen, phase=None)
        return True


def _check_finite(run: Run, step: int, loss: float, report: Any) -> None:
    """Count non-finite steps (their update was skipped); three in a row stop the run."""
    state, fp16 = run.state, run.placement.precision == "fp16"
    if report.skipped and fp16:
        run.out.event("warning", f"fp16 overflow at step {step}: skipped, loss scale now {report.loss_scale:g}")
    if math.isfinite(loss) and not (report.skipped and not fp16):
        state.nonfinite_streak = 0
        run.last_loss = loss
        return
    state.nonfinite_streak += 1
    run.out.event("warning", f"non-finite loss/gradients at step {step}: update skipped")
    if state.nonfinite_streak >= MAX_NONFINITE_STEPS:
        last = run.checkpointer.last_path
        raise NonFiniteLossError(
            f"loss was NaN/inf for {state.nonfinite_streak} steps in a row (last at step {step}); lower optim.lr "
            f"(now {run.profile.optim.lr}) or optim.grad_clip, or use precision bf16"
            + (f"; last checkpoint: {last}" if last else "")
        )


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
