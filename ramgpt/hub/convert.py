"""ramgpt <-> transformers GPT-2, name for name: one table for the weights (``HF_NAME_MAP``) and
one for the config (``HF_CONFIG_MAP``), each driving both directions, so export and import cannot
drift apart. Pure functions over state dicts and dicts; no files, no network.

The only GPT-2 quirk is that HF's ``Conv1D`` stores Linear weights as (in, out) where torch
stores (out, in); those rows of the table carry ``transpose=True``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ramgpt.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from ramgpt.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Weights: (ramgpt name, transformers GPT2LMHeadModel name, transpose).
# ``{i}`` is the block index. Linear weights of the blocks are transposed (Conv1D is (in, out)).
HF_NAME_MAP: tuple[tuple[str, str, bool], ...] = (
    ("embed.wte.weight", "transformer.wte.weight", False),
    ("embed.wpe.weight", "transformer.wpe.weight", False),
    ("h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", False),
    ("h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("h.{i}.attn.c_proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", False),
    ("h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("h.{i}.mlp.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("head.ln_f.weight", "transformer.ln_f.weight", False),
    ("head.ln_f.bias", "transformer.ln_f.bias", False),
    ("head.lm_head.weight", "lm_head.weight", False),  # tied to wte unless tie_embeddings=false
)

# Old GPT-2 checkpoints (the original "gpt2" weights) also hold causal-mask buffers; not weights.
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# ---------------------------------------------------------------------------------------------
# Config: (ramgpt model field, GPT-2 config.json keys). Export writes every key of a row; import
# reads the first. ramgpt's dropout is one number where GPT-2 has three.
HF_CONFIG_MAP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("n_layer", ("n_layer",)),
    ("n_head", ("n_head",)),
    ("n_embd", ("n_embd",)),
    ("block_size", ("n_positions",)),
    ("vocab_size", ("vocab_size",)),
    ("dropout", ("resid_pdrop", "embd_pdrop", "attn_pdrop")),
    ("tie_embeddings", ("tie_word_embeddings",)),
)
# What every ramgpt GPT is, in GPT-2's words: GELU(approximate="tanh") is HF's gelu_new, and
# the LayerNorms use eps=1e-5 (ramgpt.model).
HF_CONFIG_FIXED: dict[str, Any] = {
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "architectures": ["GPT2LMHeadModel"],
}
# Keys an imported config.json may leave out, with GPT2Config's defaults.
_HF_CONFIG_DEFAULTS: dict[str, Any] = {"resid_pdrop": 0.0, "tie_word_embeddings": True}
_FIELD_TYPES: dict[str, type] = {"dropout": float, "tie_embeddings": bool}  # the rest are int


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_HF = [(_pattern_regex(r), h, t) for r, h, t in HF_NAME_MAP]
_FROM_HF = [(_pattern_regex(h), r, t) for r, h, t in HF_NAME_MAP]


def _rename(key: str, table: list[tuple[re.Pattern[str], str, bool]]) -> tuple[str, bool] | None:
    for rx, target, transpose in table:
        m = rx.match(key)
        if m:
            return target.format(i=m.group("i")) if "{i}" in target else target, transpose
    return None


@functools.cache
def tied_keys() -> dict[str, str]:
    """``{alias: owner}`` of the weights a tied ramgpt GPT shares (the model's ``TIED_WEIGHTS``)."""
    from ramgpt.model import TIED_WEIGHTS

    return dict(TIED_WEIGHTS)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.stride() == b.stride()
    )


def _n_layer_of(keys: Iterable[str], prefix: str) -> int:
    rx = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    idx = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(idx) + 1 if idx else 0


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ramgpt state dict -> a complete ``GPT2LMHeadModel`` state dict (float dtype kept).

    Accepts the state as saved (tied head stored once as ``embed.wte.weight``) or as
    ``GPT.state_dict()`` returns it. A missing ``head.lm_head.weight`` means tied: the result's
    ``lm_head.weight`` is then the same tensor as ``transformer.wte.weight``, as in HF. Profiles
    with ``bias: false`` have no biases; GPT-2 always has them, so zero biases are filled in,
    which is exact (a Linear/LayerNorm with a zero bias computes the same thing).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        hit = _rename(key, _TO_HF)
        if hit is None:
            raise CheckpointError(f"cannot map {key!r} to a GPT-2 weight name (not a ramgpt GPT state dict?)")
        name, transpose = hit
        out[name] = tensor.t().contiguous() if transpose else tensor
    if "transformer.wte.weight" not in out:
        raise CheckpointError("state dict has no embed.wte.weight (not a ramgpt GPT state dict?)")
    wte = out["transformer.wte.weight"]
    out.setdefault("lm_head.weight", wte)
    n_embd = wte.shape[1]
    zeros = lambda n: torch.zeros(n, dtype=wte.dtype, device=wte.device)  # noqa: E731
    for i in range(_n_layer_of(out, "transformer.h.")):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out.setdefault(f"{p}{ln}.bias", zeros(n_embd))
        # Conv1D weight is (in, out): the bias has `out` entries.
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out.setdefault(f"{p}{lin}.bias", zeros(out[f"{p}{lin}.weight"].shape[1]))
    out.setdefault("transformer.ln_f.bias", zeros(n_embd))
    return out


