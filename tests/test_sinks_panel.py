"""The live panel: contents per run kind, what it shows before the first step and after Ctrl-C,
what its redraws cost a training loop, and the panel in a real terminal (tmux)."""

from __future__ import annotations

import io
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from ramgpt.sinks import MultiSink
from ramgpt.sinks.panel import LivePanel
from ramgpt.sinks.plain import PlainSink

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "panel_overhead.py"
_bench = runpy.run_path(str(BENCH))
fake_metrics = _bench["fake_metrics"]
SECTIONS = ("progress", "learning", "speed", "GPU", "CPU", "transfer", "events")


def recording_console(file: io.StringIO | None = None) -> Console:
    return Console(record=True, width=120, force_terminal=True, file=file or io.StringIO())


def rendered_text(panel: LivePanel, metrics: dict | None = None) -> str:
    c = recording_console()
    c.print(panel.render(metrics))
    return c.export_text()


def row(text: str, label: str) -> str:
    """The text of one section's first line (``│ GPU        ... │``)."""
    m = re.search(rf"^│ {re.escape(label)}\s+(.*?)\s*│$", text, re.M)
    assert m is not None, f"no {label!r} row:\n{text}"
    return m.group(1)


def feed(panel: LivePanel, n: int, *, gpu: bool, max_steps: int = 120) -> dict:
    m: dict = {}
    for i in range(1, n + 1):
        m = fake_metrics(i, max_steps, gpu=gpu)
        panel.log(m, i)
    return m


# ---------------------------------------------------------------------------------------------
# What each kind of run shows


def test_gpu_streamed_shows_vram_transfer_and_stall() -> None:
    console = recording_console()
    with LivePanel(console=console) as panel:
        m = feed(panel, 30, gpu=True)
        panel.event("checkpoint", "saved runs/demo/step_0000030 in 1.4 s")
    live_text = console.export_text()
    text = rendered_text(panel, m)
    for t in (live_text, text):
        for section in SECTIONS:
            assert section in t
    assert "step 30/120" in text
    assert "VRAM 3.00 GiB allocated" in text and "4.00 GiB reserved (peak 5.00 GiB)" in text
    assert "budget 6.00 GiB" in text and "card 8.00 GiB" in text and "util 87%" in text
    assert "11.2 GB/s" in text and "9.8 GB/s" in text and "link 12.5 GB/s" in text
    assert "stall 3.1%" in text
    assert "MFU 31.0%" in text and "16.4k tok/s" in text
    assert "runs/demo/step_0000030" in text and "runs/demo/step_0000030" in live_text
    assert "cuda" in text and "streamed" in text


def test_cpu_run_says_so_instead_of_zeros() -> None:
    panel = LivePanel(console=recording_console())
    m = feed(panel, 5, gpu=False)
    panel.close()
    text = rendered_text(panel, m)
    assert row(text, "GPU") == "CPU run — no GPU"
    assert row(text, "transfer") == "no streaming (CPU run)"
    assert "GB/s" not in text and "VRAM" not in text and "MFU" not in text
    assert "RSS 3.00 GiB" in text


def test_resident_gpu_without_nvml() -> None:
    m = fake_metrics(3, 10, gpu=True)
    for k in ("gpu_util_pct", "h2d_bytes", "d2h_bytes", "h2d_gbps", "d2h_gbps", "link_gbps", "stall_s", "stall_pct"):
        m.pop(k)
    m["engine"] = "resident"
    text = rendered_text(LivePanel(console=recording_console()), m)
    assert "NVML not available" in text
    assert row(text, "transfer") == "no streaming (resident engine)"
    assert "VRAM" in text


def test_events_eval_and_loss_trend() -> None:
    panel = LivePanel(console=recording_console())
    for i in range(1, 11):
        m = fake_metrics(i, 10, gpu=False)
        if i == 5:
            m["eval_loss"] = 4.321
        panel.log(m, i)
        if i == 5:
            panel.event("checkpoint", "saved /tmp/r/step_0000005 in 0.3 s")
            panel.event("warning", "loss was NaN at step 5; step skipped")
            panel.event("push", "pushed step 5 to me/demo")
    panel.close()
    text = rendered_text(panel, m)
    assert "eval 4.321 (step 5)" in text  # the last eval stays visible after its step
    assert "checkpoint: saved /tmp/r/step_0000005 in 0.3 s" in text
    assert "warning: loss was NaN" in text and "push: pushed step 5" in text
    assert "info: warning" not in text
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")


# ---------------------------------------------------------------------------------------------
# Before the first step, between logged steps, after Ctrl-C


