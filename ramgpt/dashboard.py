"""Metric sinks: where the numbers of a training run go.

Training hands every sink the same flat dict once per log step (keys in ``docs/interfaces.md``;
a key is absent when unknown, so a CPU run has no GPU/transfer keys rather than zeros) and a few
events (checkpoint saved, pushed, warnings). A sink has three methods::

    log(metrics: dict, step: int) -> None
    event(kind: str, message: str) -> None
    close() -> None

Sinks here:

- :class:`JsonlSink`: ``metrics.jsonl`` (one object per logged step) and ``events.jsonl``.
- :class:`PlainSink`: one compact line per step, for logs, CI and pipes (no ANSI codes).
- :class:`LivePanel`: a rich live panel for terminals; renders at most a few times a second.
- :class:`WandbSink`: Weights & Biases (``WANDB_MODE=offline`` works without network); any
  W&B failure warns once and turns the sink into a no-op.
- :class:`MultiSink`: fans out and keeps one broken sink from stopping the others.

:func:`make_sinks` picks the set for a run from ``LoggingConfig``. ``train.py`` never imports
rich; display is only ever a sink.
"""

from __future__ import annotations

import atexit
import io
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.segment import Segment
from rich.text import Text

EVENT_KINDS = ("checkpoint", "push", "eval", "warning", "epoch", "info")


@runtime_checkable
class MetricSink(Protocol):
    """What training talks to."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def event(self, kind: str, message: str) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Accepts everything and does nothing (benchmarks, tests, ``--quiet``)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def event(self, kind: str, message: str) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Number formatting shared by the plain lines and the panel, so both show the same numbers.


def _num(v: Any) -> float | None:
    """A finite-or-not float, or None for absent / non-numeric values (bools are not numbers)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    item = getattr(v, "item", None)  # 0-d tensors and numpy scalars
    if callable(item):
        try:
            return float(item())
        except Exception:
            return None
    return None


def fmt_bytes(b: float) -> str:
    """Binary units (GiB), as the VRAM budget is given in GiB."""
    if not math.isfinite(b):
        return str(b)
    n = abs(b)
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div * 0.95:
            return f"{b / div:.1f} {unit}"
    return f"{int(b)} B"


def fmt_count(n: float) -> str:
    """12345 -> 12.3k; 1.5e9 -> 1.50B."""
    if not math.isfinite(n):
        return str(n)
    a = abs(n)
    if a >= 1e9:
        return f"{n / 1e9:.2f}B"
    if a >= 1e6:
        return f"{n / 1e6:.2f}M"
    if a >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def fmt_duration(s: float) -> str:
    """Seconds -> H:MM:SS (with days when long); '?' when unknown."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    core = f"{h}:{m:02d}:{s:02d}"
    return f"{d}d {core}" if d else core


def fmt_float(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def fmt_pct(v: float) -> str:
    return f"{v:.1f}%" if math.isfinite(v) else str(v)


def fmt_gbps(v: float) -> str:
    return f"{v:.1f} GB/s" if math.isfinite(v) else str(v)


_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Iterable[float], width: int = 24) -> str:
    """The recent trend of a series in block characters (non-finite values show as '!')."""
    vals = list(values)[-width:]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return "!" * len(vals)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append("!")
        elif span <= 0:
            out.append(_SPARK[len(_SPARK) // 2])
        else:
            out.append(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * (len(_SPARK) - 1) + 0.5))])
    return "".join(out)


def _is_gpu(m: Mapping[str, Any]) -> bool:
    dev = str(m.get("device") or "")
    return dev.startswith("cuda") or any(k in m for k in ("vram_allocated_b", "vram_reserved_b", "vram_total_b"))


_TRANSFER_KEYS = ("h2d_bytes", "d2h_bytes", "h2d_gbps", "d2h_gbps", "stall_s", "stall_pct")


def _has_transfer(m: Mapping[str, Any]) -> bool:
    return any(_num(m.get(k)) is not None for k in _TRANSFER_KEYS)


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def _jsonable(v: Any) -> Any:
    """JSON-safe value: non-finite floats become null (strict JSON readers reject NaN)."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    n = _num(v)
    if n is not None:
        return _jsonable(n)
    return str(v)