def from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], *, bias: bool = True, vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or bare ``GPT2Model``) weights -> a ramgpt ``GPT.state_dict()``.

    This is how a run starts from OpenAI's GPT-2 instead of random weights. Causal-mask buffers
    of old checkpoints are skipped; a missing ``lm_head.weight`` means tied (the result's head
    is the same tensor as ``embed.wte.weight``). ``bias=False`` drops the biases for a bias-free
    profile, refusing non-zero ones (that would silently change the model). ``vocab_size``
    pads the embedding rows with zeros (GPT-2's 50257 -> ramgpt's 64-aligned 50304); padded ids
    are never produced by the tokenizer.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key.endswith(_HF_BUFFER_SUFFIXES):
            continue
        full = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        hit = _rename(full, _FROM_HF)
        if hit is None:
            raise CheckpointError(f"cannot map {key!r} to a ramgpt weight name (not a GPT-2 state dict?)")
        name, transpose = hit
        if name.endswith(".bias") and not bias:
            if torch.count_nonzero(tensor).item():
                raise CheckpointError(f"{key} is not zero: this GPT-2 needs a profile with model.bias=true")
            continue
        out[name] = tensor.t().contiguous() if transpose else tensor
    if "embed.wte.weight" not in out:
        raise CheckpointError("state dict has no wte.weight (not a GPT-2 state dict?)")
    # tied: no separate alias, or an alias that is a view of the owner's memory (state_dict()
    # detaches each key into its own tensor object, so identity is not the test)
    ties = {a: o for a, o in tied_keys().items() if o in out}
    tied = {a: o for a, o in ties.items() if a not in out or _same_memory(out[a], out[o])}
    for alias in tied:
        out.pop(alias, None)
    if vocab_size is not None:
        for name in ("embed.wte.weight", "head.lm_head.weight"):  # the two (vocab, n_embd) weights
            if name not in out:
                continue
            w = out[name]
            if vocab_size < w.shape[0]:
                raise CheckpointError(f"vocab_size {vocab_size} is smaller than the checkpoint's {w.shape[0]} rows")
            if vocab_size > w.shape[0]:
                out[name] = torch.cat([w, w.new_zeros(vocab_size - w.shape[0], w.shape[1])])
    for alias, owner in tied.items():
        out[alias] = out[owner]
    return out


def hf_config_to_model_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """A GPT-2 ``config.json`` -> the ``model`` section of a ramgpt profile (for imports)."""
    out: dict[str, Any] = {}
    for field, keys in HF_CONFIG_MAP:
        key = keys[0]
        value = hf_config.get(key, _HF_CONFIG_DEFAULTS[key]) if key in _HF_CONFIG_DEFAULTS else hf_config[key]
        out[field] = _FIELD_TYPES.get(field, int)(value)
    out["bias"] = True  # GPT-2 always has biases
    return out


def model_to_hf_config(mc: ModelConfig, *, eos_token_id: int | None = None) -> dict[str, Any]:
    """A ramgpt ``model`` section -> ``GPT2Config`` keyword arguments (for exports). ``bias`` has
    no GPT-2 key: a bias-free model is exported with zero biases (:func:`to_hf_state_dict`)."""
    out: dict[str, Any] = {key: getattr(mc, field) for field, keys in HF_CONFIG_MAP for key in keys}
    out.update(HF_CONFIG_FIXED)
    out["bos_token_id"] = out["eos_token_id"] = eos_token_id
    return out


__all__ = [
    "HF_CONFIG_FIXED",
    "HF_CONFIG_MAP",
    "HF_NAME_MAP",
    "from_hf_state_dict",
    "hf_config_to_model_fields",
    "model_to_hf_config",
    "tied_keys",
    "to_hf_state_dict",
]
