"""Build a model for inference from a checkpoint (generate, export)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ramgpt.checkpoint.store import load_checkpoint
from ramgpt.errors import CheckpointError, ConfigError
from ramgpt.fmt import first_line

if TYPE_CHECKING:  # heavy imports only for type checkers
    from ramgpt.config import Profile
    from ramgpt.model import GPT

def load_model_for_inference(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[GPT, Profile, Path | None]:
    """Model in eval mode on ``device``, the profile it was trained with, and the checkpoint's
    tokenizer directory (None if it has none). The model is built on the meta device and the
    loaded tensors are assigned, so a 1B model costs one copy of its weights, not two."""
    from ramgpt.config import profile_from_dict
    from ramgpt.model import GPT, tied_aliases

    loaded = load_checkpoint(path, map_location="cpu", with_optimizer=False)
    cfg_dict = loaded.meta.get("config")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"checkpoint {loaded.path} has no config in meta.json")
    try:
        profile = profile_from_dict(cfg_dict)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {loaded.path} has an unusable config: {first_line(e)}") from e
    with torch.device("meta"):
        model = GPT(profile.model, profile.runtime.loss_chunk_tokens)
    state = dict(loaded.model_state)
    for alias, target in tied_aliases(profile.model).items():
        if alias not in state and target in state:
            state[alias] = state[target]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {loaded.path} does not match its config: {first_line(e)}") from e
    model.tie_weights()  # assign=True wrapped them separately
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CheckpointError(f"checkpoint {loaded.path} does not hold every model tensor")
    model.eval()
    model.to(device)
    return model, profile, loaded.tokenizer_dir

