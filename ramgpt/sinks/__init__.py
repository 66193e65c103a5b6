"""Metric sinks: where the numbers of a training run go.

Training talks to every sink through the four methods of :class:`MetricSink`:

- ``log(metrics, step)``: once per log step, a flat dict (keys in ``docs/interfaces.md``; a key
  is absent when unknown, so a CPU run has no GPU/transfer keys rather than zeros);
- ``progress(step, **quick)``: on every other step and while the run is between steps. The
  quick fields are ``tokens_seen``, ``elapsed_s``, ``eta_s``, ``device`` (``"cuda"``/``"cpu"``),
  ``engine`` (``"resident"``/``"streamed"``), ``phase`` (what the run does before its first step,
  e.g. ``"building the model"``; None once training runs) and ``saving`` (what is being written
  in the background, else None); any may be left out, and a sink keeps the last value it got;
- ``event(kind, message)``: checkpoint saved, pushed, eval, epoch, warnings (kinds in
  :data:`EVENT_KINDS`); the message never repeats the kind;
- ``close()``: the last call; the display shows the step of the last ``progress``/``log``.

One module per sink: :mod:`~ramgpt.sinks.jsonl` (``metrics.jsonl`` and ``events.jsonl``),
:mod:`~ramgpt.sinks.plain` (one line per log step, for pipes and CI),
:mod:`~ramgpt.sinks.panel` (the rich live panel for terminals),
:mod:`~ramgpt.sinks.wandb` (Weights & Biases). :func:`make_sinks` picks the set for a run;
:class:`MultiSink` fans out. Importing this package imports neither rich nor wandb: the panel
and W&B modules load only when :func:`make_sinks` picks them, so ``train`` never pulls in rich.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, runtime_checkable

from ramgpt.sinks.jsonl import JsonlSink
from ramgpt.sinks.plain import PlainSink

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from ramgpt.config import LoggingConfig

EVENT_KINDS = ("checkpoint", "push", "eval", "warning", "epoch", "info")


@runtime_checkable
class MetricSink(Protocol):
    """What training talks to (see the module docstring for what each call carries)."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def progress(self, step: int, **quick: Any) -> None: ...

    def event(self, kind: str, message: str) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Accepts everything and does nothing (benchmarks, tests, ``--quiet``)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def progress(self, step: int, **quick: Any) -> None:
        pass

    def event(self, kind: str, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class MultiSink:
    """Sends every call to every sink. A sink that raises is reported once (``warnings.warn``
    and a ``warning`` event to the other sinks) and keeps being called: a full disk may clear,
    and one broken display must not cost the metrics file. Ctrl-C (KeyboardInterrupt) is not
    swallowed."""

    def __init__(self, sinks: Iterable[MetricSink]) -> None:
        self.sinks: list[MetricSink] = list(sinks)
        self._warned: set[int] = set()

    def __iter__(self) -> Iterator[MetricSink]:
        return iter(self.sinks)

    def __len__(self) -> int:
        return len(self.sinks)

    def _failed(self, sink: MetricSink, what: str, e: Exception) -> None:
        if id(sink) in self._warned:
            return
        self._warned.add(id(sink))
        msg = f"metrics sink {type(sink).__name__} failed in {what} ({type(e).__name__}: {e}); other sinks continue"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        for other in self.sinks:
            if other is sink:
                continue
            try:
                other.event("warning", msg)
            except Exception:  # noqa: BLE001 - already reported for that sink, or it will be
                pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for s in self.sinks:
            try:
                s.log(metrics, step)
            except Exception as e:
                self._failed(s, "log", e)

    def progress(self, step: int, **quick: Any) -> None:
        for s in self.sinks:
            try:
                s.progress(step, **quick)
            except Exception as e:
                self._failed(s, "progress", e)

    def event(self, kind: str, message: str) -> None:
        for s in self.sinks:
            try:
                s.event(kind, message)
            except Exception as e:
                self._failed(s, "event", e)

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:
                self._failed(s, "close", e)


def _in_ci() -> bool:
    v = os.environ.get("CI", "")
    return bool(v) and v.lower() not in ("0", "false", "no")


def stdout_is_terminal() -> bool:
    """Whether the live panel's stream (stdout) is a terminal; False when it cannot tell."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def wants_panel(tui: str, is_tty: bool) -> bool:
    """``logging.tui`` decides: ``on``/``off`` force it; ``auto`` means a terminal outside CI
    whose TERM can draw (``dumb`` cannot move the cursor)."""
    if tui != "auto":
        return tui == "on"
    return is_tty and not _in_ci() and os.environ.get("TERM") != "dumb"


def make_sinks(
    logging: LoggingConfig,
    run_dir: str | os.PathLike[str],
    public_config: dict[str, Any],
    *,
    wandb_resume_id: str | None = None,
    resume_step: int | None = None,
    title: str | None = None,
    is_tty: bool | None = None,
    console: Console | None = None,
    stream: TextIO | None = None,
) -> list[MetricSink]:
    """The sinks for one run: metrics.jsonl always; the live panel when :func:`wants_panel`,
    else plain lines (to ``stream``, default stderr); W&B when ``logging.use_wandb``.

    ``is_tty`` None means "look": :func:`stdout_is_terminal`. On resume pass ``resume_step``
    (rows logged after it are dropped from metrics.jsonl) and ``wandb_resume_id`` (the
    checkpoint's W&B run id). ``public_config`` is the config W&B records (secrets are scrubbed
    there anyway). ``console`` is the panel's (tests). Wrap the result in :class:`MultiSink`."""
    run_dir = Path(run_dir)
    sinks: list[MetricSink] = [JsonlSink(run_dir, resume_step=resume_step)]
    if is_tty is None:
        is_tty = stdout_is_terminal()
    if wants_panel(logging.tui, is_tty):
        from ramgpt.sinks.panel import LivePanel

        sinks.append(LivePanel(console=console, title=title or f"ramgpt · {run_dir.name}"))
    else:
        sinks.append(PlainSink(stream))
    if logging.use_wandb:
        from ramgpt.sinks.wandb import WandbSink

        others = list(sinks)

        def tell_others(msg: str) -> None:
            for s in others:
                try:
                    s.event("warning", msg)
                except Exception:  # noqa: BLE001 - a broken display must not hide the W&B failure elsewhere
                    pass

        sinks.append(
            WandbSink(
                public_config,
                run_dir,
                project=logging.wandb_project,
                run_name=logging.wandb_run_name or run_dir.name,
                resume_id=wandb_resume_id,
                on_warning=tell_others,
            )
        )
    return sinks


__all__ = [
    "EVENT_KINDS",
    "JsonlSink",
    "MetricSink",
    "MultiSink",
    "NullSink",
    "PlainSink",
    "make_sinks",
    "stdout_is_terminal",
    "wants_panel",
]
