"""Metric sinks: panel contents per run kind, plain lines, metrics.jsonl, W&B offline and
broken, fan-out isolation, and the live panel in a real terminal (tmux)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from ramgpt.dashboard import (
    JsonlSink,
    LivePanel,
    MultiSink,
    PlainSink,
    WandbSink,
    fake_metrics,
    find_wandb_run_id,
    make_sinks,
    measure_panel_overhead,
    scrub_secrets,
    sparkline,
)

ANSI_ESC = "\x1b"


def recording_console() -> Console:
    return Console(record=True, width=120, force_terminal=True, file=io.StringIO())


def rendered_text(panel: LivePanel, metrics: dict | None = None) -> str:
    c = recording_console()
    c.print(panel.render(metrics))
    return c.export_text()


def feed(panel: LivePanel, n: int, *, gpu: bool, max_steps: int = 120) -> dict:
    m: dict = {}
    for i in range(1, n + 1):
        m = fake_metrics(i, max_steps, gpu=gpu)
        panel.log(m, i)
    return m


# ---------------------------------------------------------------------------------------------
# Live panel


def test_panel_gpu_streamed_shows_vram_transfer_and_stall() -> None:
    console = recording_console()
    with LivePanel(console=console) as panel:
        m = feed(panel, 30, gpu=True)
        panel.event("checkpoint", "saved runs/demo/step_0000030 in 1.4 s")
    live_text = console.export_text()
    text = rendered_text(panel, m)
    for t in (live_text, text):
        for section in ("progress", "learning", "speed", "GPU", "CPU", "transfer", "events"):
            assert section in t
    assert "step 30/120" in text
    assert "VRAM 3.0 GiB allocated" in text and "4.0 GiB reserved" in text
    assert "budget 6.0 GiB" in text and "card 8.0 GiB" in text and "util 87%" in text
    assert "11.2 GB/s" in text and "9.8 GB/s" in text and "link 12.5 GB/s" in text
    assert "stall 3.1%" in text
    assert "MFU 31.0%" in text and "16.4k tok/s" in text
    assert "runs/demo/step_0000030" in text and "runs/demo/step_0000030" in live_text
    assert "cuda" in text and "streamed" in text


def test_panel_cpu_run_says_so_instead_of_zeros() -> None:
    panel = LivePanel(console=recording_console())
    m = feed(panel, 5, gpu=False)
    panel.close()
    text = rendered_text(panel, m)
    assert "CPU run — no GPU" in text
    assert "no streaming" in text
    assert "GB/s" not in text and "VRAM" not in text and "MFU" not in text
    assert "RSS 3.0 GiB" in text


def test_panel_resident_gpu_without_nvml() -> None:
    m = fake_metrics(3, 10, gpu=True)
    for k in ("gpu_util_pct", "h2d_bytes", "d2h_bytes", "h2d_gbps", "d2h_gbps", "link_gbps", "stall_s", "stall_pct"):
        m.pop(k)
    m["engine"] = "resident"
    text = rendered_text(LivePanel(console=recording_console()), m)
    assert "NVML not available" in text
    assert "no streaming (resident engine)" in text
    assert "VRAM" in text


def test_panel_events_eval_and_loss_trend() -> None:
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
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")


def test_panel_log_is_cheap_and_throttled() -> None:
    console = recording_console()
    panel = LivePanel(console=console)
    t0 = time.perf_counter()
    feed(panel, 3000, gpu=True, max_steps=3000)
    per_log = (time.perf_counter() - t0) / 3000
    panel.close()
    # Thousands of logs in well under a second must not mean thousands of redraws.
    assert panel.refresh_count <= 5
    assert per_log < 200e-6


def test_panel_close_restores_terminal_after_ctrl_c() -> None:
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


def test_measure_panel_overhead_reports_small_share() -> None:
    r = measure_panel_overhead(200)
    assert r["panel_us_per_log"] > 0 and r["refresh_ms"] > 0
    assert r["worst_share_pct"] <= 0.5 + 1e-6  # the throttle's own bound (max_overhead)


def test_sparkline_handles_flat_and_nan() -> None:
    assert sparkline([1.0, 1.0]) == "▅▅"
    assert sparkline([3.0, float("nan"), 1.0]) == "█!▁"


# ---------------------------------------------------------------------------------------------
# Plain lines and the sink choice


def test_plain_sink_line_has_the_numbers() -> None:
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
        "rss 3.0 GiB",
        "h2d 11.2 GB/s",
        "d2h 9.8 GB/s",
        "stall 3.1%",
        "cuda streamed",
    ):
        assert piece in gpu_line
    assert "vram" not in cpu_line and "GB/s" not in cpu_line and cpu_line.endswith("cpu resident")
    assert ev == "checkpoint: saved runs/x/step_0000041"
    assert ANSI_ESC not in buf.getvalue()


def test_make_sinks_non_tty_gives_plain_lines(tmp_path: Path) -> None:
    cfg = SimpleNamespace(tui="auto", use_wandb=False)
    buf = io.StringIO()
    sinks = make_sinks(cfg, tmp_path / "run", {}, is_tty=False, stream=buf)
    assert [type(s) for s in sinks] == [JsonlSink, PlainSink]
    multi = MultiSink(sinks)
    multi.log(fake_metrics(1, 2, gpu=False), 1)
    multi.event("info", "hello")
    multi.close()
    assert "step 1/2" in buf.getvalue() and ANSI_ESC not in buf.getvalue()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert find_wandb_run_id(multi) is None


def test_make_sinks_panel_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    kinds = lambda tui, tty: [type(s) for s in make_sinks(SimpleNamespace(tui=tui), tmp_path, {}, is_tty=tty)][1]  # noqa: E731
    assert kinds("auto", True) is LivePanel
    assert kinds("on", False) is LivePanel
    assert kinds("off", True) is PlainSink
    monkeypatch.setenv("CI", "true")
    assert kinds("auto", True) is PlainSink


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def test_jsonl_rows_events_and_truncate(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    for i in range(1, 6):
        m = {"loss": 5.0 - i * 0.1, "lr": 1e-3, "tokens_per_s": 1000.0 + i, "device": "cpu"}
        if i == 3:
            m["eval_loss"] = 4.5
            m["grad_norm"] = float("nan")
        sink.log(m, i)
        if i == 3:
            sink.event("checkpoint", "saved step 3")
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all({"loss", "lr", "tokens_per_s", "time"} <= r.keys() for r in rows)
    assert rows[2]["eval_loss"] == 4.5 and rows[2]["grad_norm"] is None  # NaN -> null (strict JSON)
    assert "eval_loss" not in rows[1]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == [{"event": "checkpoint", "message": "saved step 3", "step": 3, "time": events[0]["time"]}]

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 4.')  # the half line a crash leaves
    assert JsonlSink.truncate_after(tmp_path / "metrics.jsonl", 3) == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # A resumed run appends after the cut; a directory cuts both files.
    sink = JsonlSink(tmp_path)
    sink.log({"loss": 1.0}, 4)
    sink.event("info", "resumed")
    sink.close()
    assert JsonlSink.truncate_after(tmp_path, 2) == 4  # metrics 3, 4 and both events
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "events.jsonl").read_text() == ""
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # What a resume does: cut at the checkpoint step, then append.
    sink = make_sinks(SimpleNamespace(tui="off"), tmp_path, {}, resume_step=1, stream=io.StringIO())[0]
    sink.log({"loss": 0.5}, 2)
    sink.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Fan-out isolation


class _Broken:
    def log(self, metrics: dict, step: int) -> None:
        raise OSError("disk full")

    def event(self, kind: str, message: str) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        raise OSError("disk full")


def test_multisink_isolates_a_failing_sink() -> None:
    buf = io.StringIO()
    multi = MultiSink([_Broken(), PlainSink(buf)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1, 4):
            multi.log({"loss": 1.0}, i)
        multi.event("info", "x")
        multi.close()
    assert len([w for w in caught if "_Broken" in str(w.message)]) == 1
    out = buf.getvalue().splitlines()
    assert sum(line.startswith("step ") for line in out) == 3
    assert sum(line.startswith("warning: metrics sink _Broken failed") for line in out) == 1


def test_multisink_lets_ctrl_c_through() -> None:
    class Interrupting(_Broken):
        def log(self, metrics: dict, step: int) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        MultiSink([Interrupting()]).log({}, 1)


# ---------------------------------------------------------------------------------------------
# Weights & Biases


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path / "run"


def test_scrub_secrets_keeps_token_counts() -> None:
    cfg = {
        "optim": {"lr": 1.0},
        "hf_token": "x",
        "runtime": {"loss_chunk_tokens": 8, "wandbApiKey": "k"},
        "data": {"tokenizer": "gpt2", "db_password": "p", "client_secret": "s"},
    }
    assert scrub_secrets(cfg) == {
        "optim": {"lr": 1.0},
        "runtime": {"loss_chunk_tokens": 8},
        "data": {"tokenizer": "gpt2"},
    }


def test_wandb_offline_writes_run_files_and_resumes(wandb_offline: Path) -> None:
    run_dir = wandb_offline
    config = {"optim": {"lr": 6e-4}, "hf_token": "supersecret-value"}
    warned: list[str] = []
    sink = WandbSink(config, run_dir, project="ramgpt-test", run_name="t", on_warning=warned.append)
    assert not sink.disabled and sink.run_id
    for i in range(1, 6):
        sink.log({"loss": 5.0 - i * 0.1, "lr": 1e-3, "device": "cpu"}, i)
    sink.log({"loss": 9.9}, 3)  # backwards: skipped, not sent
    assert sink.skipped_steps == 1
    sink.event("checkpoint", "saved step 5")
    sink.close()
    run_files = list((run_dir / "wandb").glob(f"offline-run-*-{sink.run_id}/run-{sink.run_id}.wandb"))
    assert len(run_files) == 1
    # finish() hands the run to wandb-core, which writes the file's tail asynchronously.
    deadline = time.time() + 10
    while b"loss" not in (data := run_files[0].read_bytes()) and time.time() < deadline:
        time.sleep(0.05)
    assert b"loss" in data and b"lr" in data
    assert b"supersecret-value" not in data and b"hf_token" not in data
    assert warned == []

    again = WandbSink(config, run_dir, project="ramgpt-test", run_name="t", resume_id=sink.run_id)
    assert again.run_id == sink.run_id
    again.log({"loss": 4.0}, 6)
    again.close()
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{sink.run_id}*"))) == 2


def test_broken_wandb_warns_once_and_training_continues(
    wandb_offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import wandb

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("no route to api.wandb.ai")

    monkeypatch.setattr(wandb, "init", boom)
    cfg = SimpleNamespace(tui="off", use_wandb=True, wandb_project="p", wandb_run_name=None)
    buf = io.StringIO()
    multi = MultiSink(make_sinks(cfg, tmp_path / "run2", {"a": 1}, stream=buf, wandb_resume_id="abc123"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sink itself must not raise or warn repeatedly
        for i in range(1, 4):
            multi.log({"loss": 1.0 / i}, i)
        multi.close()
    lines = buf.getvalue().splitlines()
    assert sum("W&B could not start" in line for line in lines) == 1
    assert sum(line.startswith("step ") for line in lines) == 3
    assert "W&B could not start" in (tmp_path / "run2" / "events.jsonl").read_text()
    assert find_wandb_run_id(multi) == "abc123"  # kept for the next resume


def test_wandb_log_failure_warns_once(wandb_offline: Path) -> None:
    warned: list[str] = []
    sink = WandbSink({}, wandb_offline, project="p", run_name=None, on_warning=warned.append)

    def bad_log(*a: object, **k: object) -> None:
        raise ValueError("bad value")

    sink._run.log = bad_log
    for i in range(1, 4):
        sink.log({"loss": 1.0}, i)
    sink.close()
    assert len(warned) == 1 and "log failed" in warned[0] and sink.disabled


class _FakeRun:
    def __init__(self, **kwargs: object) -> None:
        self.init_kwargs = kwargs
        self.id = kwargs["id"] or "newid123"
        self.step = 51  # a resumed online run: W&B already holds steps 0..50
        self.logged: list[tuple[dict, int]] = []
        self.config = SimpleNamespace(update=lambda d, allow_val_change=False: self.config_updates.append(d))
        self.config_updates: list[dict] = []
        self.summary: dict = {}
        self.finished: list[object] = []

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self, exit_code: object = None) -> None:
        self.finished.append(exit_code)


def test_wandb_resume_skips_steps_wandb_already_has(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wandb

    runs: list[_FakeRun] = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1])
    sink = WandbSink({"optim": {"lr": 1}, "api_key": "k"}, tmp_path, "proj", "name", resume_id="run42")
    run = runs[0]
    assert sink.run_id == "run42"
    assert run.init_kwargs["id"] == "run42" and run.init_kwargs["resume"] == "allow"
    assert run.init_kwargs["config"] == {"optim": {"lr": 1}} and run.init_kwargs["dir"] == str(tmp_path)
    for step in (41, 50, 51, 52):  # resumed from a checkpoint at step 40
        sink.log({"loss": 1.0, "device": "cuda", "engine": "streamed"}, step)
    sink.event("checkpoint", "saved step 52")
    sink.close()
    assert [st for _, st in run.logged] == [51, 52] and sink.skipped_steps == 2
    assert run.logged[0][0] == {"loss": 1.0}
    assert run.config_updates == [{"device": "cuda", "engine": "streamed"}]
    assert run.summary == {"last_checkpoint": "saved step 52"} and run.finished == [None]


# ---------------------------------------------------------------------------------------------
# A real terminal

DEMO = textwrap.dedent(
    """
    import sys, time
    from ramgpt.dashboard import LivePanel, fake_metrics

    done, seconds = sys.argv[1], float(sys.argv[2])
    status = "finished"
    try:
        with LivePanel(title="tmux-demo") as panel:
            t0, i = time.time(), 0
            while time.time() - t0 < seconds:
                i += 1
                panel.log(fake_metrics(i, 500), i)
                if i == 5:
                    panel.event("checkpoint", "saved /tmp/demo/step_0000005 in 0.4 s")
                time.sleep(0.05)
    except KeyboardInterrupt:
        status = "interrupted"
    print("DEMO", status, flush=True)
    open(done, "w").write(status)
    """
)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (CI installs it via .ci/run)")
def test_live_panel_in_tmux_and_ctrl_c(tmp_path: Path) -> None:
    script, done = tmp_path / "demo.py", tmp_path / "done"
    script.write_text(DEMO)
    sock = f"ramgpt-test-{os.getpid()}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], check=True, capture_output=True, text=True).stdout

    cmd = f"{sys.executable} {script} {done} 30; sleep 60"
    env = {**os.environ, "TERM": "xterm-256color"}
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
        for section in ("progress", "learning", "speed", "GPU", "CPU", "transfer", "events"):
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


def test_fake_metrics_follow_the_cpu_contract() -> None:
    m = fake_metrics(1, 2, gpu=False)
    assert not any(k.startswith(("vram", "h2d", "d2h", "gpu")) or k in ("mfu", "stall_pct") for k in m)
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values())


def test_panel_progress_moves_the_step_between_logged_rows() -> None:
    panel = LivePanel(console=recording_console())
    try:
        panel.progress(3, elapsed_s=1.0)  # nothing logged yet: ignored
        feed(panel, 10, gpu=False, max_steps=120)
        assert "step 10/120" in rendered_text(panel)
        panel.progress(13, tokens_seen=26_624, elapsed_s=99.0, eta_s=5.0)
        text = rendered_text(panel)
        assert "step 13/120" in text and "0:01:39" in text  # elapsed 99 s
        multi = MultiSink([panel, PlainSink(io.StringIO())])  # PlainSink has no progress: skipped
        multi.progress(14, elapsed_s=100.0)
        assert "step 14/120" in rendered_text(panel)
    finally:
        panel.close()
