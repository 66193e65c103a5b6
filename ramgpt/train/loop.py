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
    """Train from ``run.state.step`` to ``max_steps``; True when Ctrl-C stopped it.

    Ctrl-C (SIGINT, in the main thread) asks the loop to stop at the end of the running step and
    save it; a second Ctrl-C stops at once, without a checkpoint of the unfinished step (its update
    may be half done; the last checkpoint stays intact). So a plain Ctrl-C never lands in the
    middle of an update, a save's bookkeeping or a worker thread's handshake. Several ranks agree
    at each step's end, so they all stop after the same step."""
    state, out = run.state, run.out
    in_step = False  # between the engine's step and the snapshot that matches it: nothing to save
    ctrl_c = _CtrlC(out)
    # not where SIGINT is ignored (``nohup``, a background job) or handled from C
    keep = signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None)
    with contextlib.nullcontext() if keep else _sigint(ctrl_c.handle):
        try:
            while state.step < run.max_steps:
                step = state.step + 1
                lr = run.schedule.lr_at(step)
                x, y = run.data.next_batch(run.seqs_per_step)  # the global batch; each rank trains its share
                in_step = True
                report = run.engine.train_step(run.shard(x), run.shard(y), lr, n_tokens=y.numel())
                n_tokens = y.numel()
                loss = report.loss_sum / n_tokens

                state.step, state.tokens_seen = step, state.tokens_seen + n_tokens
                run.snapshot = Snapshot(run.data.state_dict(), capture_rng_state())
                in_step = False
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
                if ctrl_c.agreed(run.comm):
                    _stop_and_save(run, solo=False)  # every rank is here, after the same step
                    return True
            if run.profile.checkpoint.save_final:
                run.checkpointer.save(state, run.snapshot, "final", wait=True)
            return False
        except KeyboardInterrupt:
            if in_step:
                with _sigint_ignored():
                    run.checkpointer.finish()  # a background save of an earlier step completes
                last = run.checkpointer.last_path
                out.event("warning", f"stopped during step {state.step + 1}: no checkpoint of it (its update may be "
                          "half done); " + (f"the last checkpoint is {last}" if last else "no checkpoint was written"))
                out.progress(state.step, tokens_seen=state.tokens_seen, phase=None)
                return True
            _stop_and_save(run, solo=True)  # the ranks may have stopped at different points
            return True


def _stop_and_save(run: Run, solo: bool) -> None:
    """Save the step reached (``checkpoint.save_on_interrupt``) and say so."""
    state, out = run.state, run.out
    out.event("warning", f"interrupted at step {state.step}")
    if run.profile.checkpoint.save_on_interrupt and state.step > 0:
        with _sigint_ignored():  # a further Ctrl-C must not abort the save it is waiting for
            out.event("info", "saving a checkpoint before stopping (Ctrl-C is ignored until it is written)")
            run.checkpointer.finish()  # a background save in progress completes first
            run.checkpointer.save(state, run.snapshot, "interrupt", wait=True, solo=solo)
    out.progress(state.step, tokens_seen=state.tokens_seen, phase=None)


class _CtrlC:
    """The steps' SIGINT handler (:meth:`handle`): the first sets :attr:`requested` (the loop stops
    at the end of the step), a second (a second or more later) raises KeyboardInterrupt where the
    main thread is."""

    MESSAGE = ("Ctrl-C: stopping at the end of this step, then saving a checkpoint "
               "(Ctrl-C again stops now, without one)")

    SAME_PRESS_S = 1.0  # a second SIGINT sooner than this after the first is the same Ctrl-C

    def __init__(self, out: Any):
        self.out = out
        self.requested = False
        self._first = 0.0

    def handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._first < self.SAME_PRESS_S:
                return  # the same press seen twice (torchrun forwards the terminal's SIGINT to its ranks)
            raise KeyboardInterrupt
        self.requested, self._first = True, now
        self.out.event("warning", self.MESSAGE)  # sinks write whole lines in one call each

    def agreed(self, comm: Any) -> bool:
        """Stop now? Several ranks: if any rank was asked (one small all-reduce a step)."""
        if comm is None:
            return self.requested
        return comm.sum_floats(1.0 if self.requested else 0.0)[0] > 0


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
def _sigint(handler: Any) -> Iterator[None]:
    """SIGINT goes to ``handler`` for the duration, then back (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_ignored() -> contextlib.AbstractContextManager[None]:
    """Ignore SIGINT for the duration (main thread only)."""
    return _sigint(signal.SIG_IGN)
