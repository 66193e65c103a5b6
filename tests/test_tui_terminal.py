"""The live panel in a real terminal: ``ramgpt train`` runs inside a detached tmux session
(140x45) and the test reads the screen the way a user would see it.

- a short run shows the panel (CPU-run wording, a real step number and loss), the step
  counter moves, and the run ends with metrics.jsonl, a final checkpoint and no traceback;
- Ctrl-C mid-run stops training, writes a checkpoint for the interrupted step, and leaves a
  sane terminal (one panel on screen, no traceback, the cursor visible).

Each test starts its own tmux server (private socket, ``-f /dev/null``) with a scrubbed
environment, so neither a user's tmux config nor RAMGPT_*/CI/W&B variables can change what
is shown. ramgpt runs under ``sh`` like at a prompt; the shell then prints its exit status and keeps
the pane open, so the final screen and the cursor state ramgpt left can be read back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ramgpt import checkpoint as ck

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)"),
]

ROOT = Path(__file__).resolve().parent.parent
COLS, ROWS = 140, 45
TRACEBACK = "Traceback (most recent call last)"
STEP_RE = re.compile(r"│ progress\s+step (\d+)/(\d+) \(\d+%\)")
LOSS_RE = re.compile(r"│ learning\s+loss (\d+\.\d+) \(avg (\d+\.\d+)\)")
TOP_BORDER = "╭─ ramgpt · micro-test"

# Environment variables that would change what the run does or how it draws.
_DROP_PREFIXES = ("RAMGPT_", "WANDB_", "HF_", "HUGGING", "TMUX", "RICH_", "TTY_")
_DROP = {"CI", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "CLICOLOR", "CLICOLOR_FORCE", "PYTHONPATH", "TERM"}


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(_DROP_PREFIXES)}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "HOME": str(home),  # no user config (wandb, HF token, shell rc) can be picked up
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TERM": "xterm-256color",
            "PYTHONPATH": str(ROOT),  # this checkout, whatever is installed
            "WANDB_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


EXIT_RE = re.compile(r"^\[ramgpt exited with status (\d+)\]$", re.M)

# Runs argv like a user at a shell prompt would, then prints the exit status and keeps the
# pane open so the final screen (and the cursor state ramgpt left behind) can be read back.
# ``trap : INT`` keeps this shell alive through Ctrl-C (an interactive shell survives it
# too); ramgpt itself gets the default SIGINT handling, since trapped signals are reset in
# children.
_WRAPPER = 'trap : INT; "$@"; echo "[ramgpt exited with status $?]"; exec sleep 120'


class TmuxRun:
    """One command in a detached tmux session on a private tmux server."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        # A short private socket path (unix socket paths are limited to ~107 bytes).
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ramgpt-tmux-"))
        self.socket = self.sock_dir / "sock"
        self.session = f"ramgpt-{uuid.uuid4().hex[:10]}"
        self.env = env
        self.argv = argv
        self.cwd = cwd

    def tmux(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(
            ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def start(self) -> None:
        # argv goes to tmux as separate arguments, so no quoting is involved.
        self.tmux(
            "new-session", "-d", "-s", self.session, "-x", str(COLS), "-y", str(ROWS), "-c", str(self.cwd),
            "/bin/sh", "-c", _WRAPPER, "sh", *self.argv,
        )  # fmt: skip

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def fmt(self, spec: str) -> str:
        return self.tmux("display-message", "-p", "-t", self.session, spec).strip()

    def exit_status(self, screen: str | None = None) -> int | None:
        """ramgpt's exit status once it has exited, else None."""
        m = EXIT_RE.search(self.screen() if screen is None else screen)
        return int(m.group(1)) if m else None

    def cursor_visible(self) -> bool:
        return self.fmt("#{cursor_flag}") == "1"

    def wait_for(self, pred, timeout: float, what: str) -> str:
        """Poll the screen until ``pred(screen)`` is true; fail with the last screen."""
        deadline = time.monotonic() + timeout
        scr = ""
        while time.monotonic() < deadline:
            scr = self.screen()
            if pred(scr):
                return scr
            if self.exit_status(scr) is not None:
                raise AssertionError(f"ramgpt exited before {what}; screen:\n{scr}")
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; screen:\n{scr}")

    def wait_exit(self, timeout: float, seen_steps: set[int] | None = None) -> tuple[int, str]:
        """Wait for ramgpt to exit; returns (exit status, final screen)."""
        deadline = time.monotonic() + timeout
        scr = ""
        while time.monotonic() < deadline:
            scr = self.screen()
            status = self.exit_status(scr)
            if status is not None:
                return status, scr
            if seen_steps is not None:
                seen_steps.update(_steps(scr))
            time.sleep(0.2)
        raise AssertionError(f"ramgpt still running after {timeout:.0f}s; screen:\n{scr}")

    def close(self) -> None:
        try:
            self.tmux("kill-session", "-t", self.session, check=False)
            self.tmux("kill-server", check=False)
        finally:
            shutil.rmtree(self.sock_dir, ignore_errors=True)


def _steps(screen: str) -> list[int]:
    return [int(m.group(1)) for m in STEP_RE.finditer(screen)]


def _shows_step(min_step: int):
    """A whole frame showing step >= ``min_step`` (a capture can land while the panel is being
    redrawn, its bottom rows not yet written: poll again rather than judge half a frame)."""

    def pred(screen: str) -> bool:
        steps = _steps(screen)
        lines = screen.splitlines()
        whole = sum(line.startswith(TOP_BORDER) for line in lines) == 1 and sum(line.startswith("╰") for line in lines) == 1
        return bool(steps) and steps[-1] >= min_step and LOSS_RE.search(screen) is not None and whole

    return pred


def _panel_lines(screen: str) -> list[str]:
    lines = screen.splitlines()
    top = [i for i, line in enumerate(lines) if line.startswith(TOP_BORDER)]
    bottom = [i for i, line in enumerate(lines) if line.startswith("╰")]
    assert len(top) == 1 and len(bottom) == 1, f"expected exactly one panel on screen; screen:\n{screen}"
    assert top[0] < bottom[0], screen
    return lines[top[0] : bottom[0] + 1]


def _assert_cpu_panel(screen: str, max_steps: int) -> tuple[int, float]:
    """The panel as a CPU run shows it; returns the (step, loss) on screen."""
    panel = _panel_lines(screen)
    width = len(panel[0])
    # Drawn two columns narrower than the terminal, every row the same width, framed.
    assert width == COLS - 2, f"panel is {width} wide, expected {COLS - 2}:\n{screen}"
    for line in panel:
        assert len(line) == width, f"ragged panel row ({len(line)} != {width}): {line!r}\n{screen}"
    for line in panel[1:-1]:
        assert line.startswith("│ ") and line.endswith(" │"), f"row outside the frame: {line!r}\n{screen}"
    assert panel[0].startswith("╭─ ramgpt · micro-test · cpu · resident engine "), panel[0]

    labels = [line[2:13].strip() for line in panel[1:-1] if line[2:13].strip()]
    assert labels == ["progress", "learning", "speed", "GPU", "CPU", "transfer", "events"], (labels, screen)

    body = "\n".join(panel)
    m = STEP_RE.search(body)
    assert m is not None, screen
    step, shown_max = int(m.group(1)), int(m.group(2))
    assert shown_max == max_steps and 1 <= step <= max_steps, screen
    lm = LOSS_RE.search(body)
    assert lm is not None, screen
    loss = float(lm.group(1))
    assert 0.0 < loss < 20.0, f"implausible loss {loss}:\n{screen}"  # ln(4160) = 8.3 at init

    row = {line[2:13].strip(): line[13:-2].strip() for line in panel[1:-1] if line[2:13].strip()}
    assert re.search(r"elapsed \d+:\d\d:\d\d", row["progress"]) and "ETA " in row["progress"], row["progress"]
    assert re.search(r"\btokens [\d.]+[kMB]?\b", row["progress"]), row["progress"]
    assert re.search(r"\blr \d\.\d\de-\d\d\b", row["learning"]) and "grad norm " in row["learning"], row["learning"]
    assert re.search(r"^[\d.]+k? tok/s  ·  ([\d.]+k? chars/s  ·  )?\d+\.\d\d s/step  ·  optimizer ", row["speed"]), row["speed"]
    assert "MFU" not in row["speed"], row["speed"]  # no peak FLOPs for a CPU
    # A CPU run says so instead of showing zeros for GPU and transfer numbers.
    assert row["GPU"] == "CPU run — no GPU", row["GPU"]
    assert row["transfer"] == "no streaming (CPU run)", row["transfer"]
    assert re.search(r"^RSS [\d.]+ [KMG]iB  ·  RAM available [\d.]+ GiB of [\d.]+ GiB$", row["CPU"]), row["CPU"]
    for bad in ("VRAM", "GB/s", "H2D", "D2H", "util", "pinned", " 0 B"):
        assert bad not in body, f"{bad!r} on a CPU run's panel:\n{screen}"
    assert not re.search(r"\b(nan|inf)\b", body), f"non-finite number on the panel:\n{screen}"
    assert "info: micro-test: " in body and "resident engine on cpu (fp32)" in body, screen
    return step, loss


def _logged_steps(run_dir: Path, max_steps: int) -> list[int]:
    """The steps train.py logs: every log_interval, every eval_interval, and the last one."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    li, ei = cfg["logging"]["log_interval"], cfg["logging"]["eval_interval"]
    return [s for s in range(1, max_steps + 1) if s % li == 0 or s % ei == 0 or s == max_steps]


def _metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(tmp_path: Path, *args: str) -> tuple[TmuxRun, Path]:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "ramgpt", "train", "--profile", "micro-test", "--out-dir", str(run_dir), *args]
    return TmuxRun(argv, cwd=tmp_path, env=_clean_env(tmp_path / "home")), run_dir


def test_panel_in_tmux_runs_to_completion(tmp_path: Path) -> None:
    max_steps = 30
    t, run_dir = _run(tmp_path, "--max-steps", str(max_steps))
    try:
        t.start()
        # The panel frame appears before the first logged step, with the CPU wording already.
        first = t.wait_for(lambda s: TOP_BORDER in s, 60, "the panel to appear")
        assert TRACEBACK not in first, first

        screen = t.wait_for(_shows_step(1), 90, "a logged step with a loss")
        step, loss = _assert_cpu_panel(screen, max_steps)
        hidden = not t.cursor_visible()
        assert hidden or t.exit_status() is not None, "cursor should be hidden while the live panel runs"
        seen = {step}

        status, final = t.wait_exit(120, seen)
        assert status == 0, f"exit status {status}; screen:\n{final}"
        assert TRACEBACK not in final, final

        # The final panel: the last step, 100%, and the summary line printed under it.
        last_step, _ = _assert_cpu_panel(final, max_steps)
        assert last_step == max_steps, final
        assert f"step {max_steps}/{max_steps} (100%)" in final
        assert "checkpoint: saved " in final and ck.step_dir_name(max_steps) in final, final
        assert re.search(rf"^done: {max_steps} steps, [\d,]+ tokens, loss \d+\.\d{{4}}", final, re.M), final
        seen.update(_steps(final))
        assert len(seen) >= 2, f"the step counter never moved (saw steps {sorted(seen)})"
        assert t.cursor_visible(), f"cursor left hidden after the run; screen:\n{final}"

        rows = _metrics_rows(run_dir)
        expected = _logged_steps(run_dir, max_steps)
        assert [r["step"] for r in rows] == expected, [r["step"] for r in rows]
        assert all(r["device"] == "cpu" and isinstance(r["loss"], float) for r in rows), rows[-1]
        assert not any(k.startswith(("vram_", "h2d_", "d2h_", "gpu_")) for r in rows for k in r), rows[-1]
        assert rows[-1]["max_steps"] == max_steps

        ckpt = run_dir / ck.step_dir_name(max_steps)
        assert ckpt.is_dir(), sorted(p.name for p in run_dir.iterdir())
        assert ck.resolve_checkpoint(ckpt, verify=True) == ckpt
        assert json.loads((ckpt / "meta.json").read_text())["reason"] == "final"
    finally:
        t.close()


def test_ctrl_c_mid_run_saves_and_restores_terminal(tmp_path: Path) -> None:
    # Log every step so the panel shows step >= 5 early; 400 steps never finish first.
    t, run_dir = _run(tmp_path, "--max-steps", "400", "--set", "logging.log_interval=1")
    try:
        t.start()
        screen = t.wait_for(_shows_step(5), 90, "step >= 5 on the panel")
        _assert_cpu_panel(screen, 400)
        assert TRACEBACK not in screen, screen

        t.tmux("send-keys", "-t", t.session, "C-c")
        status, final = t.wait_exit(30)

        assert TRACEBACK not in final, final
        assert "KeyboardInterrupt" not in final, final
        # One panel only: no stray copy of the frame from the redraw after "^C".
        shown, _ = _assert_cpu_panel(final, 400)
        m = re.search(r"^interrupted: (\d+) steps", final, re.M)
        assert m is not None, f"no 'interrupted:' summary line; screen:\n{final}"
        stopped = int(m.group(1))
        assert 5 <= stopped < 400, final
        # The final panel names the step that was saved (issue #10.11: it showed 119 for 120).
        assert shown == stopped, f"panel shows step {shown}, the run stopped at {stopped}:\n{final}"
        assert f"warning: interrupted at step {stopped}" in final, final
        assert "checkpoint: saved " in final and ck.step_dir_name(stopped) in final, final
        assert t.cursor_visible(), f"cursor left hidden after Ctrl-C; screen:\n{final}"
        # The shell's convention for a command stopped by Ctrl-C; 0 would tell a script the run
        # finished, anything else that it crashed.
        assert status == 130, f"exit status {status} after Ctrl-C, expected 130; screen:\n{final}"

        ckpt = run_dir / ck.step_dir_name(stopped)
        assert ckpt.is_dir(), sorted(p.name for p in run_dir.iterdir())
        assert ck.resolve_checkpoint(ckpt, verify=True) == ckpt
        assert ck.latest_checkpoint(run_dir) == ckpt
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["reason"] == "interrupt" and meta["step"] == stopped

        last_run = json.loads((run_dir / "last_run.json").read_text())
        assert last_run["interrupted"] is True and last_run["steps"] == stopped
        # metrics.jsonl never runs ahead of the checkpoint (log_interval=1: one row per step).
        steps = [r["step"] for r in _metrics_rows(run_dir)]
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] <= stopped, steps
    finally:
        t.close()
