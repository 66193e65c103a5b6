"""Plain lines: the numbers of a step on one line, events by kind, phases, the stopping step."""

from __future__ import annotations

import io
import runpy
from pathlib import Path

from ramgpt.sinks.plain import PlainSink

ROOT = Path(__file__).resolve().parent.parent
fake_metrics = runpy.run_path(str(ROOT / "bench" / "panel_overhead.py"))["fake_metrics"]
ANSI_ESC = "\x1b"


def test_line_has_the_numbers() -> None:
    buf = io.StringIO()
    sink = PlainSink(buf)
    sink.log(fake_metrics(40, 120, gpu=True), 40)
    sink.log(fake_metrics(41, 120, gpu=False), 41)
    sink.event("checkpoint", "saved runs/x/step_0000041")
    sink.close()
    gpu_line, cpu_line, ev = buf.getvalue().splitlines()
    assert gpu_line.startswith("step 40/120 | loss ")
    for piece in (
        "lr 6.0e-04",
        "gnorm 0.90",
        "16.4k tok/s",
        "mfu 31.0%",
        "0.50 s/step",
        "vram 3.0/4.0/6.0 GiB",
        "util 87%",
        "rss 3.00 GiB",
        "pinned 2.00 GiB",
        "h2d 11.2 GB/s",
        "d2h 9.8 GB/s",
        "stall 3.1%",
        "cuda streamed",
    ):
        assert piece in gpu_line
    assert "vram" not in cpu_line and "GB/s" not in cpu_line and cpu_line.endswith("cpu resident")
    assert ev == "checkpoint: saved runs/x/step_0000041"
    assert ANSI_ESC not in buf.getvalue()


def test_a_warning_event_is_one_warning_line() -> None:
    buf = io.StringIO()
    sink = PlainSink(buf)
    sink.event("warning", "checkpoint step_0000040 is incomplete; using step_0000020")
    sink.event("info", "resumed from runs/x/step_0000020 at step 20")
    assert buf.getvalue().splitlines() == [
        "warning: checkpoint step_0000040 is incomplete; using step_0000020",
        "info: resumed from runs/x/step_0000020 at step 20",
    ]


def test_phases_and_background_saves_are_one_line_each() -> None:
    buf = io.StringIO()
    sink = PlainSink(buf)
    sink.progress(0, phase="building the model", device="cuda", engine="streamed")
    sink.progress(0, phase="building the model", elapsed_s=1.0)  # unchanged: no new line
    sink.progress(0, phase="pinning 2.2 GB of weights", elapsed_s=2.0)
    sink.progress(0, phase="first pass", elapsed_s=3.0)
    sink.log(fake_metrics(1, 10, gpu=True), 1)
    sink.progress(2, phase=None, tokens_seen=16_384, elapsed_s=4.0, eta_s=8.0)  # a plain step: quiet
    sink.progress(2, saving="step_0000002 (2.2 GB) in the background")
    sink.progress(3, saving="step_0000002 (2.2 GB) in the background", tokens_seen=24_576)
    sink.progress(3, saving=None)
    sink.close()
    lines = buf.getvalue().splitlines()
    assert lines[:3] == ["phase: building the model", "phase: pinning 2.2 GB of weights", "phase: first pass"]
    assert lines[3].startswith("step 1/10 | loss ")
    assert lines[4] == "saving: step_0000002 (2.2 GB) in the background"
    assert lines[5:] == ["step 3/10 | 24.6k tokens | elapsed 0:00:04"]  # where it stopped, at close


def test_close_shows_the_step_of_the_last_call() -> None:
    """After Ctrl-C the trainer saves the step it stopped at and reports it with progress();
    the last line must name that step, not the last logged one."""
    buf = io.StringIO()
    sink = PlainSink(buf)
    for i in (110, 119):
        sink.log(fake_metrics(i, 400, gpu=False), i)
    sink.event("warning", "interrupted at step 120")
    sink.event("checkpoint", "saved runs/x/step_0000120 in 0.4s")
    sink.progress(120, tokens_seen=245_760, elapsed_s=99.0)
    sink.close()
    sink.close()  # idempotent
    assert buf.getvalue().splitlines()[-1] == "step 120/400 | 245.8k tokens | elapsed 0:01:39"

    done = io.StringIO()
    sink = PlainSink(done)
    sink.progress(9, tokens_seen=1.0)
    sink.log(fake_metrics(10, 10, gpu=False), 10)  # the last step was logged: nothing more at close
    sink.close()
    assert len(done.getvalue().splitlines()) == 1 and ANSI_ESC not in done.getvalue()


def test_closed_sink_is_silent() -> None:
    buf = io.StringIO()
    sink = PlainSink(buf)
    sink.close()
    sink.log({"loss": 1.0}, 1)
    sink.progress(2, phase="x")
    sink.event("info", "late")
    assert buf.getvalue() == ""
