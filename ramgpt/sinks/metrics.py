"""What the displays read from a metrics dict: which keys only a GPU run has and which only a
streamed run has (the key list itself is in ``docs/interfaces.md``). A run without them shows
that it has none rather than zeros."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ramgpt.fmt import num

VRAM_KEYS = ("vram_allocated_b", "vram_reserved_b", "vram_budget_b")
TRANSFER_KEYS = ("h2d_bytes", "d2h_bytes", "h2d_gbps", "d2h_gbps", "stall_s", "stall_pct")


def is_gpu_run(m: Mapping[str, Any]) -> bool:
    """A CUDA run: its device says so, or it reports VRAM."""
    dev = str(m.get("device") or "")
    return dev.startswith("cuda") or any(k in m for k in (*VRAM_KEYS, "vram_total_b"))


def has_transfer(m: Mapping[str, Any]) -> bool:
    """The metrics carry the streamed engine's transfer numbers."""
    return any(num(m.get(k)) is not None for k in TRANSFER_KEYS)
