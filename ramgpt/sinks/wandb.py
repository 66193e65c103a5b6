"""Weights & Biases. The ``wandb`` package is imported only when a :class:`WandbSink` is made."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ramgpt.fmt import num
from ramgpt.sinks import MetricSink, MultiSink
from ramgpt.sinks.scrub import scrub_secrets


class WandbSink:
    """Logs to Weights & Biases (``WANDB_MODE=offline`` works without network).

    ``resume_id`` (saved in checkpoints by the caller) continues the same W&B run; the id in
    use is ``.run_id``. Steps never go backwards: a step below the last one sent (or below
    where a resumed W&B run already is) is skipped, since W&B would drop it with a warning.
    Any W&B exception, at init or later, is reported once through ``on_warning`` (default:
    ``warnings.warn``) and the sink becomes a no-op: training never stops because of W&B.
    ``progress`` sends nothing (W&B gets the logged steps only).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        run_dir: str | os.PathLike[str],
        project: str,
        run_name: str | None,
        resume_id: str | None = None,
        *,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self.on_warning = on_warning
        self.run_id: str | None = resume_id
        self.disabled = False
        self.skipped_steps = 0
        self._run: Any = None
        self._min_step = 0  # steps below this are skipped (W&B steps never go backwards)
        self._sent_strings = False
        try:
            import wandb

            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=project,
                name=run_name,
                dir=str(run_dir),
                config=scrub_secrets(dict(config)),
                id=resume_id,  # None: W&B picks a new id
                resume="allow",
                # The panel owns the terminal; W&B's stdout capture would fight rich.Live.
                settings=wandb.Settings(console="off"),
            )
            self.run_id = str(self._run.id)
        except Exception as e:
            self._fail("could not start", e)
            return
        try:
            # run.step is the step of the next log(): a resumed online run already holds the
            # steps below it, and W&B drops (with a warning) anything logged there.
            self._min_step = int(self._run.step or 0)
        except Exception:  # noqa: BLE001 - an old wandb without run.step: start at 0
            self._min_step = 0

    def _fail(self, what: str, e: BaseException) -> None:
        if self.disabled:
            return
        self.disabled = True
        msg = f"W&B {what} ({type(e).__name__}: {e}); W&B logging is off for this run, training continues"
        try:
            if self.on_warning is not None:
                self.on_warning(msg)
            else:
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
        except Exception:  # noqa: BLE001 - reporting must not stop training either
            pass
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already off
                pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.disabled or self._run is None:
            return
        step = int(step)
        if step < self._min_step:
            self.skipped_steps += 1
            return
        try:
            data = {}
            strings = {}
            for k, v in metrics.items():
                if k == "step":
                    continue
                n = num(v)
                if n is not None:
                    data[k] = n
                elif isinstance(v, str):
                    strings[k] = v
            if strings and not self._sent_strings:
                # device/engine are run facts, not series.
                self._run.config.update(strings, allow_val_change=True)
                self._sent_strings = True
            self._run.log(data, step=step)
            self._min_step = step  # the same step again merges into that row, as W&B does
        except Exception as e:
            self._fail("log failed", e)

    def progress(self, step: int, **quick: Any) -> None:
        """Nothing to send: W&B charts the logged steps."""

    def event(self, kind: str, message: str) -> None:
        if self.disabled or self._run is None:
            return
        if kind not in ("checkpoint", "push"):
            return
        try:
            self._run.summary[f"last_{kind}"] = message
        except Exception as e:
            self._fail("summary update failed", e)

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None and not self.disabled:
            try:
                run.finish()
            except Exception as e:
                self._fail("finish failed", e)
        self.disabled = True


def find_wandb_run_id(sinks: Iterable[MetricSink]) -> str | None:
    """The W&B run id to store in checkpoints (None when W&B is off, or a new run failed to start)."""
    for s in sinks:
        if isinstance(s, MultiSink):
            found = find_wandb_run_id(s.sinks)
            if found:
                return found
        elif isinstance(s, WandbSink) and s.run_id:
            return s.run_id  # also when W&B failed on a resume: keep the id for the next one
    return None
