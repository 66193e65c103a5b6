"""Hugging Face interop, one module per concern:

- :mod:`.convert` -- the name mapping table (``HF_NAME_MAP``) and the config table, each driving
  both directions (export and import), so they cannot drift apart.
- :mod:`.export` -- ``export_hf`` (a transformers ``GPT2LMHeadModel`` directory) and the README.md
  model card.
- :mod:`.upload` -- ``push``: token resolution, what to send (``plan_push``), sending it
  (``execute_push``), background pushes during training and the remote delete patterns of
  rotated checkpoints. The token is never data: it goes to ``HfApi`` and nowhere else.

``from ramgpt.hub import ...`` is the public API; importing this package loads neither
transformers nor huggingface_hub (each function imports what it needs).
"""

from ramgpt.hub.convert import (
    HF_CONFIG_FIXED,
    HF_CONFIG_MAP,
    HF_NAME_MAP,
    from_hf_state_dict,
    hf_config_to_model_fields,
    model_to_hf_config,
    tied_keys,
    to_hf_state_dict,
)
from ramgpt.hub.export import export_hf, model_card
from ramgpt.hub.upload import (
    NO_TOKEN_MESSAGE,
    BackgroundPush,
    PushPlan,
    execute_push,
    has_token,
    is_complete_checkpoint,
    plan_push,
    push,
    push_checkpoint_background,
    remote_delete_patterns,
    resolve_token,
)

__all__ = [
    "HF_CONFIG_FIXED",
    "HF_CONFIG_MAP",
    "HF_NAME_MAP",
    "NO_TOKEN_MESSAGE",
    "BackgroundPush",
    "PushPlan",
    "execute_push",
    "export_hf",
    "from_hf_state_dict",
    "has_token",
    "hf_config_to_model_fields",
    "is_complete_checkpoint",
    "model_card",
    "model_to_hf_config",
    "plan_push",
    "push",
    "push_checkpoint_background",
    "remote_delete_patterns",
    "resolve_token",
    "tied_keys",
    "to_hf_state_dict",
]
