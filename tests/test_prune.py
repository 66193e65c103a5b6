"""prune_checkpoints: keep rules, leftovers, foreign files, live writers, dry run, rendering."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ramgpt import checkpoint as ck
from ramgpt.errors import CheckpointError, ConfigError
from ramgpt.render import render_prune

LOSSES = {10: 3.0, 20: 2.5, 30: 1.2, 40: 1.9, 50: 1.8, 60: 1.7, 70: 1.6, 80: 1.5, 90: 1.4, 100: 1.3}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    for step, loss in LOSSES.items():
        ck.save_checkpoint(run_dir, step, {"w": torch.full((2000,), float(step))}, None, {"eval_loss": loss})
    return run_dir


def _steps(run_dir: Path) -> list[int]:
    return [i.step for i in ck.list_checkpoints(run_dir) if i.complete]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tmp_dir(run_dir: Path, step: int, pid: int, age_s: float = 0.0) -> Path:
    d = run_dir / f".tmp-step_{step:07d}-{pid}-abcd1234"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    if age_s:
        t = time.time() - age_s
        for p in (d / "model.safetensors", d):
            os.utime(p, (t, t))
    return d


def test_dry_run_reports_but_deletes_nothing(run: Path) -> None:
    before = sorted(os.listdir(run))
    report = ck.prune_checkpoints(run, keep_last=2, dry_run=True)
    assert sorted(os.listdir(run)) == before
    assert report.dry_run
    assert [p.name for p in report.removed] == [f"step_{s:07d}" for s in range(10, 90, 10)]
    assert [p.name for p in report.kept] == ["step_0000090", "step_0000100"]
    assert report.freed_bytes == sum(report.sizes[p] for p in report.removed) > 0


def test_keep_last(run: Path) -> None:
    report = ck.prune_checkpoints(run, keep_last=3)
    assert _steps(run) == [80, 90, 100]
    assert not report.dry_run and len(report.removed) == 7
    assert report.freed_bytes == sum(report.sizes.values()) > 0
    assert all(not p.exists() for p in report.removed)
    assert sorted(os.listdir(run)) == ["step_0000080", "step_0000090", "step_0000100"]  # no -del leftovers


def test_keep_every_and_best(run: Path) -> None:
    ck.prune_checkpoints(run, keep_last=1, keep_every=40, keep_best=True)
    assert _steps(run) == [30, 40, 80, 100]  # best (30), multiples of 40, newest
    ck.prune_checkpoints(run, keep_last=1, keep_every=40)
    assert _steps(run) == [40, 80, 100]
    ck.prune_checkpoints(run, keep_last=1, keep_best=True)
    assert _steps(run) == [100]  # the newest is also the best of those left (1.3)


def test_keep_best_keeps_lowest_eval_loss(run: Path) -> None:
    report = ck.prune_checkpoints(run, keep_last=2, keep_best=True)
    assert _steps(run) == [30, 90, 100]
    assert [p.name for p in report.kept] == ["step_0000030", "step_0000090", "step_0000100"]


def test_never_deletes_newest_complete(run: Path) -> None:
    # newer entries exist but are not complete: the newest *complete* one stays
    bad = run / "step_0000110"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\0")
    report = ck.prune_checkpoints(run, keep_last=0)
    assert _steps(run) == [100]
    assert bad in report.partial_removed and not bad.exists()
    assert ck.latest_checkpoint(run) == run / "step_0000100"


def test_leaves_foreign_things_alone(run: Path) -> None:
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_text("x")
    mine = run / "step_0000005"  # looks like a step dir, but holds a user's own file
    mine.mkdir()
    (mine / "my_notes.txt").write_text("keep me")
    odd = run / "step_12"  # not our name pattern
    odd.mkdir()
    report = ck.prune_checkpoints(run, keep_last=1)
    assert (run / "metrics.jsonl").exists() and (run / "tensorboard" / "events").exists()
    assert (mine / "my_notes.txt").read_text() == "keep me" and odd.is_dir()
    assert mine in report.left_alone
    assert _steps(run) == [100]


def test_removes_partial_step_dirs_of_ours(run: Path) -> None:
    empty = run / "step_0000015"
    empty.mkdir()
    truncated = run / "step_0000095"
    ck.save_checkpoint(run, 95, {"w": torch.zeros(2000)}, None, {})
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(10)
    report = ck.prune_checkpoints(run, keep_last=10)
    assert set(report.partial_removed) == {empty, truncated}
    assert not empty.exists() and not truncated.exists()
    assert report.removed == [] and len(report.kept) == 10


def test_temp_dirs_stale_vs_live(run: Path) -> None:
    dead = _tmp_dir(run, 110, _dead_pid())
    live_fresh = _tmp_dir(run, 120, os.getpid())
    live_silent = _tmp_dir(run, 130, os.getpid(), age_s=3600)  # a reused pid, nothing written for an hour
    infos = {i.path: i for i in ck.list_checkpoints(run)}
    assert infos[live_fresh].in_progress and not infos[dead].in_progress and not infos[live_silent].in_progress
    assert "gone" in infos[dead].reason and "being written" in infos[live_fresh].reason

    # a save in progress is not worth a warning; a dead one is
    with pytest.warns(ck.PartialCheckpointWarning) as rec:
        assert ck.latest_checkpoint(run) == run / "step_0000100"
    messages = " ".join(str(w.message) for w in rec)
    assert dead.name in messages and live_fresh.name not in messages

    report = ck.prune_checkpoints(run, keep_last=20)
    assert set(report.partial_removed) == {dead, live_silent}
    assert live_fresh.exists() and live_fresh in report.left_alone
    assert not dead.exists() and not live_silent.exists()
    assert report.freed_bytes == sum(report.sizes.values()) >= 2000


def test_live_writer_in_another_process(run: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        d = _tmp_dir(run, 110, sleeper.pid)
        ck.prune_checkpoints(run, keep_last=1)
        assert d.exists()
        sleeper.kill()
        sleeper.wait()
        ck.prune_checkpoints(run, keep_last=1)
        assert not d.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reused_pid_is_not_a_live_writer(run: Path) -> None:
    """After a crash, a restarted training process (or anything else) may get the crashed
    writer's pid -- the norm in containers. A process that started after the temp dir was
    written cannot be its writer, so the leftover goes even though it is only 30 s old."""
    newcomer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        d = _tmp_dir(run, 110, newcomer.pid, age_s=30)
        info = next(i for i in ck.list_checkpoints(run) if i.path == d)
        assert not info.in_progress
        ck.prune_checkpoints(run, keep_last=1)
        assert not d.exists()
    finally:
        newcomer.kill()
        newcomer.wait()


def test_argument_and_dir_errors(tmp_path: Path, run: Path) -> None:
    with pytest.raises(CheckpointError, match="no run directory"):
        ck.prune_checkpoints(tmp_path / "nope", keep_last=1)
    with pytest.raises(ConfigError):
        ck.prune_checkpoints(run, keep_last=-1)
    with pytest.raises(ConfigError):
        ck.prune_checkpoints(run, keep_last=1, keep_every=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    report = ck.prune_checkpoints(empty, keep_last=1)
    assert report.removed == report.kept == report.partial_removed == [] and report.freed_bytes == 0


def _render(report: ck.PruneReport) -> str:
    buf = io.StringIO()
    render_prune(report, Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


def test_render_prune(run: Path) -> None:
    stale = _tmp_dir(run, 110, _dead_pid())
    dry = _render(ck.prune_checkpoints(run, keep_last=8, dry_run=True))
    assert "would remove" in dry and "step_0000010" in dry and "step_0000020" in dry and stale.name in dry
    assert "would free" in dry and "nothing was deleted" in dry
    assert (run / "step_0000010").exists()

    out = _render(ck.prune_checkpoints(run, keep_last=8))
    assert "removed" in out and "would" not in out
    import re

    assert re.search(r"step_0000010  \d+\.\d\d KiB", out), "each removed path is shown with its size"
    assert "freed" in out
    assert "nothing to prune" in _render(ck.prune_checkpoints(run, keep_last=8))