class JsonlSink:
    """``RUN_DIR/metrics.jsonl``: one JSON object per logged step (every key given, plus
    ``step`` and ``time``), flushed per line so a crash loses at most the line being written.
    Events go to ``RUN_DIR/events.jsonl`` so the metrics file stays one row per step.
    Files are appended to. On resume pass ``resume_step``: rows logged after it (by the run
    that was interrupted) are dropped first, so the file holds each step once. (Calling
    :meth:`truncate_after` on files an open sink appends to would lose its later rows: the
    rewrite replaces the file under it.)"""

    METRICS_FILE = "metrics.jsonl"
    EVENTS_FILE = "events.jsonl"

    def __init__(self, run_dir: str | os.PathLike[str], *, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / self.METRICS_FILE
        self.events_path = self.run_dir / self.EVENTS_FILE
        if resume_step is not None:
            self.truncate_after(self.run_dir, resume_step)
        self._metrics: TextIO | None = open(self.metrics_path, "a", encoding="utf-8")
        self._events: TextIO | None = None  # opened on the first event
        self._last_step: int | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._metrics is None:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in metrics.items() if k != "step"})
        row["time"] = round(time.time(), 3)
        self._metrics.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._metrics.flush()
        self._last_step = int(step)

    def event(self, kind: str, message: str) -> None:
        if self._metrics is None:  # closed
            return
        if self._events is None:
            self._events = open(self.events_path, "a", encoding="utf-8")
        row = {"event": kind, "message": message, "step": self._last_step, "time": round(time.time(), 3)}
        self._events.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._events.flush()

    def close(self) -> None:
        for f in (self._metrics, self._events):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._metrics = self._events = None

    @staticmethod
    def truncate_after(path: str | os.PathLike[str], step: int) -> int:
        """Keep only rows with ``step <= step`` (and drop unparseable lines, e.g. the half line
        a crash left). ``path`` is a jsonl file, or a run directory: then both metrics.jsonl
        and events.jsonl are cut (events without a step are kept). The file is rewritten under
        a temporary name and renamed, so a crash here never loses the rows that are kept.
        Returns how many rows were dropped."""
        p = Path(path)
        if p.is_dir():
            return sum(JsonlSink.truncate_after(p / n, step) for n in (JsonlSink.METRICS_FILE, JsonlSink.EVENTS_FILE))
        if not p.is_file():
            return 0
        kept: list[str] = []
        dropped = 0
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                s = line.strip()
                if not s:
                    continue
                try:
                    row = json.loads(s)
                    row_step = row.get("step") if isinstance(row, dict) else None
                except ValueError:
                    dropped += 1
                    continue
                if row_step is not None and not (isinstance(row_step, (int, float)) and row_step <= step):
                    dropped += 1
                    continue
                kept.append(s + "\n")
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return dropped


# ---------------------------------------------------------------------------------------------
# Plain lines


