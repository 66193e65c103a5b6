"""Every global RNG training touches, as JSON-safe data for a checkpoint's meta.json."""

from __future__ import annotations

import base64
import random
from typing import Any

import torch

from ramgpt.errors import CheckpointError
from ramgpt.fmt import first_line


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG training touches, as JSON-safe data for ``meta["rng"]``, so a resumed
    run draws the same dropout masks and shuffles as the uninterrupted one would have."""
    py = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`. Missing parts are left as they are; CUDA states are
    restored for as many devices as both the checkpoint and this machine have."""

    def _bytes_tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8).clone()

    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "torch" in state:
            torch.set_rng_state(_bytes_tensor(state["torch"]))
        if "numpy" in state:
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(_bytes_tensor(s), device=i)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot restore RNG state from checkpoint: {first_line(e)}") from e