def test_before_the_first_step_of_a_cuda_streamed_run() -> None:
    """Issue #10.11: before the first step of a CUDA streamed run the panel said "CPU run — no
    GPU" and "no streaming (CPU run)". It shows the phase, and CPU wording only for a CPU run."""
    panel = LivePanel(console=recording_console(), title="ramgpt · 1b")
    try:
        text = rendered_text(panel)  # nothing known yet: no claim either way
        assert row(text, "progress") == "waiting for the first step"
        assert "CPU run" not in text and "no streaming" not in text

        panel.progress(0, phase="building the model", device="cuda", engine="streamed", elapsed_s=2.0)
        text = rendered_text(panel)
        assert row(text, "progress") == "building the model  ·  elapsed 0:00:02"
        assert "cuda · streamed engine" in text
        assert "CPU run" not in text and "no streaming" not in text and "NVML" not in text
        assert row(text, "GPU") == "waiting for the first logged step"
        assert row(text, "transfer") == "streamed engine: waiting for the first logged step"

        panel.progress(0, phase="pinning 2.2 GB of weights", elapsed_s=9.0)
        assert row(rendered_text(panel), "progress") == "pinning 2.2 GB of weights  ·  elapsed 0:00:09"

        panel.log(fake_metrics(1, 120, gpu=True), 1)  # training runs: the phase is gone
        text = rendered_text(panel)
        assert row(text, "progress").startswith("step 1/120 (1%)") and "pinning" not in text
        assert "VRAM 3.00 GiB allocated" in text and "H2D 4.00 GiB/step" in text
    finally:
        panel.close()

    cpu = LivePanel(console=recording_console())
    cpu.progress(0, phase="building the model", device="cpu", engine="resident")
    text = rendered_text(cpu)
    assert row(text, "GPU") == "CPU run — no GPU" and row(text, "transfer") == "no streaming (CPU run)"
    cpu.close()


def test_progress_moves_the_step_between_logged_rows() -> None:
    panel = LivePanel(console=recording_console())
    try:
        feed(panel, 10, gpu=False, max_steps=120)
        assert "step 10/120" in rendered_text(panel)
        panel.progress(13, tokens_seen=26_624, elapsed_s=99.0, eta_s=5.0)
        text = rendered_text(panel)
        assert "step 13/120" in text and "elapsed 0:01:39" in text and "tokens 26.6k" in text
        assert "loss 9.091" in text  # the last logged loss stays
        panel.progress(14, saving="step_0000014 (2.2 GB) in the background")
        assert "saving: step_0000014 (2.2 GB) in the background" in rendered_text(panel)
        panel.log(fake_metrics(20, 120, gpu=False), 20)  # a newer row wins over older quick fields
        text = rendered_text(panel)
        assert "step 20/120" in text and "elapsed 0:00:10" in text and "saving: step_0000014" in text
        panel.progress(21, saving=None)
        assert "saving" not in rendered_text(panel)
        plain = io.StringIO()
        MultiSink([panel, PlainSink(plain)]).progress(22, elapsed_s=100.0)  # every sink gets it
        assert "step 22/120" in rendered_text(panel)
    finally:
        panel.close()


def _steps_drawn(raw: str) -> list[int]:
    return [int(s) for s in re.findall(r"step (\d+)/400", raw)]


def test_last_frame_shows_the_step_of_the_last_call_after_ctrl_c() -> None:
    """Issue #10.11: after Ctrl-C the panel showed step 119 while the checkpoint saved was step
    120. The trainer's last progress(120) after the interrupt save is what the final frame shows."""
    out = io.StringIO()
    panel = LivePanel(console=recording_console(out))
    with panel:
        for i in range(110, 120):
            panel.log(fake_metrics(i, 400, gpu=False), i)
        panel.refresh()  # step 119 on screen; what follows comes within the throttle interval
        panel.event("warning", "interrupted at step 120")
        panel.event("checkpoint", "saved runs/x/step_0000120 in 0.4s")
        panel.progress(120, tokens_seen=245_760, elapsed_s=99.0)
    drawn = _steps_drawn(out.getvalue())
    assert drawn[-1] == 120, f"the last frame shows step {drawn[-1]}"
    final = out.getvalue()[out.getvalue().rfind("╭") :]
    assert "step 120/400" in final and "checkpoint: saved runs/x/step_0000120" in final


def test_close_restores_terminal_after_ctrl_c() -> None:
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True)
    stdout_before = sys.stdout
    with pytest.raises(KeyboardInterrupt):
        with LivePanel(console=console) as panel:
            panel.log(fake_metrics(1, 10), 1)
            raise KeyboardInterrupt
    assert sys.stdout is stdout_before  # Live's redirection undone
    raw = out.getvalue()
    assert raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l") >= 0  # cursor shown last
    panel.close()  # idempotent
    panel.log(fake_metrics(2, 10), 2)  # after close: ignored, no error
    panel.progress(3)