class PlainSink:
    """One compact line per log step, e.g.
    ``step 40/120 | loss 5.123 | lr 2.9e-03 | gnorm 0.91 | 12.3k tok/s | 0.84 s/step | rss 1.2 GiB | cpu``.
    For non-terminals (files, CI, pipes): plain text, no escape codes. Events are lines that
    start with their kind (``checkpoint: saved ...``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # None: resolve sys.stderr at write time, so redirections made later are honoured.
        self._stream = stream
        self._closed = False

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @staticmethod
    def format_line(metrics: Mapping[str, Any], step: int | None = None) -> str:
        """The line for one log step (pure, for tests and other front ends)."""
        m = metrics
        g = lambda k: _num(m.get(k))  # noqa: E731
        parts: list[str] = []
        st = step if step is not None else m.get("step")
        mx = g("max_steps")
        parts.append(f"step {st}/{int(mx)}" if mx is not None else f"step {st}")
        if (v := g("loss")) is not None:
            avg = g("loss_avg")
            parts.append(f"loss {fmt_float(v)}" + (f" (avg {fmt_float(avg)})" if avg is not None else ""))
        if (v := g("eval_loss")) is not None:
            parts.append(f"eval {fmt_float(v)}")
        if (v := g("lr")) is not None:
            parts.append(f"lr {v:.1e}")
        if (v := g("grad_norm")) is not None:
            parts.append(f"gnorm {fmt_float(v, 2)}")
        if (v := g("tokens_per_s")) is not None:
            parts.append(f"{fmt_count(v)} tok/s")
        if (v := g("mfu")) is not None:
            parts.append(f"mfu {fmt_pct(v * 100)}")
        if (v := g("step_time_s")) is not None:
            parts.append(f"{v:.2f} s/step")
        if (v := g("optimizer_share")) is not None:
            parts.append(f"opt {fmt_pct(v * 100)}")
        if _is_gpu(m):
            vram = [g(k) for k in ("vram_allocated_b", "vram_reserved_b", "vram_budget_b")]
            if any(x is not None for x in vram):
                shown = "/".join(f"{x / (1 << 30):.1f}" if x is not None else "?" for x in vram)
                parts.append(f"vram {shown} GiB")
            if (v := g("gpu_util_pct")) is not None:
                parts.append(f"util {v:.0f}%")
        if (v := g("rss_b")) is not None:
            parts.append(f"rss {fmt_bytes(v)}")
        if (v := g("pinned_b")) is not None:
            parts.append(f"pinned {fmt_bytes(v)}")
        if _has_transfer(m):
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

    def _write(self, line: str) -> None:
        if self._closed:
            return
        s = self.stream
        s.write(line + "\n")
        s.flush()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._write(self.format_line(metrics, step))

    def event(self, kind: str, message: str) -> None:
        self._write(f"{kind}: {message}")

    def close(self) -> None:
        self._closed = True


# ---------------------------------------------------------------------------------------------
# Rich live panel


class _Body:
    """The panel's rows: a section label, then that section's items laid out left to right
    and wrapped between items, never inside one (so "grad norm 0.91" is not split on a narrow
    terminal). Drawn straight to segments: a rich Table here cost several milliseconds per
    redraw in measuring columns, paid by training on every refresh."""

    SEP = "  ·  "
    LABEL_WIDTH = 11

    def __init__(self, rows: list[tuple[str, list[Text], bool]]) -> None:
        # (label, pieces, pieces_are_lines): items joined with SEP, or whole lines (events).
        self.rows = rows

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.LABEL_WIDTH + 20, options.max_width)

    def _lines(self, console: Console, pieces: list[Text], as_lines: bool, width: int) -> list[Text]:
        if as_lines:
            out: list[Text] = []
            for piece in pieces:
                out.extend(piece.wrap(console, width) if piece.cell_len > width else [piece])
            return out
        lines: list[Text] = []
        line = Text()
        for item in pieces:
            if line.cell_len and line.cell_len + len(self.SEP) + item.cell_len > width:
                lines.append(line)
                line = Text()
            if line.cell_len:
                line.append(self.SEP, style="dim")
            line.append(item)
        lines.append(line)
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        width = max(10, options.max_width - self.LABEL_WIDTH)
        label_style = console.get_style("bold cyan")
        blank = Segment(" " * self.LABEL_WIDTH)
        newline = Segment.line()
        for label, pieces, as_lines in self.rows:
            for n, line in enumerate(self._lines(console, pieces, as_lines, width)):
                if n == 0:
                    yield Segment(label.ljust(self.LABEL_WIDTH)[: self.LABEL_WIDTH], label_style)
                else:
                    yield blank
                yield from line.render(console)
                yield newline


class _RightMargin:
    """Draws its content two columns narrower than the terminal. A line that fills the last
    column leaves the cursor in the terminal's pending-wrap state; the "^C" the terminal
    echoes on Ctrl-C would then start a new line and the final redraw would land one line
    too low, leaving a stray copy of the panel's top border."""

    def __init__(self, renderable: RenderableType, margin: int = 2) -> None:
        self.renderable = renderable
        self.margin = margin

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(20, options.max_width - self.margin)
        yield from console.render(self.renderable, options.update_width(width))


