"""export_hf (ramgpt.hub.export) checked by loading the result with transformers and comparing
logits with ramgpt's on the same input; the model card."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402 - a hard dependency
import yaml
from test_hub_convert import random_model, small_profile

from ramgpt.checkpoint import save_checkpoint
from ramgpt.errors import CheckpointError
from ramgpt.hub import export_hf, model_card
from ramgpt.model import GPT

EOS = "<|endoftext|>"


def full_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits from ramgpt's chunks (forward_logits only returns the last position)."""
    with torch.no_grad():
        x, _ = model.embed(idx)
        for block in model.h:
            x, _ = block(x)
        return model.head.logits(x)


class TinyTokenizer:
    """Stands in for ramgpt.tokenizer.TextTokenizer: ``.save(dir)`` writes what transformers'
    AutoTokenizer needs (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {
            EOS: 0,
            "[UNK]": 1,
            **{w: i + 2 for i, w in enumerate(["hello", "world", "ramgpt", "gpt", "こんにちは"])},
        }
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        self._fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]")
        self.eos_id = 0

    def save(self, directory) -> None:
        self._fast.save_pretrained(str(directory))


def make_checkpoint(tmp_path: Path, profile, *, step: int = 20, tokenizer=None) -> tuple[Path, GPT]:
    model = random_model(profile)
    meta = {"step": step, "tokens_seen": step * 1024, "config": profile.to_public_dict(), "eval_loss": 3.25}
    path = save_checkpoint(tmp_path / "run", step, model.state_dict(), None, meta, tokenizer)
    return path, model


# ---------------------------------------------------------------------------------------------
# export_hf


@pytest.mark.parametrize(
    "sets", [(), ("model.tie_embeddings=false", "model.bias=false", "model.dropout=0.1")], ids=["gpt2", "untied-nobias"]
)
def test_export_logits_match_transformers(tmp_path, sets):
    profile = small_profile(*sets)
    ckpt, model = make_checkpoint(tmp_path, profile)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, profile.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits
    ours = full_logits(model, idx)
    assert theirs.dtype == ours.dtype == torch.float32
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == profile.model.tie_embeddings


def test_export_files_config_and_weights(tmp_path):
    profile = small_profile("model.dropout=0.05")
    ckpt, _ = make_checkpoint(tmp_path, profile, tokenizer=TinyTokenizer())
    out = export_hf(tmp_path / "run", tmp_path / "hf")  # a run dir: its newest complete checkpoint
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "special_tokens_map.json"} & names

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"]) == (2, 4, 64, 32, 96)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.05
    assert cfg["tie_word_embeddings"] is True
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 0

    # the tied weight is stored once, as transformers itself saves GPT-2
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert not any(k.startswith(("embed.", "head.")) for k in keys)


def test_export_tokenizer_loads_with_autotokenizer(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, small_profile(), tokenizer=TinyTokenizer())
    out = export_hf(ckpt, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == EOS and tok.eos_token_id == 0
    assert tok("hello world")["input_ids"] == [2, 3]
    assert tok.model_max_length == 32


def ramgpt_tokenizer(kind: str):
    """A real ramgpt TextTokenizer: a tiny byte-level BPE trained here, or the embedded one."""
    import ramgpt.tokenizer as tokmod
    if kind == "trained":
        texts = ["Hello world, ramgpt は GPT-2 を学習します。", "今日は良い天気です。 The weather is nice."] * 20
        return tokmod.train_byte_level_bpe(texts, vocab_size=320, min_frequency=1, name="tiny")
    try:
        return tokmod.load_tokenizer("embedded")
    except tokmod.TokenizerError as e:  # the shipped asset is built by tools/build_tokenizer.py
        pytest.skip(f"embedded tokenizer not available: {e}")


@pytest.mark.parametrize("kind", ["trained", "embedded"])
def test_export_ramgpt_tokenizer_loads_with_autotokenizer(tmp_path, kind):
    tok = ramgpt_tokenizer(kind)
    vocab = -(-tok.vocab_size // 64) * 64  # padded to 64, as profiles do
    ckpt, _ = make_checkpoint(tmp_path, small_profile(f"model.vocab_size={vocab}"), tokenizer=tok)
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("Hello, 世界. ramgpt", "今日は良い天気です。\n  spaces  and émoji 🙂"):
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.eos_token_id == tok.eos_id
    assert hf_tok.model_max_length == 32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == tok.eos_id


def test_export_falls_back_to_the_profiles_local_tokenizer(tmp_path):
    tok = ramgpt_tokenizer("trained")
    tok_dir = tok.save(tmp_path / "tok")
    ckpt, _ = make_checkpoint(tmp_path, small_profile(f"data.tokenizer={tok_dir}", "model.vocab_size=320"))
    assert not (ckpt / "tokenizer").exists()
    out = export_hf(ckpt, tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() and not (out / ".ramgpt-tokenizer").exists()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id


def test_model_card(tmp_path):
    profile = small_profile()
    ckpt, _ = make_checkpoint(tmp_path, profile, step=20)
    out = export_hf(ckpt, tmp_path / "hf", repo_id="alice/tiny-gpt")
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0"
    assert front["language"] == ["ja", "en"]
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["gpt2", "ramgpt"]
    assert "profile: `micro-test`" in card
    assert "optimizer steps: 20" in card
    assert "tokens seen: 20,480" in card
    assert "eval loss: 3.2500" in card
    config_block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == profile.to_public_dict()
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-gpt")' in card


def test_model_card_without_eval_loss():
    card = model_card({"step": 5, "config": {"name": "x"}}, kind="run")
    assert "eval loss: not measured" in card and "library_name" not in card


def test_export_refuses_to_write_into_the_checkpoint(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    with pytest.raises(CheckpointError, match="inside the checkpoint"):
        export_hf(ckpt, ckpt)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_hf(tmp_path / "nope", tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# the target directory: non-empty, --overwrite, file modes, OS errors (#10.1, #10.2, #10.11)


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


def user_files(out: Path) -> dict[str, bytes]:
    """The user's own files in an export target, before export runs."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "README.md": b"# my notes\n",
        "config.json": b'{"mine": true}\n',
        "notes.txt": b"keep me\n",
        "data/x.bin": b"\x00\x01",
        # what save_pretrained deletes as a "stale shard" when it writes into the folder itself
        "model-00001-of-00002.safetensors": b"user's own file",
    }
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return files


