"""Typed errors. Library code raises these; only ``cli.py`` turns them into a one-line
message and an exit code (set ``RAMGPT_DEBUG=1`` to see the traceback instead).

Exit codes (also in README): 1 other user-facing problem, 2 bad profile/option, 3 data or
tokenizer, 4 checkpoint, 5 out of memory, 6 loss NaN/inf, 7 Hugging Face Hub, 8 run directory
unusable (cannot be written, or locked by another training process), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations


class RamgptError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 1


class ConfigError(RamgptError):
    """A profile, override or option is wrong (unknown key, bad type, impossible value)."""

    exit_code = 2


class DataError(RamgptError):
    """A dataset path is missing, empty, unreadable, or a hub dataset cannot be loaded."""

    exit_code = 3


class TokenizerError(RamgptError):
    """A tokenizer cannot be found or loaded (for example a hub name while offline)."""

    exit_code = 3


class CheckpointError(RamgptError):
    """A checkpoint is missing, partial, corrupt, or could not be written."""

    exit_code = 4


class OutOfMemoryError(RamgptError):
    """CUDA (or host) memory ran out; the message says what to lower."""

    exit_code = 5


def is_out_of_memory(e: BaseException | None) -> bool:
    """True when ``e`` or anything in its cause chain is an out-of-memory error: ramtorch's
    loader thread, for one, re-raises a CUDA OOM as ``RuntimeError("offload worker thread
    failed")`` from it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


class NonFiniteLossError(RamgptError):
    """The loss stayed NaN/inf for several steps in a row; training stopped."""

    exit_code = 6


class HubError(RamgptError):
    """A Hugging Face Hub operation (push, repo creation) failed or lacks a token/repo id."""

    exit_code = 7


class RunDirError(RamgptError):
    """The run directory cannot be created or written, or another process is training in it."""

    exit_code = 8


class Interrupted(RamgptError):
    """The user pressed Ctrl-C; state was saved where possible."""

    exit_code = 130
