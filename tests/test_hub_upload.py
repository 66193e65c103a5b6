"""Pushing to the Hub without the Hub (ramgpt.hub.upload): an injected (or monkeypatched) HfApi records what would
be sent; the real client is pointed at dead localhost ports to check that failures are fast,
one line, and never show the token."""

from __future__ import annotations

import inspect
import json
import os
import socket
import time
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

import ramgpt.hub as hub
import ramgpt.hub.upload as upload  # module globals the tests patch (LARGE_PUSH_FILES, _probe)
from ramgpt.checkpoint import save_checkpoint
from ramgpt.config import load_profile
from ramgpt.errors import CheckpointError, HubError
from ramgpt.hub import PushPlan, push, push_checkpoint_background, remote_delete_patterns

TOKEN = "hf_SeCrEtToKeN0123456789abcdef"
REPO = "alice/tiny-run"


# ---------------------------------------------------------------------------------------------
# fixtures


class FakeTokenizer:
    def save(self, directory) -> None:
        d = Path(directory)
        (d / "tokenizer.json").write_text('{"model": {}}')
        (d / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')


class FakeApi:
    """Records every call as (method, args, kwargs); the upload methods also resolve the
    patterns against the folder exactly as huggingface_hub does, into ``uploaded``."""

    def __init__(self, fail_with: Exception | None = None, large: bool = False) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: list[str] = []
        self.fail_with = fail_with
        if large:
            self.upload_large_folder = self._upload_large_folder

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        real = getattr(HfApi, name, None)
        if real is not None:  # the call must also be valid for the installed huggingface_hub
            inspect.signature(real).bind(None, *args, **kwargs)
        self.calls.append((name, args, kwargs))
        if self.fail_with is not None:
            raise self.fail_with

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def kwargs(self, name: str) -> dict:
        return next(kw for n, _, kw in self.calls if n == name)

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", args, kwargs)
        from huggingface_hub.hf_api import RepoUrl

        return RepoUrl(f"https://huggingface.co/{args[0]}")

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", args, kwargs)

    def delete_files(self, *args, **kwargs):
        self._record("delete_files", args, kwargs)

    def _resolve(self, kwargs: dict) -> None:
        folder = Path(kwargs["folder_path"])
        rel = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self.uploaded = list(
            filter_repo_objects(rel, allow_patterns=kwargs["allow_patterns"], ignore_patterns=kwargs["ignore_patterns"])
        )

    def upload_folder(self, **kwargs):
        self._record("upload_folder", (), kwargs)
        self._resolve(kwargs)

    def _upload_large_folder(self, **kwargs):
        self._record("upload_large_folder", (), kwargs)
        self._resolve(kwargs)


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch):
    """No token unless a test gives one: no HF_TOKEN, an empty login cache."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


def tiny_state() -> dict[str, torch.Tensor]:
    profile = load_profile(
        "micro-test",
        [
            "model.n_layer=1",
            "model.n_embd=16",
            "model.n_head=2",
            "model.vocab_size=32",
            "model.block_size=16",
            "data.seq_len=16",
        ],
        use_env=False,
    )
    from ramgpt.model import GPT

    return GPT(profile.model).state_dict(), profile


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """step_0000010 and step_0000020 complete (with optimizer state), a .tmp- leftover of an
    interrupted save, a step dir whose meta.json never got written, metrics and config."""
    state, profile = tiny_state()
    run = tmp_path / "run"
    opt = {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    for step in (10, 20):
        meta = {"step": step, "tokens_seen": step * 100, "config": profile.to_public_dict(), "eval_loss": 4.0}
        save_checkpoint(run, step, state, opt, meta, FakeTokenizer())
    tmp = run / ".tmp-step_0000030-999999-abcd1234"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    broken = run / "step_0000040"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"no meta yet")
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 5.0}\n')
    (run / "config.yaml").write_text("name: micro-test\n")
    return run


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def all_text_under(path: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# what gets sent


def test_push_run_dir_calls(run_dir):
    api = FakeApi()
    plan = push(run_dir, repo_id=REPO, private=True, message="nightly", token=TOKEN, api=api)

    assert api.names() == ["create_repo", "upload_folder"]
    create = api.calls[0]
    assert create[1] == (REPO,)
    assert create[2]["private"] is True and create[2]["exist_ok"] is True and create[2]["repo_type"] == "model"
    up = api.kwargs("upload_folder")
    assert up["folder_path"] == str(run_dir) and up["repo_id"] == REPO
    assert up["revision"] is None and up["commit_message"] == "nightly" and up["delete_patterns"] is None
    # optimizer state excluded by default, by pattern as well as by file list
    assert {"optimizer.safetensors", "*/optimizer.safetensors", "optimizer.json", "*/optimizer.json"} <= set(
        up["ignore_patterns"]
    )
    assert not any("optimizer" in p for p in up["allow_patterns"])

    sent = set(api.uploaded)
    assert sent == {p for p, _ in plan.files}
    for step in ("step_0000010", "step_0000020"):
        assert {f"{step}/model.safetensors", f"{step}/meta.json", f"{step}/tokenizer/tokenizer.json"} <= sent
    assert {"metrics.jsonl", "config.yaml", "README.md"} <= sent
    # partial checkpoints never go
    assert not any(p.startswith((".tmp-", "step_0000040")) for p in sent)
    assert any("step_0000040" in s for s in plan.skipped) and any(".tmp-step_0000030" in s for s in plan.skipped)
    assert plan.url == f"https://huggingface.co/{REPO}"
    assert plan.total_bytes == sum(n for _, n in plan.files) == sum((run_dir / p).stat().st_size for p in sent)


def test_with_optimizer_includes_optimizer_state(run_dir):
    api = FakeApi()
    push(run_dir, repo_id=REPO, token=TOKEN, with_optimizer=True, api=api)
    up = api.kwargs("upload_folder")
    assert not any("optimizer" in p for p in up["ignore_patterns"])
    assert {"step_0000020/optimizer.safetensors", "step_0000020/optimizer.json"} <= set(api.uploaded)
    assert not any(p.startswith((".tmp-", "step_0000040")) for p in api.uploaded)


def test_include_exclude_and_partial_never_sent(run_dir):
    api = FakeApi()
    plan = push(run_dir, repo_id=REPO, token=TOKEN, include=["*"], exclude=["metrics.jsonl"], api=api)
    sent = set(api.uploaded)
    assert "metrics.jsonl" not in sent and "config.yaml" in sent
    assert not any(p.startswith((".tmp-", "step_0000040")) for p in sent)  # even with include "*"
    assert "metrics.jsonl" in api.kwargs("upload_folder")["ignore_patterns"]
    assert {p for p, _ in plan.files} == sent

    only = push(run_dir, repo_id=REPO, include=["step_0000020/*"], dry_run=True)
    assert {p for p, _ in only.files} == {
        "step_0000020/model.safetensors",
        "step_0000020/meta.json",
        "step_0000020/tokenizer/tokenizer.json",
        "step_0000020/tokenizer/tokenizer_config.json",
    }
    assert only.generated == []


def test_revision_creates_branch_and_url(run_dir):
    api = FakeApi()
    plan = push(run_dir, repo_id=REPO, token=TOKEN, revision="exp-1", api=api)
    assert api.names() == ["create_repo", "create_branch", "upload_folder"]
    br = api.calls[1]
    assert br[1] == (REPO,) and br[2]["branch"] == "exp-1" and br[2]["exist_ok"] is True
    assert api.kwargs("upload_folder")["revision"] == "exp-1"
    assert plan.url.endswith("/tree/exp-1")


def test_push_single_checkpoint_uploads_under_its_name(run_dir):
    api = FakeApi()
    plan = push(run_dir / "step_0000010", repo_id=REPO, token=TOKEN, delete_patterns=["step_0000000/*"], api=api)
    up = api.kwargs("upload_folder")
    assert up["folder_path"] == str(run_dir)  # the parent: paths in the repo mirror the run dir
    assert set(api.uploaded) == {p for p, _ in plan.files}
    assert all(p.startswith("step_0000010/") for p in api.uploaded)
    assert "step_0000010/model.safetensors" in api.uploaded and "step_0000010/optimizer.json" not in api.uploaded
    assert up["delete_patterns"] == ["step_0000000/*"]
    assert plan.source == "checkpoint" and plan.generated == []


def test_partial_checkpoint_dir_is_refused(run_dir):
    with pytest.raises(CheckpointError) as e:
        push(run_dir / "step_0000040", repo_id=REPO, dry_run=True)
    assert "\n" not in str(e.value)


def test_push_exported_model_dir(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "generation_config.json"):
        (out / name).write_text("{}")
    api = FakeApi()
    plan = push(out, repo_id=REPO, token=TOKEN, api=api)
    assert plan.source == "export"
    assert set(api.uploaded) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "generation_config.json",
    }


def test_large_push_uses_upload_large_folder(run_dir, monkeypatch):
    monkeypatch.setattr(upload, "LARGE_PUSH_FILES", 3)
    monkeypatch.setattr(upload, "_hub_has_large_folder", lambda: True)
    api = FakeApi(large=True)
    plan = push(run_dir, repo_id=REPO, token=TOKEN, delete_patterns=["step_0000001/*"], api=api)
    assert plan.method == "upload_large_folder"
    assert api.names() == ["create_repo", "upload_large_folder", "delete_files"]
    up = api.kwargs("upload_large_folder")
    assert "commit_message" not in up and "delete_patterns" not in up  # not supported there
    assert up["repo_type"] == "model" and up["private"] is True  # private unless asked otherwise
    assert api.kwargs("delete_files")["delete_patterns"] == ["step_0000001/*"]
    assert set(api.uploaded) == {p for p, _ in plan.files}


def test_huggingface_hub_2_has_no_large_folder_so_upload_folder_is_used(run_dir, monkeypatch):
    monkeypatch.setattr(upload, "LARGE_PUSH_FILES", 3)
    import huggingface_hub

    expected = "upload_large_folder" if hasattr(huggingface_hub.HfApi, "upload_large_folder") else "upload_folder"
    assert push(run_dir, repo_id=REPO, dry_run=True).method == expected


def test_default_api_is_huggingface_hub_hfapi(run_dir, monkeypatch):
    made = []

    class Recorder(FakeApi):
        def __init__(self, endpoint=None, token=None, **kw):
            super().__init__()
            made.append((endpoint, token))

    monkeypatch.setattr("huggingface_hub.HfApi", Recorder)
    monkeypatch.setattr(upload, "_probe", lambda endpoint, timeout: None)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example:1234")
    push(run_dir, repo_id=REPO)
    assert made == [("http://hub.example:1234", TOKEN)]


def test_token_precedence(monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_cache")
    assert hub.resolve_token() == "hf_cache"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert hub.resolve_token() == "hf_env"
    assert hub.resolve_token("hf_flag") == "hf_flag"


# ---------------------------------------------------------------------------------------------
# dry run and errors


def test_dry_run_makes_no_call_and_needs_no_token(run_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("network or token lookup during a dry run")

    monkeypatch.setattr("huggingface_hub.HfApi", boom)
    monkeypatch.setattr("huggingface_hub.get_token", boom)
    monkeypatch.setattr(upload, "_probe", boom)
    plan = push(
        run_dir,
        repo_id=REPO,
        private=True,
        revision="dev",
        message="m",
        dry_run=True,
        delete_patterns=remote_delete_patterns([5]),
    )
    assert plan.dry_run and plan.url is None
    assert (plan.repo_id, plan.revision, plan.private, plan.message) == (REPO, "dev", True, "m")
    assert plan.delete_patterns == ["step_0000005/*"]
    assert plan.files and all(isinstance(p, str) and isinstance(n, int) for p, n in plan.files)
    assert not (run_dir / "README.md").exists()  # a dry run writes nothing
    # the same plan as a real push computes
    real = push(
        run_dir,
        repo_id=REPO,
        private=True,
        revision="dev",
        message="m",
        token=TOKEN,
        api=FakeApi(),
        delete_patterns=["step_0000005/*"],
    )
    assert real.files == plan.files and real.method == plan.method


def test_missing_token_is_one_line(run_dir):
    api = FakeApi()
    with pytest.raises(HubError) as e:
        push(run_dir, repo_id=REPO, api=api)
    assert str(e.value) == "no Hugging Face token: set HF_TOKEN, pass --token, or run `hf auth login`"
    assert api.calls == []


@pytest.mark.parametrize("repo_id", [None, "", "  "])
def test_missing_repo_id_is_one_line(run_dir, repo_id):
    with pytest.raises(HubError) as e:
        push(run_dir, repo_id=repo_id, token=TOKEN, dry_run=True)
    assert "repo id" in str(e.value) and "\n" not in str(e.value)


def test_bad_repo_id_and_not_a_run_dir(tmp_path, run_dir):
    with pytest.raises(HubError, match="invalid Hub repo id"):
        push(run_dir, repo_id="a/b/c", dry_run=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="not a run directory"):
        push(tmp_path / "empty", repo_id=REPO, dry_run=True)


def test_hub_exception_becomes_one_line_without_token(run_dir):
    api = FakeApi(fail_with=ConnectionError(f"boom with {TOKEN}\nsecond line\n  traceback-ish"))
    with pytest.raises(HubError) as e:
        push(run_dir, repo_id=REPO, token=TOKEN, api=api)
    msg = str(e.value)
    assert "\n" not in msg and TOKEN not in msg and "boom" in msg


def test_http_401_message(run_dir):
    class Unauthorized(Exception):
        response = types.SimpleNamespace(status_code=401)

    with pytest.raises(HubError, match="rejected the token"):
        push(run_dir, repo_id=REPO, token=TOKEN, api=FakeApi(fail_with=Unauthorized("401")))


def test_token_never_in_plan_or_files(run_dir):
    api = FakeApi()
    plan = push(run_dir, repo_id=REPO, token=TOKEN, api=api)
    for text in (repr(plan), str(plan), json.dumps(plan.to_dict())):
        assert TOKEN not in text
    assert (run_dir / "README.md").exists()  # the generated card was written before uploading
    assert TOKEN not in all_text_under(run_dir)
    # the token goes to the client as `token=` and nowhere else
    for _name, args, kwargs in api.calls:
        assert TOKEN not in repr(args) and TOKEN not in repr({k: v for k, v in kwargs.items() if k != "token"})


# ---------------------------------------------------------------------------------------------
# the real client against dead endpoints: fast, one line, no token


def test_unreachable_endpoint_fails_fast(run_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(HubError) as e:
        push(run_dir, repo_id=REPO, token=TOKEN)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith("cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "\n" not in msg and TOKEN not in msg and "Traceback" not in msg
    assert not (run_dir / "README.md").exists()


def test_silent_endpoint_times_out(run_dir, monkeypatch):
    """A host that accepts connections but never answers (the black-hole case)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        plan = hub.plan_push(run_dir, repo_id=REPO, dry_run=False)
        t0 = time.monotonic()
        with pytest.raises(HubError, match="cannot reach"):
            hub.execute_push(plan, token=TOKEN, probe_timeout_s=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def cli_app():
    from typer.testing import CliRunner

    from ramgpt.cli import app

    return CliRunner(), app


def test_cli_push_dry_run_never_prints_token(run_dir, cli_app):
    runner, app = cli_app
    res = runner.invoke(
        app,
        ["push", str(run_dir), "--repo-id", REPO, "--token", TOKEN, "--dry-run", "--private"],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output
    assert "would push" in res.output and REPO in res.output and "dry run: nothing was sent" in res.output
    assert "step_0000020/model.safetensors" in res.output
    assert "skipped optimizer state of 2 checkpoints" in res.output
    assert TOKEN not in all_text_under(run_dir)


def test_cli_push_unreachable_is_one_line_exit_7(run_dir, cli_app):
    runner, app = cli_app
    res = runner.invoke(
        app,
        ["push", str(run_dir), "--repo-id", REPO, "--token", TOKEN],
        env={"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "COLUMNS": "300"},
    )
    assert res.exit_code == 7
    out = res.output.strip()
    assert out.startswith("error: cannot reach the Hugging Face Hub") and "\n" not in out
    assert TOKEN not in out and "Traceback" not in out


def test_cli_push_without_token_or_repo(run_dir, cli_app):
    runner, app = cli_app
    res = runner.invoke(app, ["push", str(run_dir), "--repo-id", REPO], env={"COLUMNS": "300"})
    assert res.exit_code == 7 and "no Hugging Face token" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["push", str(run_dir), "--dry-run"], env={"COLUMNS": "300"})
    assert res.exit_code == 7 and "no Hub repo id" in res.output


def test_push_is_private_by_default_as_the_profile(run_dir):
    """`ramgpt push` and the pushes during training create the repo with the same visibility."""
    from ramgpt.config import CheckpointConfig

    assert CheckpointConfig().hub_private is True
    api = FakeApi()
    push(run_dir, repo_id=REPO, token=TOKEN, api=api)
    assert api.kwargs("create_repo")["private"] is True
    assert hub.plan_push(run_dir, repo_id=REPO).private is True


@pytest.mark.parametrize(("flags", "visibility"), [([], "private"), (["--private"], "private"), (["--public"], "public")])
def test_cli_push_visibility(run_dir, cli_app, monkeypatch, flags, visibility):
    runner, app = cli_app
    api = FakeApi()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda **kw: api)
    monkeypatch.setattr(upload, "_probe", lambda endpoint, timeout: None)
    res = runner.invoke(app, ["push", str(run_dir), "--repo-id", REPO, "--token", TOKEN, *flags], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert api.kwargs("create_repo")["private"] is (visibility == "private")
    assert f"(branch main, {visibility}, " in res.output


def test_cli_push_help_says_required_and_private(cli_app):
    runner, app = cli_app
    res = runner.invoke(app, ["push", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert res.exit_code == 0
    text = " ".join(ln.strip("│ ") for ln in res.output.splitlines())
    rows = {ln.split()[1]: ln for ln in res.output.splitlines() if ln.lstrip("│ *").startswith("--")}
    assert "required" in rows["--repo-id"].lower()
    assert "--public" in rows["--private"]
    assert "private (the default" in text


# ---------------------------------------------------------------------------------------------
# background pushes and rotation


def test_background_push_of_one_checkpoint(run_dir):
    api = FakeApi()
    done, errors = [], []
    h = push_checkpoint_background(
        run_dir / "step_0000020",
        repo_id=REPO,
        token=TOKEN,
        api=api,
        delete_patterns=remote_delete_patterns([10]),
        on_done=done.append,
        on_error=errors.append,
    )
    assert h.wait(10) and h.done() and h.ok and h.error is None
    assert errors == [] and len(done) == 1 and "step_0000020" in done[0]
    assert set(api.uploaded) == {
        "step_0000020/model.safetensors",
        "step_0000020/meta.json",
        "step_0000020/tokenizer/tokenizer.json",
        "step_0000020/tokenizer/tokenizer_config.json",
    }
    up = api.kwargs("upload_folder")
    assert up["delete_patterns"] == ["step_0000010/*"] and up["commit_message"] == "ramgpt: checkpoint at step 20"
    assert api.calls[0][2]["private"] is True
    assert TOKEN not in repr(h) and TOKEN not in repr(h.plan)


def test_background_push_with_optimizer(run_dir):
    api = FakeApi()
    h = push_checkpoint_background(run_dir / "step_0000020", repo_id=REPO, token=TOKEN, with_optimizer=True, api=api)
    assert h.wait(10) and h.ok
    assert "step_0000020/optimizer.safetensors" in api.uploaded


def test_background_push_failures_never_raise(run_dir):
    errors = []
    h = push_checkpoint_background(run_dir / "step_0000020", repo_id=REPO, api=FakeApi(), on_error=errors.append)
    assert h.wait(10) and h.error == hub.NO_TOKEN_MESSAGE and errors == [hub.NO_TOKEN_MESSAGE]

    h = push_checkpoint_background(
        run_dir / "step_0000020", repo_id=REPO, token=TOKEN, api=FakeApi(fail_with=RuntimeError(f"kaput {TOKEN}\nmore"))
    )
    assert h.wait(10) and not h.ok
    assert "kaput" in h.error and TOKEN not in h.error and "\n" not in h.error

    h = push_checkpoint_background(run_dir / "step_0000040", repo_id=REPO, token=TOKEN, api=FakeApi())
    assert h.wait(10) and "incomplete" in h.error

    def bad_sink(msg):
        raise ValueError("sink broke")

    h = push_checkpoint_background(run_dir / "step_0000020", repo_id=None, on_error=bad_sink)
    assert h.wait(10) and "repo id" in h.error


def test_background_push_against_dead_endpoint_is_quick(run_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    h = push_checkpoint_background(run_dir / "step_0000020", repo_id=REPO, token=TOKEN)
    assert h.wait(5)
    assert h.error.startswith("cannot reach") and TOKEN not in h.error


def test_remote_delete_patterns():
    assert remote_delete_patterns([10, "step_0000020", Path("/x/step_0000030"), 10]) == [
        "step_0000010/*",
        "step_0000020/*",
        "step_0000030/*",
    ]
    with pytest.raises(CheckpointError):
        remote_delete_patterns(["latest"])


def test_plan_is_plain_data():
    plan = PushPlan(
        repo_id=REPO,
        revision=None,
        private=False,
        message="m",
        files=[("a", 1)],
        total_bytes=1,
        delete_patterns=[],
        method="upload_folder",
        dry_run=True,
    )
    assert json.loads(json.dumps(plan.to_dict()))["files"] == [["a", 1]]
    assert os.fspath(Path(plan.folder or ".")) == "."


def test_render_push_after_a_push(run_dir):
    from rich.console import Console

    from ramgpt.render import MAX_FILE_ROWS, render_push

    plan = push(run_dir, repo_id=REPO, token=TOKEN, revision="exp", api=FakeApi())
    plan.files = plan.files + [(f"extra/{i}.bin", 2048) for i in range(MAX_FILE_ROWS)]
    console = Console(record=True, width=200)
    render_push(plan, console)
    text = console.export_text()
    assert text.startswith(f"pushed run {run_dir} -> {REPO} (branch exp, private, upload_folder)")
    assert f"done: https://huggingface.co/{REPO}/tree/exp" in text
    assert "more files" in text and "dry run" not in text and TOKEN not in text


def test_background_pushes_run_one_at_a_time(run_dir):
    import threading

    active, overlaps = [0], []
    lock = threading.Lock()

    class SlowApi(FakeApi):
        def upload_folder(self, **kwargs):
            with lock:
                active[0] += 1
                overlaps.append(active[0])
            time.sleep(0.2)
            with lock:
                active[0] -= 1
            super().upload_folder(**kwargs)

    api = SlowApi()
    handles = [
        push_checkpoint_background(run_dir / name, repo_id=REPO, token=TOKEN, api=api)
        for name in ("step_0000010", "step_0000020")
    ]
    assert all(h.wait(10) and h.ok for h in handles)
    assert max(overlaps) == 1 and api.names().count("upload_folder") == 2
