"""Secret scrubbing: keys that name secrets go, at any depth; token counts and the tokenizer stay."""

from __future__ import annotations

from ramgpt.sinks.scrub import is_secret_key, scrub_secrets


def test_scrub_secrets_keeps_token_counts() -> None:
    cfg = {
        "optim": {"lr": 1.0},
        "hf_token": "x",
        "runtime": {"loss_chunk_tokens": 8, "wandbApiKey": "k"},
        "data": {"tokenizer": "gpt2", "db_password": "p", "client_secret": "s"},
        "hooks": [{"api_key": "k", "name": "a"}],
    }
    assert scrub_secrets(cfg) == {
        "optim": {"lr": 1.0},
        "runtime": {"loss_chunk_tokens": 8},
        "data": {"tokenizer": "gpt2"},
        "hooks": [{"name": "a"}],
    }
    assert cfg["hf_token"] == "x"  # a copy: the caller's dict is untouched


def test_secret_key_names() -> None:
    for name in ("hf_token", "HF_TOKEN", "apiKey", "wandb_api_key", "credentials", "passwd", "accessToken"):
        assert is_secret_key(name), name
    for name in ("tokenizer", "tokens_per_step", "loss_chunk_tokens", "max_tokens", "seq_len"):
        assert not is_secret_key(name), name