def test_export_refuses_a_non_empty_directory(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    out = tmp_path / "hf"
    files = user_files(out)
    with pytest.raises(CheckpointError) as e:
        export_hf(ckpt, out)
    msg = one_line_error(e)
    assert str(out) in msg and "not empty" in msg and "--overwrite" in msg
    assert {n: (out / n).read_bytes() for n in files} == files  # nothing touched
    assert sorted(p.name for p in out.iterdir()) == sorted({n.split("/")[0] for n in files})


def test_export_overwrite_replaces_only_what_export_writes(tmp_path):
    ckpt, model = make_checkpoint(tmp_path, small_profile(), tokenizer=TinyTokenizer())
    out = tmp_path / "hf"
    files = user_files(out)
    assert export_hf(ckpt, out, overwrite=True) == out
    # export's own files replaced the user's README.md and config.json ...
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert (out / "README.md").read_text().startswith("---\n")
    # ... and everything else is as it was
    for name in ("notes.txt", "data/x.bin", "model-00001-of-00002.safetensors"):
        assert (out / name).read_bytes() == files[name], name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.arange(8).view(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, full_logits(model, idx), atol=1e-5, rtol=0)


def test_export_into_an_existing_empty_directory(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    (tmp_path / "hf").mkdir()
    assert (export_hf(ckpt, tmp_path / "hf") / "model.safetensors").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_umask_mode(tmp_path, umask):
    ckpt, _ = make_checkpoint(tmp_path, small_profile(), tokenizer=TinyTokenizer())
    old = os.umask(umask)
    try:
        out = export_hf(ckpt, tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_model_card_keeps_only_file_names_of_local_paths(tmp_path):
    private = tmp_path / "home" / "alice" / "private-corpus"
    private.mkdir(parents=True)
    (private / "ja.txt").write_text("今日は良い天気です。\n" * 50)
    tok = ramgpt_tokenizer("trained")
    tok_dir = tok.save(private / "tok")
    profile = small_profile(
        "data.source=text",
        f"data.path={private / 'ja.txt'}",
        f"data.tokenizer={tok_dir}",
        f"checkpoint.out_dir={private / 'runs' / 'r1'}",
        "model.vocab_size=320",
    )
    ckpt, _ = make_checkpoint(tmp_path, profile)
    card = (export_hf(ckpt, tmp_path / "hf") / "README.md").read_text()
    assert str(tmp_path) not in card and "private-corpus" not in card and "alice" not in card
    assert "- data: `ja.txt`, tokenizer `tok`" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert (config["data"]["path"], config["data"]["tokenizer"], config["checkpoint"]["out_dir"]) == ("ja.txt", "tok", "r1")
    assert config["model"] == profile.to_public_dict()["model"]


def test_model_card_keeps_hub_ids():
    cfg = {"name": "x", "data": {"source": "hub", "dataset_name": "hotchpotch/fineweb-2-edu-japanese", "tokenizer": "gpt2"}}
    card = model_card({"config": cfg}, kind="run")
    assert "- data: `hotchpotch/fineweb-2-edu-japanese`, tokenizer `gpt2`" in card
    cfg["data"] |= {"dataset_name": "/srv/mirror/fineweb-2-edu-japanese", "tokenizer": "~/toks/ja"}
    card = model_card({"config": cfg}, kind="run")
    assert "/srv" not in card and "~/toks" not in card
    assert "- data: `fineweb-2-edu-japanese`, tokenizer `ja`" in card


def test_export_below_a_file_is_one_line(tmp_path):
    """A file where a directory is expected: fails the same way for root (CI) and users."""
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "hf"
    with pytest.raises(CheckpointError) as e:
        export_hf(ckpt, out)
    msg = one_line_error(e)
    assert msg.startswith(f"cannot write the export to {out}: ") and "not a directory" in msg


@contextlib.contextmanager
def read_only_dir(path: Path):
    """``path`` made unwritable: by permissions for a normal user; as root (who ignores them),
    by the immutable attribute where the file system has one."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield "permission denied"
        finally:
            path.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root and this file system has no immutable attribute (chattr +i)")
    try:
        yield "not permitted"
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def test_export_into_a_read_only_directory_is_one_line(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    out = tmp_path / "hf"
    with read_only_dir(out) as reason:
        with pytest.raises(CheckpointError) as e:
            export_hf(ckpt, out)
        msg = one_line_error(e)
        assert msg.startswith(f"cannot write the export to {out}: ") and reason in msg
        assert list(out.iterdir()) == []


def test_a_full_disk_inside_safetensors_is_one_line(tmp_path, monkeypatch):
    """safetensors reports OS errors as its own exception type, with the errno in the text."""

    class SafetensorError(Exception):
        pass

    def full(self, *a, **k):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "save_pretrained", full)
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    with pytest.raises(CheckpointError) as e:
        export_hf(ckpt, tmp_path / "hf")
    assert "no space left" in one_line_error(e)


# ---------------------------------------------------------------------------------------------
# CLI


def cli(*args: str):
    from typer.testing import CliRunner

    from ramgpt.cli import app

    return CliRunner().invoke(app, ["export", *args], env={"COLUMNS": "300", "NO_COLOR": "1", "RAMGPT_DEBUG": ""})


def assert_cli_one_line(res, code: int, *needles: str) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_cli_export_non_empty_needs_overwrite(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    out = tmp_path / "hf"
    files = user_files(out)
    assert_cli_one_line(cli(str(ckpt), str(out)), 4, str(out), "--overwrite")
    assert (out / "README.md").read_bytes() == files["README.md"]
    res = cli(str(ckpt), str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_bytes() == files["notes.txt"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert "--overwrite" in cli("--help").output


def test_cli_export_os_error_is_one_line(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    (tmp_path / "afile").write_text("x")
    assert_cli_one_line(cli(str(ckpt), str(tmp_path / "afile" / "hf")), 4, "cannot write the export to")
    with read_only_dir(tmp_path / "ro"):
        assert_cli_one_line(cli(str(ckpt), str(tmp_path / "ro")), 4, "cannot write the export to")


@pytest.mark.slow
def test_cli_export_to_a_read_only_file_system(tmp_path):
    """The case from the issue (EROFS), on a read-only tmpfs mounted in a private mount namespace
    (``unshare``; works as root and, where user namespaces are allowed, as a user)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-r", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -r -m)")
    ckpt, _ = make_checkpoint(tmp_path, small_profile())
    mnt = tmp_path / "ro"
    mnt.mkdir()
    script = f'mount -t tmpfs -o ro,size=1m tmpfs "{mnt}" && exec "{sys.executable}" -m ramgpt export "{ckpt}" "{mnt}/hf"'
    res = subprocess.run([unshare, "-r", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 4, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"error: cannot write the export to {mnt}/hf: the file system is read-only; choose a directory on a writable disk"
    assert "Traceback" not in res.stderr