class LivePanel:
    """A live terminal panel: progress, learning, speed, GPU, CPU, transfer streams, events.

    ``log()`` only stores the numbers; the panel is rebuilt and redrawn at most
    ``refresh_per_second`` times a second, and less often if drawing is slow: the interval
    grows so that drawing takes at most ``max_overhead`` of wall time (training pays for every
    millisecond spent here). The live display starts on the first ``log``/``event`` (so
    building the sink set never touches the terminal) and ``close()`` stops it, leaving the
    final panel on screen and the cursor visible, also after Ctrl-C. Use it as a context
    manager, or call ``close()`` in a ``finally``.
    """

    # Kinds of which only the newest matters; the rest (warnings, info) keep a short history
    # that routine events cannot push out.
    _LATEST_ONLY = ("checkpoint", "push", "eval", "epoch")

    def __init__(
        self,
        console: Console | None = None,
        *,
        title: str = "ramgpt",
        refresh_per_second: float = 4.0,
        max_overhead: float = 0.005,
        history: int = 32,
        max_messages: int = 4,
    ) -> None:
        self.console = console if console is not None else Console()
        self.title = title
        self.refresh_per_second = float(refresh_per_second)
        self.max_overhead = float(max_overhead)
        self._min_interval = 1.0 / self.refresh_per_second
        self._loss_history: deque[float] = deque(maxlen=history)
        self._latest: dict[str, Any] = {}
        self._last_eval: tuple[float, int] | None = None
        self._last_by_kind: dict[str, tuple[float, int | None, str]] = {}
        self._messages: deque[tuple[float, int | None, str, str]] = deque(maxlen=max_messages)
        self._step: int | None = None
        self._live: Any = None
        self._closed = False
        self._dirty = False
        self._last_refresh = float("-inf")
        self.refresh_count = 0
        self.refresh_cost_s: float | None = None  # typical cost of one rebuild + redraw
        self._costs: deque[float] = deque(maxlen=9)

    # -- sink protocol -----------------------------------------------------------------------

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._closed:
            return
        m = dict(metrics)
        m["step"] = step
        self._step = step
        loss = _num(m.get("loss"))
        if loss is not None:
            self._loss_history.append(loss)
        ev = _num(m.get("eval_loss"))
        if ev is not None:
            self._last_eval = (ev, step)
        self._latest = m
        self._changed()

    def progress(self, step: int, **quick: Any) -> None:
        """Between logged steps: move the step counter, elapsed, ETA and tokens (no new loss
        point, no metrics.jsonl row). Cheap: it only stores the numbers; redraws stay throttled."""
        if self._closed or not self._latest:
            return
        m = dict(self._latest)
        m.update(quick)
        m["step"] = step
        self._step = step
        self._latest = m
        self._changed()

    def event(self, kind: str, message: str) -> None:
        if self._closed:
            return
        entry = (time.time(), self._step, kind, message)
        if kind in self._LATEST_ONLY:
            self._last_by_kind[kind] = entry[:2] + (message,)
        else:
            self._messages.append(entry)
        self._changed()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        live, self._live = self._live, None
        if live is None:
            return
        try:
            if self._dirty:
                live.update(self.render(self._latest), refresh=True)
        except Exception:
            pass
        finally:
            try:
                live.stop()
            finally:
                try:
                    self.console.show_cursor(True)
                except Exception:
                    pass
                atexit.unregister(self.close)

    def __enter__(self) -> LivePanel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- drawing -----------------------------------------------------------------------------

    def start(self) -> None:
        """Take over the terminal (idempotent). Called lazily by ``log``/``event``."""
        if self._live is not None or self._closed:
            return
        from rich.live import Live

        self._live = Live(
            self.render(self._latest),
            console=self.console,
            auto_refresh=False,  # we redraw ourselves, throttled, from log()/event()
            transient=False,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._live.start(refresh=True)
        # If the caller forgets close() (an uncaught exception), still restore the cursor.
        atexit.register(self.close)

    def _changed(self) -> None:
        self._dirty = True
        if self._live is None:
            self.start()
            self._last_refresh = time.monotonic()
            self._dirty = False
            return
        now = time.monotonic()
        if now - self._last_refresh >= self._min_interval:
            self.refresh(now)

    def refresh(self, now: float | None = None) -> None:
        """Rebuild and redraw now, and adapt the throttle to how long that took."""
        if self._live is None:
            return
        t0 = time.perf_counter()
        self._live.update(self.render(self._latest), refresh=True)
        self._costs.append(time.perf_counter() - t0)
        # Median of recent redraws: one slow first draw (imports, cold caches) or a busy moment
        # must not stretch the interval for the rest of the run.
        self.refresh_cost_s = statistics.median(self._costs)
        self._min_interval = max(1.0 / self.refresh_per_second, self.refresh_cost_s / self.max_overhead)
        self._last_refresh = time.monotonic() if now is None else now
        self._dirty = False
        self.refresh_count += 1

    # -- the picture (pure) --------------------------------------------------------------------

    def render(self, metrics: Mapping[str, Any] | None = None) -> RenderableType:
        """The panel for ``metrics`` (default: the latest logged) plus the event history."""
        m: Mapping[str, Any] = self._latest if metrics is None else metrics
        g = lambda k: _num(m.get(k))  # noqa: E731

        gpu = _is_gpu(m)
        events = self._events()
        rows = [
            ("progress", self._progress(m, g), False),
            ("learning", self._learning(m, g), False),
            ("speed", self._speed(g), False),
            ("GPU", self._gpu(g) if gpu else [Text("CPU run — no GPU", style="dim")], False),
            ("CPU", self._cpu(g), False),
            ("transfer", self._transfer(m, g, gpu), False),
            ("events", events, True),
        ]

        where = " · ".join(str(m[k]) + (" engine" if k == "engine" else "") for k in ("device", "engine") if m.get(k))
        title = f"[bold]{self.title}[/]" + (f" · {where}" if where else "")
        return _RightMargin(Panel(_Body(rows), title=title, title_align="left", border_style="blue", padding=(0, 1)))

    @staticmethod
    def _join(parts: list[Text | str]) -> list[Text]:
        return [p if isinstance(p, Text) else Text(p) for p in parts]

    def _progress(self, m: Mapping[str, Any], g: Callable[[str], float | None]) -> list[Text]:
        step = m.get("step", self._step)
        mx = g("max_steps")
        parts: list[Text | str] = []
        if step is None:
            return [Text("waiting for the first step", style="dim")]
        if mx:
            frac = max(0.0, min(1.0, float(step) / mx))
            width = 20
            filled = int(frac * width)
            bar = Text()
            bar.append("━" * filled, style="green")
            bar.append("━" * (width - filled), style="grey37")
            head = Text(f"step {step}/{int(mx)} ({frac * 100:.0f}%) ")
            head.append(bar)
            parts.append(head)
        else:
            parts.append(f"step {step}")
        if (v := g("elapsed_s")) is not None:
            parts.append(f"elapsed {fmt_duration(v)}")
        if (v := g("eta_s")) is not None:
            parts.append(f"ETA {fmt_duration(v)}")
        if (v := g("tokens_seen")) is not None:
            parts.append(f"tokens {fmt_count(v)}")
        if (v := g("epoch")) is not None:
            parts.append(f"epoch {int(v)}")
        return self._join(parts)

    def _learning(self, m: Mapping[str, Any], g: Callable[[str], float | None]) -> list[Text]:
        parts: list[Text | str] = []
        if (v := g("loss")) is not None:
            t = Text("loss ")
            t.append(fmt_float(v), style="bold" if math.isfinite(v) else "bold red")
            if (avg := g("loss_avg")) is not None:
                t.append(f" (avg {fmt_float(avg)})")
            if len(self._loss_history) > 1:
                t.append(" " + sparkline(self._loss_history, 20), style="magenta")
            parts.append(t)
        ev = g("eval_loss")
        if ev is not None:
            parts.append(f"eval {fmt_float(ev)}")
        elif self._last_eval is not None:
            parts.append(f"eval {fmt_float(self._last_eval[0])} (step {self._last_eval[1]})")
        if (v := g("lr")) is not None:
            parts.append(f"lr {v:.2e}")
        if (v := g("grad_norm")) is not None:
            parts.append(f"grad norm {fmt_float(v, 2)}")
        return self._join(parts) if parts else [Text("—", style="dim")]

    def _speed(self, g: Callable[[str], float | None]) -> list[Text]:
        parts: list[Text | str] = []
        if (v := g("tokens_per_s")) is not None:
            parts.append(f"{fmt_count(v)} tok/s")
        if (v := g("mfu")) is not None:
            parts.append(f"MFU {fmt_pct(v * 100)}")
        if (v := g("step_time_s")) is not None:
            parts.append(f"{v:.2f} s/step")
        opt_t, share = g("optimizer_time_s"), g("optimizer_share")
        if opt_t is not None or share is not None:
            s = "optimizer"
            if opt_t is not None:
                s += f" {opt_t:.2f} s"
            if share is not None:
                s += f" ({fmt_pct(share * 100)} of step)"
            parts.append(s)
        return self._join(parts) if parts else [Text("—", style="dim")]

    def _gpu(self, g: Callable[[str], float | None]) -> list[Text]:
        parts: list[Text | str] = []
        alloc, res, peak = g("vram_allocated_b"), g("vram_reserved_b"), g("vram_peak_reserved_b")
        budget, total = g("vram_budget_b"), g("vram_total_b")
        if alloc is not None:
            parts.append(f"VRAM {fmt_bytes(alloc)} allocated")
        if res is not None:
            s = f"{fmt_bytes(res)} reserved"
            if peak is not None:
                s += f" (peak {fmt_bytes(peak)})"
            style = "bold red" if budget is not None and res > budget else ""
            parts.append(Text(s, style=style))
        if budget is not None:
            parts.append(f"budget {fmt_bytes(budget)}")
        if total is not None:
            parts.append(f"card {fmt_bytes(total)}")
        if (v := g("gpu_util_pct")) is not None:
            parts.append(f"util {v:.0f}%")
        else:
            parts.append(Text("util: NVML not available", style="dim"))
        return self._join(parts)

    def _cpu(self, g: Callable[[str], float | None]) -> list[Text]:
        parts: list[Text | str] = []
        if (v := g("rss_b")) is not None:
            parts.append(f"RSS {fmt_bytes(v)}")
        if (v := g("pinned_b")) is not None:
            parts.append(f"pinned {fmt_bytes(v)}")
        avail, total = g("ram_available_b"), g("ram_total_b")
        if avail is not None:
            parts.append(f"RAM available {fmt_bytes(avail)}" + (f" of {fmt_bytes(total)}" if total else ""))
        return self._join(parts) if parts else [Text("—", style="dim")]

    def _transfer(self, m: Mapping[str, Any], g: Callable[[str], float | None], gpu: bool) -> list[Text]:
        if not gpu:
            return [Text("no streaming (CPU run)", style="dim")]
        if not _has_transfer(m):
            engine = m.get("engine") or "resident"
            return [Text(f"no streaming ({engine} engine)", style="dim")]
        parts: list[Text | str] = []
        link = g("link_gbps")
        for name in ("h2d", "d2h"):
            b, rate = g(f"{name}_bytes"), g(f"{name}_gbps")
            if b is None and rate is None:
                continue
            s = name.upper()
            if b is not None:
                s += f" {fmt_bytes(b)}/step"
            if rate is not None:
                s += f" at {fmt_gbps(rate)}"
                if link:
                    s += f" ({rate / link * 100:.0f}% of link)"
            parts.append(s)
        if link is not None:
            parts.append(f"link {fmt_gbps(link)} measured")
        stall_pct, stall_s = g("stall_pct"), g("stall_s")
        if stall_pct is not None or stall_s is not None:
            s = "stall"
            if stall_pct is not None:
                s += f" {fmt_pct(stall_pct)}"
            if stall_s is not None:
                s += f" ({stall_s:.2f} s)"
            parts.append(Text(s, style="yellow" if (stall_pct or 0) >= 20 else ""))
        return self._join(parts)

    def _events(self) -> list[Text]:
        lines: list[Text] = []

        def stamp(t: float, step: int | None) -> str:
            at = time.strftime("%H:%M:%S", time.localtime(t))
            return f"  ({at}" + (f", step {step})" if step is not None else ")")

        for kind in self._LATEST_ONLY:
            if kind in self._last_by_kind:
                t, step, msg = self._last_by_kind[kind]
                line = Text(f"{kind}: ", style="bold green" if kind in ("checkpoint", "push") else "bold")
                line.append(msg)
                line.append(stamp(t, step), style="dim")
                lines.append(line)
        for t, step, kind, msg in self._messages:
            style = {"warning": "bold yellow", "eval": "bold", "info": "bold"}.get(kind, "bold")
            line = Text(f"{kind}: ", style=style)
            line.append(msg)
            line.append(stamp(t, step), style="dim")
            lines.append(line)
        return lines or [Text("none yet", style="dim")]


# ---------------------------------------------------------------------------------------------
# Weights & Biases

_SECRET_PARTS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}


