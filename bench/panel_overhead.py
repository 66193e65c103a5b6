"""What the live panel costs a training loop: µs per ``log()`` against a no-op sink, and the
cost of one redraw.

    python bench/panel_overhead.py [--n 2000]
    python bench/panel_overhead.py --demo SECONDS [--done FILE]

Prints one ``name: value`` line per number. ``--demo`` instead draws the panel for a fake
streamed GPU run on this terminal for SECONDS (Ctrl-C stops it), then prints ``DEMO finished``
or ``DEMO interrupted`` and writes the word to FILE (the tmux test in tests/test_sinks_panel.py
reads both). :func:`fake_metrics` is a plausible metrics dict (a streamed GPU run, or a CPU run)
for this benchmark, the sink tests and the demo.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's ramgpt, run as a script

from ramgpt.sinks import MetricSink, NullSink  # noqa: E402
from ramgpt.sinks.panel import LivePanel  # noqa: E402


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

    Returns µs per ``log()`` for both (and their difference), the number of redraws done, the
    cost of one redraw and of building the picture alone in ms (mean, and the median the
    throttle uses), and ``worst_share_pct``: the throttle's own bound on the wall time redraws
    can take (typical redraw cost / its minimum interval: at most ``max_overhead`` = 0.5% by
    construction, so it describes the throttle, it does not test it; the suite's
    ``test_sinks_panel.py`` measures the share in a loop)."""
    metrics = [fake_metrics(i, n) for i in range(1, n + 1)]

    def run(sink: MetricSink) -> float:
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


def demo(seconds: float, title: str = "tmux-demo") -> str:
    """The live panel on this terminal, fed 20 fake steps a second; "finished" or "interrupted"."""
    try:
        with LivePanel(title=title) as panel:
            t0, i = time.time(), 0
            while time.time() - t0 < seconds:
                i += 1
                panel.log(fake_metrics(i, 500), i)
                if i == 5:
                    panel.event("checkpoint", "saved /tmp/demo/step_0000005 in 0.4 s")
                time.sleep(0.05)
    except KeyboardInterrupt:
        return "interrupted"
    return "finished"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="log() calls to time")
    ap.add_argument("--demo", type=float, metavar="SECONDS", help="draw the panel for SECONDS instead")
    ap.add_argument("--done", type=Path, help="with --demo: write how it ended to this file")
    a = ap.parse_args()
    if a.demo is not None:
        status = demo(a.demo)
        print("DEMO", status, flush=True)
        if a.done is not None:
            a.done.write_text(status)
        return 0
    for k, v in measure_panel_overhead(a.n).items():
        print(f"{k:>24}: {v:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