# ---------------------------------------------------------------------------------------------
# What the panel costs


def test_log_is_cheap_and_throttled() -> None:
    panel = LivePanel(console=recording_console())
    metrics = [fake_metrics(i, 3000, gpu=True) for i in range(1, 3001)]
    t0 = time.perf_counter()
    for i, m in enumerate(metrics, 1):
        panel.log(m, i)
    per_log = (time.perf_counter() - t0) / len(metrics)
    panel.close()
    # Thousands of logs in well under a second must not mean thousands of redraws.
    assert panel.refresh_count <= 5
    assert per_log < 200e-6


def test_redraws_take_a_small_share_of_a_training_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 s loop of 4 ms "steps", each followed by log(), with redraws made slow (10 ms, a slow
    terminal): the time spent inside log() and its redraws, measured around the calls, stays a
    small share of the wall time (about 1.2% measured), and the panel does redraw meanwhile.
    Redrawing on every log takes ~70% here, and a fixed 4-per-second cap that ignores the cost
    6.6% (both measured on a loaded 2-core machine). (The bench's ``worst_share_pct`` is the
    throttle's own bound, true by construction; this measures.)"""
    panel = LivePanel(console=recording_console())
    render = panel.render

    def slow_render(metrics: dict | None = None) -> object:
        time.sleep(0.010)
        return render(metrics)

    monkeypatch.setattr(panel, "render", slow_render)
    metrics = [fake_metrics(i, 2000, gpu=True) for i in range(1, 2001)]
    panel.start()  # the first draw is not part of the loop
    spent, i = 0.0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2.0 and i < len(metrics):
        time.sleep(0.004)  # the "training step"
        a = time.perf_counter()
        panel.log(metrics[i], i + 1)
        spent += time.perf_counter() - a
        i += 1
    wall = time.perf_counter() - t0
    panel.close()
    assert panel.refresh_count >= 1, "the panel never redrew while training"
    assert spent / wall < 0.025, (
        f"log() and redraws took {spent / wall:.1%} of the loop ({panel.refresh_count} redraws)"
    )


def test_overhead_bench_runs() -> None:
    r = _bench["measure_panel_overhead"](200)
    assert r["n"] == 200 and r["panel_us_per_log"] > r["noop_us_per_log"] >= 0
    assert r["refresh_ms"] > 0 and r["build_ms"] > 0 and math.isfinite(r["worst_share_pct"])


def test_fake_metrics_follow_the_cpu_contract() -> None:
    m = fake_metrics(1, 2, gpu=False)
    assert not any(k.startswith(("vram", "h2d", "d2h", "gpu")) or k in ("mfu", "stall_pct") for k in m)
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values())


# ---------------------------------------------------------------------------------------------
# A real terminal


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (CI installs it via .ci/run)")
def test_live_panel_in_tmux_and_ctrl_c(tmp_path: Path) -> None:
    done = tmp_path / "done"
    sock = f"ramgpt-test-{os.getpid()}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], check=True, capture_output=True, text=True).stdout

    cmd = f"{sys.executable} {BENCH} --demo 30 --done {done}; sleep 60"
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(ROOT)}
    env.pop("CI", None)
    subprocess.run(
        ["tmux", "-L", sock, "-f", "/dev/null", "new-session", "-d", "-s", "demo", "-x", "140", "-y", "45", cmd],
        check=True,
        env=env,
    )
    try:
        screen = ""
        deadline = time.time() + 20
        while time.time() < deadline:
            screen = tmux("capture-pane", "-p", "-t", "demo")
            if "step_0000005" in screen:
                break
            time.sleep(0.2)
        for section in SECTIONS:
            assert section in screen, screen
        assert "tmux-demo" in screen and "11.2 GB/s" in screen and "stall 3.1%" in screen, screen
        assert "/500" in screen, screen
        assert tmux("display", "-p", "-t", "demo", "#{cursor_flag}").strip() == "0"  # Live hides it

        tmux("send-keys", "-t", "demo", "C-c")
        deadline = time.time() + 10
        while not done.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert done.read_text() == "interrupted"
        time.sleep(0.2)
        screen = tmux("capture-pane", "-p", "-t", "demo")
        assert "DEMO interrupted" in screen and "transfer" in screen, screen  # final panel stays
        assert screen.count("tmux-demo") == 1, screen  # the last redraw landed where the panel was
        assert "Traceback" not in screen
        assert tmux("display", "-p", "-t", "demo", "#{cursor_flag}").strip() == "1"  # cursor back
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
