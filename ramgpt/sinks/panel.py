"""The live panel: a rich, throttled terminal display of a training run."""

from __future__ import annotations

import atexit
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.segment import Segment
from rich.text import Text

from ramgpt.fmt import fmt_bytes, fmt_count, fmt_duration, fmt_float, fmt_gbps, fmt_pct, fmt_sci, num, sparkline
from ramgpt.sinks.metrics import VRAM_KEYS, has_transfer, is_gpu_run


def _run_kind(m: Mapping[str, Any]) -> str | None:
    """``"gpu"``, ``"cpu"``, or None while the run has not said where it runs (before its first
    ``progress``/``log``): the panel must not call a CUDA run a CPU run before it knows."""
    if is_gpu_run(m):
        return "gpu"
    return "cpu" if m.get("device") else None


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

    ``log()`` and ``progress()`` only store the numbers; the panel is rebuilt and redrawn at
    most ``refresh_per_second`` times a second, and less often if drawing is slow: the interval
    grows so that drawing takes at most ``max_overhead`` of wall time (training pays for every
    millisecond spent here). What is shown is the last logged row overlaid with the quick fields
    of later ``progress`` calls, at the step of the last call of either. The live display starts
    on the first call (so building the sink set never touches the terminal) and ``close()``
    stops it, drawing what changed since the last redraw, leaving the final panel on screen and
    the cursor visible, also after Ctrl-C. Use it as a context manager, or call ``close()`` in a
    ``finally``.
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
        self._logged: dict[str, Any] = {}  # the last log() row
        self._quick: dict[str, Any] = {}  # progress() fields newer than that row
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
        self._step = step
        loss = num(metrics.get("loss"))
        if loss is not None:
            self._loss_history.append(loss)
        ev = num(metrics.get("eval_loss"))
        if ev is not None:
            self._last_eval = (ev, step)
        self._logged = dict(metrics)
        # The row is newer than the quick fields it carries too; a logged step means training
        # runs, so no phase any more. A background save outlives the row.
        if self._quick:
            self._quick = {k: v for k, v in self._quick.items() if k not in metrics and k != "phase"}
        self._changed()

    def progress(self, step: int, **quick: Any) -> None:
        """Move the step counter, elapsed, ETA and tokens between logged steps (no new loss
        point), and show what the run is doing (``phase``, ``device``, ``engine``, ``saving``),
        also before the first step. Cheap: it only stores the numbers; redraws stay throttled."""
        if self._closed:
            return
        self._step = step
        self._quick.update(quick)
        self._changed()

    def shown(self) -> dict[str, Any]:
        """The numbers the panel shows now: the last row, newer quick fields, the last step."""
        m = {**self._logged, **self._quick}
        if self._step is not None:
            m["step"] = self._step
        return m

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
                live.update(self.render(), refresh=True)
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
            self.render(),
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
        self._live.update(self.render(), refresh=True)
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
        """The panel for ``metrics`` (default: :meth:`shown`) plus the event history."""
        m: Mapping[str, Any] = self.shown() if metrics is None else metrics
        g = lambda k: num(m.get(k))  # noqa: E731

        kind = _run_kind(m)
        rows = [
            ("progress", self._progress(m, g), False),
            ("learning", self._learning(m, g), False),
            ("speed", self._speed(g), False),
            ("GPU", self._gpu(g, kind), False),
            ("CPU", self._cpu(g), False),
            ("transfer", self._transfer(m, g, kind), False),
            ("events", self._events(), True),
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
        phase = m.get("phase")
        if phase:
            parts.append(Text(str(phase), style="bold yellow"))
        if not step:  # None, or 0: before the first step
            if not parts:
                parts.append(Text("waiting for the first step", style="dim"))
        elif mx:
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
        if saving := m.get("saving"):
            parts.append(Text(f"saving: {saving}", style="yellow"))
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
            parts.append(f"lr {fmt_sci(v, 2)}")
        if (v := g("grad_norm")) is not None:
            parts.append(f"grad norm {fmt_float(v, 2)}")
        return self._join(parts) if parts else [Text("—", style="dim")]

    def _speed(self, g: Callable[[str], float | None]) -> list[Text]:
        parts: list[Text | str] = []
        if (v := g("tokens_per_s")) is not None:
            parts.append(f"{fmt_count(v)} tok/s")
        if (v := g("chars_per_s")) is not None:
            parts.append(f"{fmt_count(v)} chars/s")
        if (v := g("mfu")) is not None:
            parts.append(f"MFU {fmt_pct(v * 100)}")
        if (v := g("step_time_s")) is not None:
            parts.append(f"{fmt_float(v, 2)} s/step")
        opt_t, share, exposed = g("optimizer_time_s"), g("optimizer_share"), g("optimizer_exposed_s")
        if opt_t is not None or share is not None:
            s = "optimizer"
            if opt_t is not None:
                s += f" {fmt_float(opt_t, 2)} s"
            if exposed is not None:  # the streamed engine's update overlaps the next forward
                s += f", {fmt_float(exposed, 2)} s exposed"
            if share is not None:
                s += f" ({fmt_pct(share * 100)} of step)"
            parts.append(s)
        return self._join(parts) if parts else [Text("—", style="dim")]

    def _gpu(self, g: Callable[[str], float | None], kind: str | None) -> list[Text]:
        if kind == "cpu":
            return [Text("CPU run — no GPU", style="dim")]
        if kind is None:
            return [Text("—", style="dim")]
        if all(g(k) is None for k in (*VRAM_KEYS, "vram_total_b", "gpu_util_pct")):
            return [Text("waiting for the first logged step", style="dim")]
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
            parts.append(f"util {fmt_float(v, 0)}%")
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

    def _transfer(self, m: Mapping[str, Any], g: Callable[[str], float | None], kind: str | None) -> list[Text]:
        if kind == "cpu":
            return [Text("no streaming (CPU run)", style="dim")]
        if not has_transfer(m):
            engine = m.get("engine")
            if kind is None or engine is None:
                return [Text("—", style="dim")]
            if engine == "streamed":
                return [Text("streamed engine: waiting for the first logged step", style="dim")]
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
                    s += f" ({fmt_float(rate / link * 100, 0)}% of link)"
            parts.append(s)
        if link is not None:
            parts.append(f"link {fmt_gbps(link)} measured")
        stall_pct, stall_s = g("stall_pct"), g("stall_s")
        if stall_pct is not None or stall_s is not None:
            s = "stall"
            if stall_pct is not None:
                s += f" {fmt_pct(stall_pct)}"
            if stall_s is not None:
                s += f" ({fmt_float(stall_s, 2)} s)"
            parts.append(Text(s, style="yellow" if (stall_pct or 0) >= 20 else ""))
        return self._join(parts)

    def _events(self) -> list[Text]:
        lines: list[Text] = []

        def stamp(t: float, step: int | None) -> str:
            at = time.strftime("%H:%M:%S", time.localtime(t))
            return f"  ({at}" + (f", step {step})" if step else ")")  # no step 0: before the first step

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
