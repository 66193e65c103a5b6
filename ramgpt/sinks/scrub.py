"""Keep secrets out of what a sink records: a config copy without keys that name secrets."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_SECRET_PARTS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}


def is_secret_key(name: str) -> bool:
    """True for names like hf_token, api_key, wandbApiKey, db_password; False for config fields
    that merely contain the letters (tokenizer, loss_chunk_tokens)."""
    low = str(name).lower()
    if "api_key" in low or "apikey" in low or "secret" in low or "password" in low:
        return True
    # camelCase -> snake, then compare whole words so "tokens"/"tokenizer" stay.
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name)).lower()
    return any(part in _SECRET_PARTS for part in re.split(r"[^a-z0-9]+", snake) if part)


def scrub_secrets(config: Any) -> Any:
    """A copy of ``config`` without keys that name secrets, at any depth. Profiles hold no
    secrets; this guards against a future field or a user dict that does."""
    if isinstance(config, Mapping):
        return {k: scrub_secrets(v) for k, v in config.items() if not is_secret_key(str(k))}
    if isinstance(config, (list, tuple)):
        return [scrub_secrets(v) for v in config]
    return config
