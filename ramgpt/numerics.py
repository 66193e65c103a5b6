"""Reproducible CPU numerics: the same run on the same machine gives the same numbers.

MKL (torch's CPU BLAS) picks its code path by memory alignment unless told otherwise, so a tensor
that happens to sit at another address (a checkpoint loaded into a fresh buffer, a heap laid out
differently because a thread ran earlier) gets other rounding: on this project's 2-core CI machine
``load_model_for_inference`` gave logits that differed from the saved model's in the last bit.
``MKL_CBWR=AUTO,STRICT`` (conditional numerical reproducibility, strict mode) makes MKL's results
independent of alignment at no measured cost (2048^3 sgemm: 133.3 vs 133.9 ms). Dynamic thread
adjustment is switched off so the thread count, and with it the reduction order, never follows the
machine's load. These must be in the environment before MKL initialises: the CLI sets them before
it imports torch, and :func:`ensure_reproducible_env` is also called by ``train()`` for notebook
users (effective when torch has not run a BLAS call yet).
"""

from __future__ import annotations

import os

REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}


def ensure_reproducible_env() -> None:
    """Set the variables above unless the user set them (setdefault: the user's choice wins)."""
    for k, v in REPRODUCIBLE_ENV.items():
        os.environ.setdefault(k, v)
