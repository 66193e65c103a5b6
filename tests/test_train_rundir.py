"""The run directory: one-line errors for an unwritable one, and a lock against two trainings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ramgpt.cli import app
from ramgpt.errors import RunDirError
from ramgpt.train.rundir import LOCK_FILE, RunDir

ARGS = ["train", "--profile", "micro-test", "--no-tui", "--max-steps", "2", "--set", "checkpoint.save_final=false"]


def test_a_second_training_on_a_locked_run_dir_stops_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = RunDir(run).open()  # another "training process" holds the lock
    try:
        res = CliRunner().invoke(app, [*ARGS, "--out-dir", str(run)])
        assert res.exit_code == RunDirError.exit_code, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "in use by another training process" in lines[0]
        assert f"pid {os.getpid()}" in lines[0]
        assert not (run / "metrics.jsonl").exists(), "the refused run wrote nothing"
    finally:
        holder.close()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))
    rd = RunDir(run).open()  # no process holds the flock: taken over
    try:
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        rd.close()


def test_a_file_where_the_run_dir_should_be_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    res = CliRunner().invoke(app, [*ARGS, "--out-dir", str(blocker / "sub")])
    assert res.exit_code == RunDirError.exit_code
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(blocker / "sub") in lines[0] and "choose another --out-dir" in lines[0]


def _read_only_runner() -> list[str] | None:
    """A command prefix that runs a program with DIR (its last argument, via $RO) mounted read-only:
    a private mount namespace (root, or a user namespace), so nothing outside the test changes."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True)
    return ["unshare", "-rm", "sh", "-c"] if probe.returncode == 0 else None


@pytest.mark.slow
def test_a_read_only_run_dir_is_one_line_naming_the_path(tmp_path: Path) -> None:
    runner = _read_only_runner()
    if runner is None:
        pytest.skip("cannot make a read-only mount here (no unshare / user namespaces)")
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m ramgpt "
           + " ".join(ARGS) + f" --out-dir {ro / 'run'}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run([*runner, cmd], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == RunDirError.exit_code, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert str(ro / "run") in lines[0] and "read-only" in lines[0] and "Traceback" not in res.stderr