def _is_secret_key(name: str) -> bool:
    """True for names like hf_token, api_key, wandbApiKey, db_password; False for config fields
    that merely contain the letters (tokenizer, loss_chunk_tokens)."""
    low = str(name).lower()
    if "api_key" in low or "apikey" in low or "secret" in low or "password" in low:
        return True
    # camelCase -> snake, then compare whole words so "tokens"/"tokenizer" stay.
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name)).lower()
    return any(part in _SECRET_PARTS for part in re.split(r"[^a-z0-9]+", snake) if part)


def scrub_secrets(config: Any) -> Any:
    """A copy of ``config`` without keys that name secrets, at any depth. Profiles hold no
    secrets; this guards against a future field or a user dict that does."""
    if isinstance(config, Mapping):
        return {k: scrub_secrets(v) for k, v in config.items() if not _is_secret_key(str(k))}
    if isinstance(config, (list, tuple)):
        return [scrub_secrets(v) for v in config]
    return config


class WandbSink:
    """Logs to Weights & Biases. ``wandb`` is imported only here, when W&B is enabled.

    ``resume_id`` (saved in checkpoints by the caller) continues the same W&B run; the id in
    use is ``.run_id``. Steps never go backwards: a step below the last one sent (or below
    where a resumed W&B run already is) is skipped, since W&B would drop it with a warning.
    Any W&B exception, at init or later, is reported once through ``on_warning`` (default:
    ``warnings.warn``) and the sink becomes a no-op: training never stops because of W&B.
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
        except Exception:
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
        except Exception:
            pass
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
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
                n = _num(v)
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


# ---------------------------------------------------------------------------------------------
# Fan-out


class MultiSink:
    """Sends everything to every sink. A sink that raises is reported once (``warnings.warn``
    and a ``warning`` event to the other sinks) and keeps being called: a full disk may clear,
    and one broken display must not cost the metrics file. Ctrl-C (KeyboardInterrupt) is not
    swallowed."""

    def __init__(self, sinks: Iterable[Any]) -> None:
        self.sinks: list[Any] = list(sinks)
        self._warned: set[int] = set()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.sinks)

    def __len__(self) -> int:
        return len(self.sinks)

    def _failed(self, sink: Any, what: str, e: Exception) -> None:
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
            except Exception:
                pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for s in self.sinks:
            try:
                s.log(metrics, step)
            except Exception as e:
                self._failed(s, "log", e)

    def event(self, kind: str, message: str) -> None:
        for s in self.sinks:
            try:
                s.event(kind, message)
            except Exception as e:
                self._failed(s, "event", e)

    def progress(self, step: int, **quick: Any) -> None:
        """Per-step progress for sinks that show it (the live panel); others have no such method."""
        for s in self.sinks:
            fn = getattr(s, "progress", None)
            if fn is None:
                continue
            try:
                fn(step, **quick)
            except Exception as e:
                self._failed(s, "progress", e)

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:
                self._failed(s, "close", e)

    @property
    def wandb_run_id(self) -> str | None:
        return find_wandb_run_id(self.sinks)


def find_wandb_run_id(sinks: Iterable[Any]) -> str | None:
    """The W&B run id to store in checkpoints (None when W&B is off, or a new run failed to start)."""
    for s in sinks:
        if isinstance(s, MultiSink):
            found = s.wandb_run_id
            if found:
                return found
        elif isinstance(s, WandbSink) and s.run_id:
            return s.run_id  # also when W&B failed on a resume: keep the id for the next one
    return None


def _in_ci() -> bool:
    v = os.environ.get("CI", "")
    return bool(v) and v.lower() not in ("0", "false", "no")


def make_sinks(
    logging_cfg: Any,
    run_dir: str | os.PathLike[str],
    config_dict: Mapping[str, Any],
    *,
    is_tty: bool | None = None,
    wandb_resume_id: str | None = None,
    resume_step: int | None = None,
    console: Console | None = None,
    stream: TextIO | None = None,
    title: str | None = None,
) -> list[Any]:
    """The sinks for one run: metrics.jsonl always; the live panel when ``logging.tui`` is
    ``on``, or ``auto`` on a terminal outside CI, else plain lines; W&B when ``use_wandb``.
    ``is_tty`` defaults to ``sys.stdout.isatty()``. On resume pass ``resume_step`` (metrics.jsonl
    rows after it are dropped) and ``wandb_resume_id`` (the checkpoint's W&B run id).
    Wrap the result in :class:`MultiSink`."""
    run_dir = Path(run_dir)
    sinks: list[Any] = [JsonlSink(run_dir, resume_step=resume_step)]
    tui = getattr(logging_cfg, "tui", "auto")
    if is_tty is None:
        try:
            is_tty = sys.stdout.isatty()
        except (AttributeError, ValueError):
            is_tty = False
    use_panel = tui == "on" or (tui == "auto" and is_tty and not _in_ci() and os.environ.get("TERM") != "dumb")
    if use_panel:
        sinks.append(LivePanel(console=console, title=title or f"ramgpt · {run_dir.name}"))
    else:
        sinks.append(PlainSink(stream))
    if getattr(logging_cfg, "use_wandb", False):
        others = list(sinks)

        def tell_others(msg: str) -> None:
            for s in others:
                try:
                    s.event("warning", msg)
                except Exception:
                    pass

        sinks.append(
            WandbSink(
                config_dict,
                run_dir,
                project=getattr(logging_cfg, "wandb_project", "ramgpt"),
                run_name=getattr(logging_cfg, "wandb_run_name", None) or run_dir.name,
                resume_id=wandb_resume_id,
                on_warning=tell_others,
            )
        )
    return sinks


# ---------------------------------------------------------------------------------------------
# Overhead measurement


def fake_metrics(step: int, max_steps: int, gpu: bool = True) -> dict[str, Any]:
    """A plausible metrics dict (GPU + streamed, or a CPU run) for benchmarks, tests and demos."""
    m: dict[str, Any] = {
        "step": step,
        "max_steps": max_steps,
        "epoch": 0,
        "tokens_seen": step * 8192,
        "elapsed_s": step * 0.5,
        "eta_s": (max_steps - step) * 0.5,
        "loss": 10.0 / (1 + step * 0.01),
        "loss_avg": 10.0 / (1 + step * 0.01) + 0.05,
        "lr": 6e-4,
        "grad_norm": 0.9,
        "tokens_per_s": 16384.0,
        "step_time_s": 0.5,
        "optimizer_time_s": 0.05,
        "optimizer_share": 0.1,
        "rss_b": 3 << 30,
        "pinned_b": 2 << 30,
        "ram_available_b": 20 << 30,
        "ram_total_b": 32 << 30,
        "device": "cuda" if gpu else "cpu",
        "engine": "streamed" if gpu else "resident",
    }
    if gpu:
        m.update(
            {
                "mfu": 0.31,
                "vram_allocated_b": 3 << 30,
                "vram_reserved_b": 4 << 30,
                "vram_peak_reserved_b": 5 << 30,
                "vram_budget_b": 6 << 30,
                "vram_total_b": 8 << 30,
                "gpu_util_pct": 87.0,
                "h2d_bytes": 4 << 30,
                "d2h_bytes": 2 << 30,
                "h2d_gbps": 11.2,
                "d2h_gbps": 9.8,
                "link_gbps": 12.5,
                "stall_s": 0.02,
                "stall_pct": 3.1,
            }
        )
    return m


def measure_panel_overhead(n: int = 2000) -> dict[str, float]:
    """Cost of ``LivePanel.log`` (recording console, throttled refresh) against a no-op sink.

    Returns µs per ``log()`` for both (and their difference), the number of redraws done and
    the cost of one redraw in ms (mean, and the median the throttle uses), and
    ``worst_share_pct``: the most wall time redraws can take (typical redraw cost / the
    throttle's minimum interval; by construction at most ``max_overhead`` = 0.5%, or less when
    redraws are so cheap that the 4-per-second cap binds first)."""
    metrics = [fake_metrics(i, n) for i in range(1, n + 1)]

    def run(sink: Any) -> float:
        t0 = time.perf_counter()
        for i, m in enumerate(metrics, 1):
            sink.log(m, i)
        return time.perf_counter() - t0

    noop_s = run(NullSink())
    console = Console(record=True, file=io.StringIO(), width=120, force_terminal=True)
    panel = LivePanel(console=console)
    try:
        panel_s = run(panel)
        refreshes_in_loop = panel.refresh_count
        # Cost of one full rebuild + redraw (what each throttled refresh pays).
        k = 20
        t0 = time.perf_counter()
        for _ in range(k):
            panel.refresh()
        refresh_s = (time.perf_counter() - t0) / k
        min_interval = panel._min_interval
        typical_s = panel.refresh_cost_s or refresh_s
    finally:
        panel.close()
    render_only = LivePanel(console=console)  # never started: building the picture only
    t0 = time.perf_counter()
    for _ in range(20):
        render_only.render(metrics[-1])
    build_s = (time.perf_counter() - t0) / 20
    return {
        "n": float(n),
        "noop_us_per_log": noop_s / n * 1e6,
        "panel_us_per_log": panel_s / n * 1e6,
        "panel_extra_us_per_log": (panel_s - noop_s) / n * 1e6,
        "refreshes_during_loop": float(refreshes_in_loop),
        "refresh_ms": refresh_s * 1e3,
        "build_ms": build_s * 1e3,
        "min_refresh_interval_s": min_interval,
        "refresh_median_ms": typical_s * 1e3,
        "worst_share_pct": typical_s / min_interval * 100,
    }


if __name__ == "__main__":  # pragma: no cover
    for k, v in measure_panel_overhead().items():
        print(f"{k:>24}: {v:.3f}")
