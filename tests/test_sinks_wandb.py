"""Weights & Biases: offline runs, resume, steps that never go backwards, failures that warn
once and never stop training, and the run id kept for the next resume."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from ramgpt.config import LoggingConfig
from ramgpt.sinks import MultiSink, make_sinks
from ramgpt.sinks.wandb import WandbSink, find_wandb_run_id


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path / "run"


@pytest.mark.slow  # a real wandb.init starts the wandb-core process
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
    cfg = LoggingConfig(tui="off", use_wandb=True, wandb_project="p")
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


@pytest.mark.slow  # a real wandb.init starts the wandb-core process
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


def test_progress_sends_nothing_and_run_id_is_found_in_nested_fan_outs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import wandb

    runs: list[_FakeRun] = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1])
    sink = WandbSink({}, tmp_path, "proj", None)
    sink.progress(3, tokens_seen=10, phase="first pass", saving=None)
    sink.close()
    assert runs[0].logged == [] and runs[0].config_updates == []
    assert find_wandb_run_id([MultiSink([MultiSink([sink])])]) == "newid123"
    assert find_wandb_run_id([MultiSink([])]) is None
