"""ramgpt.sinks: the four-method protocol every sink keeps, the fan-out that isolates a broken
sink, and the choice of sinks for a run, including terminal detection in a real CLI run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from ramgpt.config import LoggingConfig
from ramgpt.sinks import JsonlSink, MetricSink, MultiSink, NullSink, PlainSink, make_sinks
from ramgpt.sinks.panel import LivePanel
from ramgpt.sinks.wandb import WandbSink, find_wandb_run_id

ROOT = Path(__file__).resolve().parent.parent
ANSI_ESC = "\x1b"


def test_every_sink_keeps_the_four_method_protocol(tmp_path: Path) -> None:
    assert {n for n in vars(MetricSink) if not n.startswith("_")} == {"log", "progress", "event", "close"}
    sinks = [
        JsonlSink(tmp_path),
        PlainSink(io.StringIO()),
        LivePanel(),
        WandbSink.__new__(WandbSink),  # not started: the methods are what matters here
        NullSink(),
        MultiSink([]),
    ]
    for s in sinks:
        assert isinstance(s, MetricSink), type(s).__name__
    sinks[0].close()


# ---------------------------------------------------------------------------------------------
# Fan-out


class _Broken:
    def log(self, metrics: dict, step: int) -> None:
        raise OSError("disk full")

    def progress(self, step: int, **quick: Any) -> None:
        raise OSError("disk full")

    def event(self, kind: str, message: str) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        raise OSError("disk full")


def test_multisink_isolates_a_failing_sink() -> None:
    buf = io.StringIO()
    broken = _Broken()
    multi = MultiSink([broken, PlainSink(buf)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1, 4):
            multi.progress(i, phase="first pass" if i == 1 else None)
            multi.log({"loss": 1.0}, i)
        multi.event("info", "x")
        multi.close()
    assert len([w for w in caught if "_Broken" in str(w.message)]) == 1
    out = buf.getvalue().splitlines()
    assert out[0] == "warning: metrics sink _Broken failed in progress (OSError: disk full); other sinks continue"
    assert out[1] == "phase: first pass"
    assert sum(line.startswith("step ") for line in out) == 3
    assert sum(line.startswith("warning: metrics sink _Broken failed") for line in out) == 1


def test_multisink_lets_ctrl_c_through() -> None:
    class Interrupting(_Broken):
        def progress(self, step: int, **quick: Any) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        MultiSink([Interrupting()]).progress(1)


# ---------------------------------------------------------------------------------------------
# Which sinks a run gets


def _kinds(tmp_path: Path, tui: str, **kw: Any) -> list[type]:
    return [type(s) for s in make_sinks(LoggingConfig(tui=tui), tmp_path, {}, **kw)]


def test_make_sinks_non_tty_gives_plain_lines(tmp_path: Path) -> None:
    buf = io.StringIO()
    sinks = make_sinks(LoggingConfig(), tmp_path / "run", {}, is_tty=False, stream=buf)
    assert [type(s) for s in sinks] == [JsonlSink, PlainSink]
    multi = MultiSink(sinks)
    multi.log({"loss": 1.0, "max_steps": 2}, 1)
    multi.event("info", "hello")
    multi.close()
    assert "step 1/2 | loss 1.000" in buf.getvalue() and ANSI_ESC not in buf.getvalue()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert find_wandb_run_id(multi) is None


def test_make_sinks_panel_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert _kinds(tmp_path, "auto", is_tty=True)[1] is LivePanel
    assert _kinds(tmp_path, "on", is_tty=False)[1] is LivePanel
    assert _kinds(tmp_path, "off", is_tty=True)[1] is PlainSink
    assert _kinds(tmp_path, "auto", is_tty=False)[1] is PlainSink
    monkeypatch.setenv("TERM", "dumb")
    assert _kinds(tmp_path, "auto", is_tty=True)[1] is PlainSink
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("CI", "true")
    assert _kinds(tmp_path, "auto", is_tty=True)[1] is PlainSink


class _Stdout(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_make_sinks_looks_at_stdout_when_not_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys, "stdout", _Stdout(tty=False))
    assert _kinds(tmp_path, "auto")[1] is PlainSink
    monkeypatch.setattr(sys, "stdout", _Stdout(tty=True))
    assert _kinds(tmp_path, "auto")[1] is LivePanel
    monkeypatch.setattr(sys, "stdout", object())  # no isatty at all: not a terminal
    assert _kinds(tmp_path, "auto")[1] is PlainSink


@pytest.mark.slow
def test_importing_the_sinks_loads_neither_rich_nor_wandb() -> None:
    """train imports ramgpt.sinks; only a panel (rich) or W&B run may pay for those imports."""
    code = (
        "import sys, ramgpt.sinks, ramgpt.sinks.wandb, ramgpt.sinks.jsonl, ramgpt.sinks.plain;"
        "print(sorted(m for m in ('rich', 'wandb') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_cli_run_without_a_terminal_prints_plain_lines(tmp_path: Path) -> None:
    """Issue #17: nothing forces the choice here (no is_tty, no --no-tui, tui=auto, no CI, a TERM
    that can draw); stdout is a pipe, so ramgpt's own detection must pick plain lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAMGPT_", "WANDB_", "TTY_", "FORCE_COLOR"))}
    env.pop("CI", None)
    env.update(TERM="xterm-256color", PYTHONPATH=str(ROOT), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "ramgpt", "train", "--profile", "micro-test", "--out-dir", str(run_dir)]
    fast = ["--max-steps", "3", "--set", "logging.log_interval=1", "--set", "logging.eval_batches=1"]
    r = subprocess.run([*argv, *fast], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    lines = r.stderr.splitlines()
    for step in (1, 2, 3):
        assert any(line.startswith(f"step {step}/3 | loss ") for line in lines), out
    assert any(line.startswith("checkpoint: saved ") for line in lines), out
    assert ANSI_ESC not in out and "╭" not in out and "│" not in out, out  # no panel, no escape codes
