"""Plain lines: the display for logs, CI and pipes (no escape codes, nothing redrawn)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ramgpt.fmt import fmt_bytes, fmt_count, fmt_duration, fmt_float, fmt_gbps, fmt_pct, fmt_sci, gib_list, num
from ramgpt.sinks.metrics import VRAM_KEYS, has_transfer, is_gpu_run


class PlainSink:
    """One compact line per log step, e.g.
    ``step 40/120 | loss 5.123 | lr 2.9e-03 | gnorm 0.91 | 12.3k tok/s | 0.84 s/step | rss 1.20 GiB | cpu``.
    Events are lines that start with their kind (``checkpoint: saved ...``). ``progress`` prints
    only what changes the story: a new ``phase`` (``phase: building the model``) or background
    save (``saving: ...``); its step is printed at ``close`` when no logged line showed it (a run
    stopped by Ctrl-C between log steps ends with the step it stopped at)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # None: resolve sys.stderr at write time, so redirections made later are honoured.
        self._stream = stream
        self._closed = False
        self._max_steps: float | None = None
        self._logged_step: int | None = None
        self._step: int | None = None  # of the last log() or progress()
        self._quick: dict[str, Any] = {}

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @staticmethod
    def format_line(metrics: Mapping[str, Any], step: int | None = None) -> str:
        """The line for one log step (pure, for tests and other front ends)."""
        m = metrics
        g = lambda k: num(m.get(k))  # noqa: E731
        parts: list[str] = [_step_text(step if step is not None else m.get("step"), g("max_steps"))]
        if (v := g("loss")) is not None:
            avg = g("loss_avg")
            parts.append(f"loss {fmt_float(v)}" + (f" (avg {fmt_float(avg)})" if avg is not None else ""))
        if (v := g("eval_loss")) is not None:
            parts.append(f"eval {fmt_float(v)}")
        if (v := g("lr")) is not None:
            parts.append(f"lr {fmt_sci(v, 1)}")
        if (v := g("grad_norm")) is not None:
            parts.append(f"gnorm {fmt_float(v, 2)}")
        if (v := g("tokens_per_s")) is not None:
            parts.append(f"{fmt_count(v)} tok/s")
        if (v := g("chars_per_s")) is not None:
            parts.append(f"{fmt_count(v)} chars/s")
        if (v := g("mfu")) is not None:
            parts.append(f"mfu {fmt_pct(v * 100)}")
        if (v := g("step_time_s")) is not None:
            parts.append(f"{fmt_float(v, 2)} s/step")
        if (v := g("optimizer_share")) is not None:
            parts.append(f"opt {fmt_pct(v * 100)}")
        if is_gpu_run(m):
            vram = [g(k) for k in VRAM_KEYS]
            if any(x is not None for x in vram):
                parts.append(f"vram {gib_list(vram)}")
            if (v := g("gpu_util_pct")) is not None:
                parts.append(f"util {fmt_float(v, 0)}%")
        if (v := g("rss_b")) is not None:
            parts.append(f"rss {fmt_bytes(v)}")
        if (v := g("pinned_b")) is not None:
            parts.append(f"pinned {fmt_bytes(v)}")
        if has_transfer(m):
            xfer = []
            if (v := g("h2d_gbps")) is not None:
                xfer.append(f"h2d {fmt_gbps(v)}")
            if (v := g("d2h_gbps")) is not None:
                xfer.append(f"d2h {fmt_gbps(v)}")
            if (v := g("stall_pct")) is not None:
                xfer.append(f"stall {fmt_pct(v)}")
            if xfer:
                parts.append(" ".join(xfer))
        if (v := g("eta_s")) is not None:
            parts.append(f"eta {fmt_duration(v)}")
        where = " ".join(str(m[k]) for k in ("device", "engine") if m.get(k))
        if where:
            parts.append(where)
        return " | ".join(parts)

    @staticmethod
    def format_progress(step: int, max_steps: float | None, quick: Mapping[str, Any]) -> str:
        """The line for a step that was not logged: where the run is, without stale loss numbers."""
        g = lambda k: num(quick.get(k))  # noqa: E731
        parts = [_step_text(step, max_steps)]
        if (v := g("tokens_seen")) is not None:
            parts.append(f"{fmt_count(v)} tokens")
        if (v := g("elapsed_s")) is not None:
            parts.append(f"elapsed {fmt_duration(v)}")
        return " | ".join(parts)

    def _write(self, line: str) -> None:
        if self._closed:
            return
        s = self.stream
        s.write(line + "\n")
        s.flush()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._closed:
            return
        self._max_steps = num(metrics.get("max_steps")) or self._max_steps
        self._step = self._logged_step = int(step)
        self._quick.pop("phase", None)  # a logged step means training runs
        self._write(self.format_line(metrics, step))

    def progress(self, step: int, **quick: Any) -> None:
        if self._closed:
            return
        self._step = int(step)
        for key in ("phase", "saving"):
            if key in quick and quick[key] and quick[key] != self._quick.get(key):
                self._write(f"{key}: {quick[key]}")
        self._quick.update(quick)

    def event(self, kind: str, message: str) -> None:
        self._write(f"{kind}: {message}")

    def close(self) -> None:
        if self._closed:
            return
        if self._step is not None and self._step != self._logged_step and self._step > 0:
            max_steps = self._max_steps or num(self._quick.get("max_steps"))
            self._write(self.format_progress(self._step, max_steps, self._quick))
        self._closed = True


def _step_text(step: Any, max_steps: float | None) -> str:
    return f"step {step}/{int(max_steps)}" if max_steps is not None else f"step {step}"
