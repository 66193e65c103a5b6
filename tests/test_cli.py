"""The Typer app through CliRunner: every command has help, and every known mistake is one
``error:`` line on stderr with a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from ramgpt.cli import app
from ramgpt.config import available_profiles

COMMANDS = {"train", "generate", "doctor", "estimate-memory", "prune-ckpt", "push", "export", "profiles"}
# wide and plain: rich neither wraps nor colours what we parse
ENV = {"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb", "RAMGPT_DEBUG": ""}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run every command from an empty directory, without a developer's RAMGPT_* settings."""
    monkeypatch.chdir(tmp_path)
    for k in list(os.environ):
        if k.startswith("RAMGPT_"):
            monkeypatch.delenv(k)


def invoke(*args: str, **env: str):
    return CliRunner().invoke(app, list(args), env={**ENV, **env})


def registered_commands() -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def assert_one_error_line(result, *needles: str, allow_warnings: bool = False) -> str:
    """Non-zero exit, no traceback, and the whole output is one line starting with 'error:'
    (with ``allow_warnings``, ``warning: ...`` lines may come before it)."""
    out = result.output  # stdout and stderr interleaved (click >= 8.2 keeps them apart too)
    assert result.exit_code != 0, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    # "phase: ..." lines are train's start-up progress on stdout (plain output), not part of the error
    lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("phase: ")]
    if allow_warnings:
        lines = [ln for ln in lines if not ln.startswith("warning: ")]
    assert len(lines) == 1, out
    assert lines[0].startswith("error:"), out
    stdout = [ln for ln in result.stdout.splitlines() if ln.strip() and not ln.startswith("phase: ")]
    assert stdout == [], "errors go to stderr, not stdout"
    assert result.stderr.strip().splitlines()[-1] == lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# help


def test_app_lists_the_commands():
    assert COMMANDS <= registered_commands()
    r = invoke("--help")
    assert r.exit_code == 0, r.output
    for name in COMMANDS:
        assert name in r.output


def test_no_arguments_shows_help():
    r = invoke()
    assert "Usage" in r.output and "train" in r.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and command in r.output
    assert "Traceback" not in r.output


def test_short_help_option():
    assert invoke("-h").exit_code == 0
    assert invoke("train", "-h").exit_code == 0


def test_profiles_lists_every_shipped_profile():
    r = invoke("profiles")
    assert r.exit_code == 0, r.output
    listed = {ln.split(":", 1)[0].strip() for ln in r.stdout.splitlines() if ":" in ln}
    assert set(available_profiles()) == listed
    assert "~1.1B params" in r.stdout  # the description comes with the name


# ---------------------------------------------------------------------------------------------
# one-line errors


def test_train_unknown_profile():
    line = assert_one_error_line(invoke("train", "--profile", "nope"), "nope")
    for name in available_profiles():
        assert name in line


def test_train_bad_value():
    r = invoke("train", "--set", "optim.lr=-1")
    assert_one_error_line(r, "optim.lr")
    assert r.exit_code == 2


def test_train_unknown_key():
    assert_one_error_line(invoke("train", "--set", "optim.lrr=1"), "optim.lrr", "unknown key")


def test_train_malformed_set():
    assert_one_error_line(invoke("train", "--set", "optim.lr"), "--set")


def test_train_missing_text_path():
    r = invoke("train", "--profile", "micro-test", "--set", "data.source=text", "--set", "data.path=/nonexistent")
    assert_one_error_line(r, "/nonexistent")


def test_train_hub_tokenizer_offline(tmp_path):
    r = invoke(
        "train",
        "--profile",
        "micro-test",
        "--set",
        "data.tokenizer=gpt2",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
    )
    line = assert_one_error_line(r, "gpt2", "embedded")
    assert "offline" in line.lower()


def test_generate_missing_checkpoint():
    assert_one_error_line(invoke("generate", "-c", "/nonexistent", "-p", "hi"), "/nonexistent")


def _corrupt_run(tmp_path):
    run = tmp_path / "run"
    (run / "step_0000001").mkdir(parents=True)
    (run / "step_0000001" / "meta.json").write_text("{garbage", encoding="utf-8")
    return run


# pytest captures the PartialCheckpointWarning here; the subprocess test below shows what leaks
@pytest.mark.filterwarnings("ignore::ramgpt.checkpoint.PartialCheckpointWarning")
def test_generate_corrupt_checkpoint_in_run_dir(tmp_path):
    run = _corrupt_run(tmp_path)
    r = invoke("generate", "-c", str(run), "-p", "hi")
    assert_one_error_line(r, "no complete checkpoint", str(run), allow_warnings=True)
    assert r.exit_code == 4


