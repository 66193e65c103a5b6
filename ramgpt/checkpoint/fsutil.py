"""Filesystem primitives the checkpoint store is built on: fsync, atomic exchange, a writer's
liveness, tolerant tree walks. No checkpoint knowledge here."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Persist directory entries (new files, renames). Some filesystems refuse; that is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def tree_bytes(path: Path) -> int:
    """Bytes of all regular files under ``path`` (not following links); tolerant of files
    vanishing meanwhile, because a writer or another prune may be working next to us."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def newest_mtime(path: Path) -> float:
    newest = 0.0
    try:
        newest = os.lstat(path).st_mtime
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass
    except OSError:
        return time.time()  # cannot tell: treat as fresh, i.e. leave it alone
    return newest


def _process_start_time(stat_fields: list[str]) -> float | None:
    """Wall-clock start of a process from the fields of /proc/<pid>/stat after the name."""
    try:
        ticks = int(stat_fields[19])  # field 22 (starttime), counted from field 3 (state)
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_alive(pid: int, written_at: float) -> bool:
    """Could process ``pid`` be the one that created a temp dir last modified at ``written_at``?

    No if it does not exist or is a zombie (killed, not yet reaped: kill(0) still succeeds),
    and no if it started after that moment: the pid was reused, which is the norm when a
    container restarts training and hands it the same pid as the run that crashed."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc (not Linux): existence is all we can tell
    if fields and fields[0] == "Z":
        return False
    started = _process_start_time(fields)
    return started is None or started <= written_at + 2.0  # btime has 1 s resolution


def remove_tree_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def rmtree(path: Path) -> None:
    """rmtree that tolerates entries vanishing underneath it (another prune deleting the same
    leftover) but reports every other error."""

    def ignore_vanished(_func: Any, _path: str, exc: Any) -> None:
        e = exc if isinstance(exc, BaseException) else exc[1]
        if not isinstance(e, FileNotFoundError):
            raise e

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_vanished)
    else:  # Python 3.10 and 3.11
        shutil.rmtree(path, onerror=ignore_vanished)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False when unsupported,
    so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))

