"""Crash safety for real: SIGKILL a process that is saving, fill a real filesystem, hit a
file-size limit. After each, every checkpoint called complete must load with its hashes
verified, leftovers must be reported as partial and pruned, and nothing older may change."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ramgpt import checkpoint as ck
from ramgpt.errors import CheckpointError

# A training-like writer: resumes from the newest complete checkpoint, then saves ~24 MB
# (16 MB "model" incl. a tied alias, 8 MB optimizer) per step and rotates like train.py will.
# Every tensor is filled with its step so a checkpoint holding mixed steps is detectable.
WRITER = textwrap.dedent(
    """
    import sys, warnings
    import torch
    from ramgpt.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint

    warnings.simplefilter("ignore")
    run_dir = sys.argv[1]
    latest = latest_checkpoint(run_dir)
    step = 0 if latest is None else int(latest.name[len("step_"):])
    n = 4 * 1024 * 1024
    w = torch.empty(n)
    exp_avg = torch.empty(n // 2)
    while True:
        step += 1
        w.fill_(step)
        exp_avg.fill_(-step)
        opt = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": exp_avg}},
               "param_groups": [{"params": [0], "lr": 1e-3, "betas": (0.9, 0.95)}]}
        save_checkpoint(run_dir, step, {"w": w, "w_tied": w, "b": torch.full((7,), step)}, opt,
                        {"eval_loss": 1.0 / step, "tokens_seen": step * 1000})
        prune_checkpoints(run_dir, keep_last=3, keep_best=True)
    """
)

pytestmark = pytest.mark.slow  # real processes killed mid-save, real full disks


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _unfinished_saves(run_dir: Path) -> list[str]:
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(".tmp-step_") and not n.endswith(("-old", "-del"))]


def _assert_consistent(run_dir: Path) -> int:
    """Every complete checkpoint loads verified and holds one step's data; partial ones are
    reported as such; latest_checkpoint picks the newest complete one. Returns that step."""
    infos = ck.list_checkpoints(run_dir)
    complete = [i for i in infos if i.complete]
    for info in complete:
        loaded = ck.load_checkpoint(info.path, verify=True)
        s = float(info.step)
        assert loaded.step == info.step
        assert bool((loaded.model_state["w"] == s).all())
        assert loaded.model_state["w_tied"] is loaded.model_state["w"]
        assert bool((loaded.optimizer_state["state"][0]["exp_avg"] == -s).all())
        assert loaded.optimizer_state["state"][0]["step"].item() == s
        assert loaded.meta["tokens_seen"] == info.step * 1000
    for info in infos:
        if info.temporary:
            assert not info.complete and not info.in_progress, info  # the writer is dead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ck.latest_checkpoint(run_dir) == (complete[-1].path if complete else None)
    return complete[-1].step if complete else 0


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    partial_seen = 0
    last_step = 0
    # mid-save kills (triggered by the temp dir appearing) alternate with kills at any moment;
    # the first one lands in the very first save, when there is no complete checkpoint yet
    plan = ["mid-save-now", "anytime", "mid-save", "anytime", "mid-save", "mid-save"]
    for mode in plan:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(run_dir)], env=_child_env(), stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 30
            if mode == "anytime":
                # let it finish at least one save, then kill after a random delay
                while not any(i.complete and i.step > last_step for i in ck.list_checkpoints(run_dir)):
                    assert proc.poll() is None, proc.stderr.read()
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                # wait for the second save's temp dir so the first one's prune also ran; meanwhile
                # prune from here too: a live writer's temp dir must survive a concurrent prune
                seen_saves = 0
                while True:
                    assert proc.poll() is None, proc.stderr.read()
                    assert time.monotonic() < deadline
                    if _unfinished_saves(run_dir):
                        seen_saves += 1
                        if seen_saves >= 2 or mode == "mid-save-now":
                            break
                        while _unfinished_saves(run_dir):
                            time.sleep(0.001)
                        ck.prune_checkpoints(run_dir, keep_last=1)
                    time.sleep(0.0005)
                if mode == "mid-save":
                    time.sleep(rng.uniform(0.0, 0.08))  # a save takes ~0.1 s here
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
        assert proc.returncode == -signal.SIGKILL, stderr  # killed by us, not failed on its own
        assert "Traceback" not in stderr, stderr

        leftovers = _unfinished_saves(run_dir)
        partial_seen += bool(leftovers)
        infos = {i.path.name: i for i in ck.list_checkpoints(run_dir)}
        for name in leftovers:
            assert not infos[name].complete and "writer pid" in infos[name].reason
        newest = _assert_consistent(run_dir)
        assert newest >= last_step  # resuming never went backwards
        last_step = newest

        report = ck.prune_checkpoints(run_dir, keep_last=2)
        assert {p.name for p in report.partial_removed} >= set(leftovers)
        assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]
        assert _assert_consistent(run_dir) == newest
    assert partial_seen >= 1, "no kill landed inside a save"


# ---------------------------------------------------------------------------------------------
# A really full filesystem


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs, so that ENOSPC is real; skipped where mounting is not allowed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(fs: Path, leave_bytes: int) -> Path:
    """Write zeros until the filesystem refuses (ENOSPC), then give back ``leave_bytes``."""
    filler = fs / "filler.bin"
    block = b"\0" * (256 * 1024)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        os.fsync(f.fileno())
    if leave_bytes:
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - leave_bytes))
    return filler


@pytest.mark.parametrize("leave_kb", [0, 80, 400])  # nothing / part of the model / model but not optimizer
def test_full_disk_fails_cleanly_and_keeps_older(small_fs: Path, leave_kb: int) -> None:
    run_dir = small_fs / "run"
    torch.manual_seed(0)
    model = {"a": torch.randn(64, 512), "b": torch.randn(512)}  # ~130 KB
    model["a_alias"] = model["a"]
    opt = {
        "state": {0: {"exp_avg": torch.randn(200_000), "step": torch.tensor(3.0)}},
        "param_groups": [{"params": [0]}],
    }
    first = ck.save_checkpoint(run_dir, 10, model, opt, {"eval_loss": 2.0})
    before = {k: v.clone() for k, v in model.items()}
    opt_before = opt["state"][0]["exp_avg"].clone()

    filler = _fill(small_fs, leave_kb * 1024)
    with pytest.raises(CheckpointError) as ei:
        ck.save_checkpoint(run_dir, 20, model, opt, {"eval_loss": 1.0})
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("could not save checkpoint step_0000020: no space left on device (need ~")
    assert f"MB in {run_dir}); older checkpoints are intact" in msg

    assert sorted(os.listdir(run_dir)) == ["step_0000010"]  # no temp dir left behind
    loaded = ck.load_checkpoint(first, verify=True)
    assert (
        torch.equal(loaded.model_state["a"], before["a"]) and loaded.model_state["a_alias"] is loaded.model_state["a"]
    )
    for k, v in before.items():  # the caller's in-memory state is untouched
        assert torch.equal(model[k], v)
    assert model["a_alias"] is model["a"] and torch.equal(opt["state"][0]["exp_avg"], opt_before)
    assert ck.latest_checkpoint(run_dir) == first

    filler.unlink()  # space comes back: the next save simply works
    second = ck.save_checkpoint(run_dir, 20, model, opt, {"eval_loss": 1.0})
    assert ck.latest_checkpoint(run_dir) == second
    assert ck.load_checkpoint(second).step == 20


EFBIG_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import torch
    from ramgpt.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from ramgpt.errors import CheckpointError

    run_dir = sys.argv[1]
    first = save_checkpoint(run_dir, 1, {"w": torch.ones(100_000)}, None, {})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        save_checkpoint(run_dir, 2, {"w": torch.ones(100_000)}, None, {})
        msg = None
    except CheckpointError as e:
        msg = str(e)
    print(json.dumps({
        "message": msg,
        "entries": sorted(os.listdir(run_dir)),
        "first_loads": load_checkpoint(first).step == 1,
    }))
    """
)


def test_file_size_limit_efbig(tmp_path: Path) -> None:
    """The other way a save runs out of room (RLIMIT_FSIZE / a filesystem's file-size cap):
    works without root, so this path is covered even where no tmpfs can be mounted."""
    script = tmp_path / "efbig.py"
    script.write_text(EFBIG_SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["message"].startswith("could not save checkpoint step_0000002: file too large (need ~")
    assert out["message"].endswith("older checkpoints are intact") and "\n" not in out["message"]
    assert out["entries"] == ["step_0000001"]
    assert out["first_loads"]
