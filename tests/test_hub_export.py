"""export_hf (ramgpt.hub.export) checked by loading the result with transformers and comparing
logits with ramgpt's on the same input; the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_hub_convert import random_model, small_profile

from ramgpt.checkpoint import save_checkpoint
from ramgpt.errors import CheckpointError
from ramgpt.hub import export_hf, model_card
from ramgpt.model import GPT

transformers = pytest.importorskip("transformers")

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
    tokmod = pytest.importorskip("ramgpt.tokenizer")
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
