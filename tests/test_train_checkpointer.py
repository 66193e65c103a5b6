"""The checkpointer: saves by the clock, background saves that gate the engine's updates, and the
free-disk check; SIGKILL during a background write leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ramgpt import checkpoint as ckpt
from ramgpt.config import CheckpointConfig
from ramgpt.errors import RunDirError
from ramgpt.train.checkpointer import Checkpointer, SaveContext
from ramgpt.train.rundir import RunDir
from ramgpt.train.state import Snapshot, TrainState


class _Engine:
    """Enough of an engine to save: two tensors and an optimizer state; an update gate."""

    def __init__(self, gated: bool):
        self.w = torch.arange(6, dtype=torch.float32)
        self.m = torch.zeros(6)
        self.gated = gated
        self.gate = None

    def set_update_gate(self, gate) -> bool:
        self.gate = gate
        return self.gated

    def state_dict(self):
        return {"w": self.w}

    def optimizer_state(self):
        return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": self.m}}, "param_groups": [{"params": [0]}]}

    def scaler_state(self):
        return {}

    def tensor_saved(self, t):
        pass


def _checkpointer(tmp: Path, engine, clock=time.monotonic, **cfg) -> tuple[Checkpointer, list]:
    events: list[tuple[str, str]] = []
    c = Checkpointer(tmp, CheckpointConfig(**cfg), engine, None, SaveContext({}, "test", "fp32", {}),
                     event=lambda k, m: events.append((k, m)), clock=clock)
    return c, events


def _snap() -> Snapshot:
    return Snapshot({"pos": 1}, {})


def test_a_clock_interval_saves_at_the_right_steps(tmp_path: Path) -> None:
    now = {"t": 0.0}
    c, _ = _checkpointer(tmp_path, _Engine(False), clock=lambda: now["t"], save_interval_steps=None,
                         save_interval_minutes=1.0)
    saved = []
    state = TrainState()
    for step in range(1, 9):
        now["t"] += 40.0  # a step takes 40 s
        state.step = step
        if c.maybe_save(state, _snap()):
            saved.append(step)
    assert saved == [2, 4, 6, 8]  # 80 s, then 80 s after each save: every second step
    assert sorted(p.name for p in tmp_path.glob("step_*"))[-1] == "step_0000008"


def test_either_interval_triggers_a_save(tmp_path: Path) -> None:
    now = {"t": 0.0}
    c, _ = _checkpointer(tmp_path, _Engine(False), clock=lambda: now["t"], save_interval_steps=5,
                         save_interval_minutes=10.0, keep_last_n=10)
    state, saved = TrainState(), []
    for step in range(1, 12):
        now["t"] += 700.0 if step == 7 else 1.0  # 11 minutes pass during step 7
        state.step = step
        if c.maybe_save(state, _snap()):
            saved.append(step)
    assert saved == [5, 7, 10]


def test_a_background_save_holds_back_only_the_updates_of_unwritten_tensors(tmp_path: Path, monkeypatch) -> None:
    eng = _Engine(gated=True)
    c, events = _checkpointer(tmp_path, eng, save_interval_steps=1)
    assert c.background and eng.gate is not None
    written = []
    real = ckpt.store.write_safetensors

    def slow(path, tensors, after_tensor=None):  # the disk is slow: the model file takes a while
        def after(t):
            time.sleep(0.3)
            written.append(t.data_ptr())
            after_tensor(t)
        return real(path, tensors, after)

    monkeypatch.setattr(ckpt.store, "write_safetensors", slow)
    state = TrainState(step=1)
    assert c.save(state, _snap(), "interval") is None  # started, not finished
    t0 = time.perf_counter()
    eng.gate([eng.w])  # the optimizer wants to update w: waits for w only
    waited_w = time.perf_counter() - t0
    assert eng.w.data_ptr() in written and eng.m.data_ptr() not in written, "w's gate opened before m was written"
    eng.w.add_(100.0)  # the update may now happen: the file already holds the old values
    c.finish()
    assert waited_w >= 0.25
    loaded = ckpt.load_checkpoint(tmp_path)
    assert torch.equal(loaded.model_state["w"], torch.arange(6, dtype=torch.float32))
    assert loaded.optimizer_state["state"][0]["step"].item() == 3.0
    assert any(k == "checkpoint" and "in the background" in m for k, m in events)
    assert c.last_path == tmp_path / "step_0000001"


def test_a_failed_background_save_is_a_warning_and_releases_the_gate(tmp_path: Path, monkeypatch) -> None:
    eng = _Engine(gated=True)
    c, events = _checkpointer(tmp_path, eng, save_interval_steps=1)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(ckpt.store, "write_safetensors", full_disk)
    c.save(TrainState(step=1), _snap(), "interval")
    eng.gate([eng.w, eng.m])  # must not hang
    c.finish()
    assert any(k == "warning" and "no space left" in m and "training continues" in m for k, m in events)
    assert c.last_path is None


def test_free_disk_check_is_one_line_with_what_to_do(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run", lock=False).open()
    with pytest.raises(RunDirError, match=r"not enough free disk.*keep_last_n.*--force"):
        rd.check_free_space(10**15, keep=3, existing_b=0)
    rd.check_free_space(1000, keep=3, existing_b=0)  # a small run fits


@pytest.mark.slow
def test_sigkill_during_a_background_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A run killed while its step-8 checkpoint is being written in the background resumes from
    step 4 (`--resume latest`), and the resumed run matches an uninterrupted one."""
    base = ["train", "--profile", "micro-test", "--no-tui", "--max-steps", "10", "--set", "logging.log_interval=1",
            "--set", "checkpoint.save_interval_steps=4", "--set", "checkpoint.keep_last_n=5"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = [sys.executable, "-c", "import runpy, sys; sys.argv = ['ramgpt', *sys.argv[1:]]; "
           "runpy.run_module('ramgpt', run_name='__main__')"]
    assert subprocess.run([*run, *base, "--out-dir", "full"], cwd=tmp_path, env=env, timeout=600).returncode == 0
    # the victim dies inside the step-8 save, after the model file is written and before the rename
    hook = ("import os, signal; from ramgpt.checkpoint import store; real = store.write_safetensors\n"
            "def w(path, tensors, after_tensor=None):\n"
            "    rec = real(path, tensors, after_tensor)\n"
            "    if 'step_0000008' in str(path): os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return rec\n"
            "store.write_safetensors = w\n")
    victim = [sys.executable, "-c", hook + run[2]]
    res = subprocess.run([*victim, *base, "--out-dir", "killed"], cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == -signal.SIGKILL
    killed = tmp_path / "killed"
    assert [i.step for i in ckpt.list_checkpoints(killed) if i.complete] == [4]
    assert any(p.name.startswith(".tmp-step_0000008") for p in killed.iterdir())
    assert ckpt.load_checkpoint(killed).step == 4
    res = subprocess.run([*run, *base, "--out-dir", "killed", "--resume", "latest"], cwd=tmp_path, env=env,
                         timeout=600)
    assert res.returncode == 0

    def losses(d: Path) -> list[float]:
        return [json.loads(ln)["loss"] for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]

    assert losses(killed) == losses(tmp_path / "full")


def test_a_background_save_of_split_masters_writes_them_before_their_update(tmp_path: Path, monkeypatch) -> None:
    """runtime.split_masters: a background save writes the masters joined from their 16-bit halves,
    and the next update of a chunk waits until its masters and moments are on disk (the gate keys
    them by the bf16 half's address). With a slow disk the step's update runs during the save:
    the checkpoint must hold the weights from before it, every one of them."""
    from ramgpt.checkpoint.tensorfile import materialize
    from ramgpt.config import ModelConfig, OptimConfig
    from ramgpt.engine import StreamedEngine
    from ramgpt.model import GPT

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    eng = StreamedEngine(GPT(cfg), device="cpu", precision="bf16", optim_cfg=OptimConfig(lr=1e-2), seqs_per_pass=2,
                         split_masters="all")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    try:
        # before the first update there are no moments: the masters' own gate is all that holds the
        # update back (the moments, written after the model file, would otherwise gate it too)
        before = {k: materialize(v).clone() for k, v in eng.state_dict().items()}
        c, _ = _checkpointer(tmp_path, eng, save_interval_steps=1)
        assert c.background
        real = ckpt.store.write_safetensors

        def slow(path, tensors, after_tensor=None):
            def after(t):
                time.sleep(0.1)
                after_tensor(t)
            return real(path, tensors, after)

        monkeypatch.setattr(ckpt.store, "write_safetensors", slow)
        assert c.save(TrainState(step=1), _snap(), "interval") is None  # writing in the background
        x = torch.randint(0, cfg.vocab_size, (4, 16), generator=gen)
        eng.train_step(x, x, 1e-2)  # its update starts while the save is still writing
        assert c._writer is not None and c._writer.is_alive(), "the save should still be running"
        c.finish()
        eng.wait_optimizer()
        loaded = ckpt.load_checkpoint(tmp_path)
        assert set(loaded.model_state) == set(before)
        for k, v in before.items():
            assert torch.equal(loaded.model_state[k], v), k
        after = {k: materialize(v) for k, v in eng.state_dict().items()}
        assert all(not torch.equal(after[k], before[k]) for k in before)  # every weight moved
    finally:
        eng.close()
