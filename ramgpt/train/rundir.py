"""The run directory: created, locked and written with one-line errors.

Every OS error on the run directory (read-only file system, permission denied, a file where a
directory should be, a full disk) becomes a :class:`RunDirError` naming the path and what to do.

The lock: training holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for its whole life, with the
holder's pid, host and start time written inside. A second ``ramgpt train`` on the same directory
stops at once with one line naming that process. The kernel drops the lock when its holder dies
(SIGKILL, OOM, power loss on a local disk), so a stale lock is simply taken over. The ranks of one
several-GPU job share it: only rank 0 locks (the other ranks never write shared files).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from ramgpt.errors import RunDirError

LOCK_FILE = ".lock"

_ADVICE = {
    errno.EROFS: "the file system is read-only; choose another --out-dir",
    errno.EACCES: "permission denied; choose another --out-dir or fix its permissions",
    errno.EPERM: "the operation is not permitted (immutable file?); choose another --out-dir",
    errno.ENOSPC: "the disk is full; free space or choose another --out-dir",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another --out-dir",
    errno.ENOTDIR: "a file is in the way where a directory should be; choose another --out-dir",
    errno.EEXIST: "a file is in the way where a directory should be; choose another --out-dir",
}


def os_error_message(what: str, path: Path, e: OSError) -> str:
    """``cannot write the run directory runs/x (config.yaml): the file system is read-only; ...``"""
    advice = _ADVICE.get(e.errno or 0) or f"{os.strerror(e.errno) if e.errno else e}"
    where = Path(e.filename).name if getattr(e, "filename", None) else ""
    return f"cannot {what} {path}" + (f" ({where})" if where and where != path.name else "") + f": {advice}"


def _probe_writable(path: Path) -> None:
    """Create and remove a file: catches a read-only mount before any real work."""
    probe = path / f".write-test-{os.getpid()}"
    with open(probe, "wb") as f:
        f.write(b"ok")
    probe.unlink()


class RunDir:
    """One training run's directory. ``open()`` creates it, checks it is writable and locks it."""

    def __init__(self, path: Path, *, lock: bool = True) -> None:
        self.path = Path(path)
        self._want_lock = lock
        self._lock_fd: int | None = None

    def open(self) -> RunDir:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _probe_writable(self.path)
        except OSError as e:
            raise RunDirError(os_error_message("write the run directory", self.path, e)) from e
        if self._want_lock:
            self._lock()
        return self

    # -- the lock ----------------------------------------------------------------------------
    def _lock(self) -> None:
        import fcntl

        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(os_error_message("lock the run directory", self.path, e)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                       if holder else "another process")
                raise RunDirError(
                    f"{self.path} is in use by another training process ({who}); wait for it to finish, stop it, "
                    "or train into another --out-dir"
                ) from e
            raise RunDirError(os_error_message("lock the run directory", self.path, e)) from e
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- space -------------------------------------------------------------------------------
    def check_free_space(self, per_checkpoint_b: int, keep: int, existing_b: int) -> None:
        """Refuse a run whose disk cannot hold ``keep`` + 1 checkpoints (a new one is written before
        rotation removes the oldest); the checkpoints already here count as space of the run."""
        import shutil

        free = shutil.disk_usage(self.path).free
        need = per_checkpoint_b * (keep + 1) - existing_b
        if free < need:
            raise RunDirError(
                f"not enough free disk for checkpoints: {self.path} has {free / 1e9:.1f} GB free, {keep} + 1 "
                f"checkpoints of {per_checkpoint_b / 1e9:.1f} GB need {need / 1e9:.1f} GB more; free space, lower "
                "checkpoint.keep_last_n, choose another --out-dir, or pass --force"
            )

    # -- files -------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` atomically (temp name, fsync, rename) with one-line errors."""
        path = self.path / name
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise RunDirError(os_error_message("write to the run directory", self.path, e)) from e

    def write_config(self, public_config: dict[str, Any]) -> None:
        self.write_text("config.yaml", yaml.safe_dump(public_config, sort_keys=False, allow_unicode=True))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self.write_text(name, json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