def test_generate_corrupt_checkpoint_dir(tmp_path):
    run = _corrupt_run(tmp_path)
    r = invoke("generate", "-c", str(run / "step_0000001"), "-p", "hi")
    assert_one_error_line(r, "step_0000001", "corrupt")
    assert r.exit_code == 4


def test_generate_needs_a_prompt_or_interactive(tmp_path):
    assert_one_error_line(invoke("generate", "-c", str(tmp_path)), "-p")


@pytest.mark.slow
def test_generate_corrupt_checkpoint_real_stderr_has_no_python_warning(tmp_path):
    """Outside pytest (which captures warnings), what a user actually sees."""
    run = _corrupt_run(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAMGPT_", "PYTHONWARNINGS"))}
    proc = subprocess.run(
        [sys.executable, "-m", "ramgpt", "generate", "-c", str(run), "-p", "hi"],
        capture_output=True,
        text=True,
        env={**env, **ENV},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert sum(ln.startswith("error:") for ln in lines) == 1, proc.stderr
    assert all(ln.startswith(("error:", "warning:")) for ln in lines), proc.stderr


def test_estimate_memory_unknown_profile():
    assert_one_error_line(invoke("estimate-memory", "--profile", "nope"), "nope")


def test_estimate_memory_negative_vram():
    assert_one_error_line(invoke("estimate-memory", "--vram-gib", "-1"), "--vram-gib")


def test_prune_missing_run_dir():
    assert_one_error_line(invoke("prune-ckpt", "/nonexistent", "--keep-last", "1"), "/nonexistent")


def test_push_dry_run_without_repo_id(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert_one_error_line(invoke("push", str(run), "--dry-run"), "--repo-id")


def test_debug_variable_shows_the_traceback_instead():
    r = invoke("train", "--profile", "nope", RAMGPT_DEBUG="1")
    assert r.exit_code != 0
    from ramgpt.errors import ConfigError

    assert isinstance(r.exception, ConfigError)


# ---------------------------------------------------------------------------------------------
# a command that works, end to end through the CLI (cheap: no training)


def test_estimate_memory_json_for_micro_test():
    r = invoke("estimate-memory", "--profile", "micro-test", "--json", "--vram-gib", "6", "--ram-gib", "16")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert isinstance(data, dict) and data


@pytest.mark.slow
def test_ctrl_c_exits_130_after_saving(tmp_path) -> None:
    """Ctrl-C (SIGINT) in a plain run: a checkpoint of the step reached, one summary line, exit 130."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "ramgpt", "train", "--profile", "micro-test", "--no-tui",
                             "--max-steps", "100000", "--out-dir", "r"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a background job's shell (`nohup ... &`) ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    rows = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (rows.exists() and rows.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert any(p.name.startswith("step_") for p in (tmp_path / "r").iterdir())
    assert "interrupted:" in err and "Traceback" not in err


def test_the_command_set_is_frozen() -> None:
    """Adding, renaming or removing a command is a deliberate change: update this list with it."""
    import typer.main

    from ramgpt.cli import app

    group = typer.main.get_command(app)
    assert sorted(group.commands) == ["doctor", "estimate-memory", "export", "generate", "profiles", "prune-ckpt",
                                      "push", "tokenizer", "train"]
    assert sorted(group.commands["tokenizer"].commands) == ["stats", "train"]


def test_version_and_help_read_like_a_manual() -> None:
    from ramgpt import __version__
    from ramgpt.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"ramgpt {__version__}"
    res = CliRunner().invoke(app, ["prune-ckpt", "--help"], env={"COLUMNS": "120"})
    assert "RUN_DIR" in res.output and "{run_dir}" not in res.output
    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "120"})
    assert "<bool>" not in res.output and "<str>" not in res.output and "FIELD=VALUE" in res.output


@pytest.mark.slow
def test_prune_in_a_read_only_run_dir_is_one_line(tmp_path) -> None:
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no private mount namespace here")
    run = tmp_path / "run"
    res = CliRunner().invoke(app_for_tests(), ["train", "--profile", "micro-test", "--no-tui", "--max-steps", "4",
                                               "--set", "checkpoint.save_interval_steps=2", "--out-dir", str(run)])
    assert res.exit_code == 0, res.output
    cmd = (f"mount --bind {run} {run} && mount -o remount,ro,bind {run} && "
           f"exec {sys.executable} -m ramgpt prune-ckpt {run} --keep-last 1")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 4, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Read-only file system" in lines[0] and str(run) in lines[0]


def app_for_tests():
    from ramgpt.cli import app

    return app
