"""Whether a C compiler is at hand for ramgpt's CPU kernel (:mod:`ramgpt.engine.native`), without
importing torch (``estimate-memory`` and the profile checks ask it)."""

from __future__ import annotations

import os
import platform
import shutil


def compiler(name: str | None = None) -> str:
    """The compiler to build with: ``name``, else ``$CC``, else ``cc``."""
    return name or os.environ.get("CC") or "cc"


def disabled_why(name: str | None = None) -> str | None:
    """Why the kernel is not to be built here, before trying: None where it may be."""
    if os.environ.get("RAMGPT_NATIVE", "1") == "0":
        return "turned off (RAMGPT_NATIVE=0)"
    if platform.system() == "Windows":
        return "not built on Windows"
    if shutil.which(compiler(name)) is None:
        return f"no C compiler ({compiler(name)}) on PATH"
    return None


def compiler_found(name: str | None = None) -> bool:
    """A build may be tried here: what ``runtime.split_masters: auto`` is projected to mean."""
    return disabled_why(name) is None
