"""Several processes (torchrun, gloo on the CPU): the same global batch gives the same losses on 1
and 2 ranks, checkpoints do not depend on the number of ranks, and bad setups are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ramgpt.dist import DistContext, chunk_owners, from_env, torchrun_command
from ramgpt.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["train", "--profile", "micro-test", "--no-tui", "--set", "logging.log_interval=1",
          "--set", "scheduler.decay_steps=6", "--set", "checkpoint.save_interval_steps=3"]
STREAMED = ["--set", "runtime.engine=streamed", "--set", "runtime.seqs_per_pass=2"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _ramgpt(args: list[str], cwd: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "ramgpt"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "ramgpt"]
    return subprocess.run([*head, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["streamed", "resident"])
def test_two_ranks_give_the_losses_of_one(tmp_path: Path, engine: str) -> None:
    extra = STREAMED if engine == "streamed" else []
    one = _ramgpt([*COMMON, *extra, "--max-steps", "6", "--out-dir", "one"], tmp_path)
    two = _ramgpt([*COMMON, *extra, "--max-steps", "6", "--out-dir", "two"], tmp_path, ranks=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)  # float32 reduction order only
    assert two.stderr.count("done: 6 steps") == 1, "the other rank prints nothing but errors"


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank_and_back(tmp_path: Path) -> None:
    steps = lambda n: ["--max-steps", str(n)]  # noqa: E731
    assert _ramgpt([*COMMON, *STREAMED, *steps(6), "--out-dir", "straight"], tmp_path).returncode == 0
    first = _ramgpt([*COMMON, *STREAMED, *steps(3), "--out-dir", "moved"], tmp_path, ranks=2)
    assert first.returncode == 0, first.stderr
    meta = json.loads((tmp_path / "moved" / "step_0000003" / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(meta["rng_ranks"]) == 2
    second = _ramgpt([*COMMON, *STREAMED, *steps(6), "--out-dir", "moved", "--resume", "latest"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert _losses(tmp_path / "moved") == pytest.approx(_losses(tmp_path / "straight"), rel=1e-5, abs=1e-6)
    back = _ramgpt([*COMMON, *STREAMED, *steps(3), "--out-dir", "back"], tmp_path)
    assert back.returncode == 0
    again = _ramgpt([*COMMON, *STREAMED, *steps(6), "--out-dir", "back", "--resume", "latest"], tmp_path, ranks=2)
    assert again.returncode == 0, again.stderr
    assert _losses(tmp_path / "back") == pytest.approx(_losses(tmp_path / "straight"), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_ranks_started_with_different_profiles_stop_with_one_line(tmp_path: Path) -> None:
    entry = tmp_path / "entry.py"
    entry.write_text(
        "import os, runpy, sys\n"
        "if os.environ['RANK'] == '1': os.environ['RAMGPT_OPTIM__LR'] = '1e-3'\n"
        "sys.argv = ['ramgpt', *sys.argv[1:]]\n"
        "runpy.run_module('ramgpt', run_name='__main__')\n"
    )
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(entry), *COMMON, "--max-steps", "2", "--out-dir", "r"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert errors and all("rank 1 runs another profile than rank 0" in ln for ln in errors), res.stderr
    # torchrun prints its own summary of the failed ranks; no frame of ramgpt's code may appear
    assert f'File "{ROOT / "ramgpt"}' not in res.stderr


def test_torchrun_env_is_read_and_gpus_start_torchrun() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "TORCHELASTIC_RUN_ID": "job/1"}
    ctx = from_env(env)
    assert ctx == DistContext(rank=3, world=4, local_rank=1, local_world=2, node=1, nodes=2, job="job_1")
    assert ctx.node_ranks() == [2, 3] and not ctx.main
    assert from_env({}) is None
    with pytest.raises(ConfigError, match="nproc-per-node"):
        from_env({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2"})
    cmd = torchrun_command(2, ["ramgpt", "train", "--gpus", "2", "--profile", "1b", "--gpus=2"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ramgpt", "train",
                       "--profile", "1b"]


def test_chunks_are_shared_out_by_bytes() -> None:
    sizes = [300, 100, 100, 100, 100, 100, 10]  # a big embedding, blocks, a small head
    assert chunk_owners(sizes, 1) == [0] * 7
    owners = chunk_owners(sizes, 2)
    assert owners == sorted(owners) and set(owners) == {0, 1}
    per = [sum(s for s, o in zip(sizes, owners) if o == r) for r in (0, 1)]
    assert abs(per[0] - per[1]) <= 310


def test_too_little_shared_memory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ramgpt.engine import nodeshare

    class _Comm:
        ctx = DistContext(0, 2, 0, 2, 0, 1, "t")

        def gather_objects(self, obj):
            return [obj, ""]

    monkeypatch.setattr(nodeshare.shutil, "disk_usage", lambda p: SimpleNamespace(free=2**30))
    with pytest.raises(ConfigError, match=r"has 1\.0 GiB free .* needs 6\.0 GiB.*--shm-size"):
        nodeshare.NodeShare(_Comm(), masters_b=2 * 2**30, moments_b=4 * 2**30, n_chunks=4,
                            shm_dir=tmp_path)
