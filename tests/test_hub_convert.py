"""ramgpt <-> transformers GPT-2 (ramgpt.hub.convert): the weight-name table both ways, checked
against transformers' own GPT2LMHeadModel names and shapes, and the config table both ways."""

from __future__ import annotations

import pytest
import torch
import transformers  # noqa: E402 - a hard dependency

from ramgpt.config import load_profile
from ramgpt.errors import CheckpointError
from ramgpt.hub import (
    HF_CONFIG_MAP,
    HF_NAME_MAP,
    from_hf_state_dict,
    hf_config_to_model_fields,
    model_to_hf_config,
    tied_keys,
    to_hf_state_dict,
)
from ramgpt.model import GPT


def small_profile(*sets: str):
    base = [
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "model.block_size=32",
        "model.vocab_size=96",
        "data.seq_len=32",
    ]
    return load_profile("micro-test", [*base, *sets], use_env=False)


def random_model(profile) -> GPT:
    """A GPT whose every tensor (biases and LayerNorms included) is random, so a wrongly
    mapped or untransposed tensor cannot hide behind GPT-2's zero/one initialisation."""
    torch.manual_seed(0)
    model = GPT(profile.model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# mapping table


@pytest.mark.parametrize(
    "sets", [(), ("model.tie_embeddings=false", "model.bias=false")], ids=["gpt2", "untied-nobias"]
)
def test_round_trip_is_identity(sets):
    profile = small_profile(*sets)
    sd = random_model(profile).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd), bias=profile.model.bias)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    if profile.model.tie_embeddings:  # still one tensor, as GPT.state_dict() has it
        assert back["head.lm_head.weight"].data_ptr() == back["embed.wte.weight"].data_ptr()


def test_mapping_gives_exactly_gpt2lmheadmodel_names_and_shapes():
    profile = small_profile()
    hf_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=96)
    )
    want = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in to_hf_state_dict(random_model(profile).state_dict()).items()}
    assert got == want
    transposed = {r for r, _, t in HF_NAME_MAP if t}
    assert transposed == {f"h.{{i}}.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_saved_state_without_head_key_means_tied():
    sd = random_model(small_profile()).state_dict()
    sd.pop("head.lm_head.weight")  # as stored on disk: the tied weight once
    hf = to_hf_state_dict(sd)
    assert hf["lm_head.weight"] is hf["transformer.wte.weight"]


def test_bias_free_model_gets_zero_biases():
    sd = random_model(small_profile("model.bias=false")).state_dict()
    hf = to_hf_state_dict(sd)
    assert torch.count_nonzero(hf["transformer.h.1.mlp.c_fc.bias"]) == 0
    assert hf["transformer.h.1.mlp.c_fc.bias"].shape == (256,)
    assert hf["transformer.ln_f.bias"].shape == (64,)


def test_from_hf_accepts_bare_gpt2model_keys_buffers_and_pads_vocab():
    sd = random_model(small_profile()).state_dict()
    hf = to_hf_state_dict(sd)
    bare = {k.removeprefix("transformer."): v for k, v in hf.items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # old causal-mask buffer
    back = from_hf_state_dict(bare, vocab_size=128)
    assert back["embed.wte.weight"].shape == (128, 64)
    assert torch.equal(back["embed.wte.weight"][:96], sd["embed.wte.weight"])
    assert torch.count_nonzero(back["embed.wte.weight"][96:]) == 0
    assert back["head.lm_head.weight"] is back["embed.wte.weight"]
    assert torch.equal(back["h.1.attn.c_attn.weight"], sd["h.1.attn.c_attn.weight"])


def test_mapping_errors_are_one_line():
    with pytest.raises(CheckpointError, match="cannot map 'foo.weight'"):
        to_hf_state_dict({"foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="model.bias=true"):
        from_hf_state_dict(to_hf_state_dict(random_model(small_profile()).state_dict()), bias=False)


def test_hf_config_to_model_fields():
    fields = hf_config_to_model_fields(
        {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
    )
    assert fields["block_size"] == 1024 and fields["tie_embeddings"] is True


# ---------------------------------------------------------------------------------------------
# config table


@pytest.mark.parametrize("tie", [True, False])
def test_config_table_round_trips_through_gpt2config(tie):
    mc = small_profile("model.dropout=0.05", f"model.tie_embeddings={str(tie).lower()}").model
    hf = transformers.GPT2Config(**model_to_hf_config(mc, eos_token_id=0)).to_dict()
    assert (hf["n_layer"], hf["n_head"], hf["n_embd"], hf["n_positions"], hf["vocab_size"]) == (2, 4, 64, 32, 96)
    assert hf["resid_pdrop"] == hf["embd_pdrop"] == hf["attn_pdrop"] == 0.05
    assert hf["activation_function"] == "gelu_new" and hf["layer_norm_epsilon"] == 1e-5
    assert hf["tie_word_embeddings"] is tie and hf["bos_token_id"] == hf["eos_token_id"] == 0
    back = hf_config_to_model_fields(hf)
    assert back == {f: getattr(mc, f) for f, _ in HF_CONFIG_MAP} | {"bias": True}


def test_tied_keys_come_from_the_models_aliasing():
    model = GPT(small_profile().model)
    assert tied_keys() == {"head.lm_head.weight": "embed.wte.weight"}
    for alias, owner in tied_keys().items():
        assert model.get_parameter(alias) is model.get_parameter(owner)
