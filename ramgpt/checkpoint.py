"""Checkpoints: save, find, load and prune them without ever losing a night of training.

A checkpoint is a directory ``RUN_DIR/step_0000010/``::

    model.safetensors       model tensors; a tied weight is stored once (meta["tied"] names the alias)
    optimizer.safetensors   every tensor of the optimizer's state_dict(), keys like state.3.exp_avg
    optimizer.json          the rest of that state_dict (param_groups, numbers, 0-d step counts)
    meta.json               step, the caller's meta, format_version, created, tied,
                            files: {relative name: {bytes, sha256}}
    tokenizer/              tokenizer.save(dir), when a tokenizer is passed

Why it is crash-safe: everything is written into ``RUN_DIR/.tmp-step_0000010-<pid>-<hex>/``,
each file and the directory are fsynced, and only then is the directory renamed to its final
name (one atomic rename), followed by an fsync of RUN_DIR. A ``step_\\d{7}`` directory is
*complete* iff its meta.json parses and every file it lists exists with the listed size; a
kill at any moment therefore leaves either the previous complete checkpoints plus a ``.tmp-``
leftover, or one more complete checkpoint. Loading also checks sha256, so a flipped bit is a
one-line :class:`CheckpointError`, not a silently wrong model.

Nothing here unpickles: tensors go through safetensors (written by a small streaming writer so
that a full disk surfaces as a real ``OSError`` and a 1B model is never copied in memory; read
back with the safetensors library), everything else is JSON. Nothing here prints; skipped
partial checkpoints are reported with :class:`PartialCheckpointWarning`.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import math
import os
import random
import re
import secrets
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ramgpt.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # heavy imports only for type checkers
    from ramgpt.config import Profile
    from ramgpt.model import GPT

FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
OPTIM_TENSORS_FILE = "optimizer.safetensors"
OPTIM_JSON_FILE = "optimizer.json"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
# What a directory of ours can contain; a step_* directory holding anything else is not
# treated as ours by prune (it may be a user's own files).
_OUR_NAMES = frozenset({MODEL_FILE, OPTIM_TENSORS_FILE, OPTIM_JSON_FILE, META_FILE, TOKENIZER_DIR})

STEP_DIR_RE = re.compile(r"^step_(\d{7})$")
# .tmp-step_0000010-<writer pid>-<random hex>[-old|-del]: an unfinished save, the previous
# version of a re-saved step, or a checkpoint being deleted by prune.
TMP_DIR_RE = re.compile(r"^\.tmp-step_(\d{7})-(\d+)-([0-9a-f]+)(?:-(old|del))?$")
MAX_STEP = 9_999_999
# A temp dir whose writer is still alive is left alone unless nothing in it changed for this
# long (the pid may have been reused, e.g. after a reboot). Writing a multi-GB file updates
# its mtime continuously, so 10 minutes is far beyond any live save's quiet time.
STALE_TMP_AFTER_S = 600.0

_CHUNK = 64 * 1024 * 1024  # bytes hashed and written per call: bounded, large enough to stream
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class PartialCheckpointWarning(UserWarning):
    """A partial or corrupt checkpoint was skipped while looking for the newest complete one."""


class _BadCheckpoint(CheckpointError):
    """A CheckpointError that also carries the bare reason, for "skipping ... (reason)"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CheckpointInfo:
    """One entry of a run directory: a ``step_*`` directory or a ``.tmp-step_*`` leftover."""

    path: Path
    step: int
    complete: bool
    reason: str | None  # why it is not complete (None when complete)
    bytes: int
    eval_loss: float | None = None
    temporary: bool = False  # a .tmp-step_* directory (never complete)
    in_progress: bool = False  # a temp dir whose writer is alive and still writing: never touch


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns; ``model_state`` has tied aliases re-tied."""

    path: Path
    step: int
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.path / TOKENIZER_DIR
        return d if d.is_dir() else None


@dataclass
class PruneReport:
    """What :func:`prune_checkpoints` removed (or would remove, with ``dry_run``)."""

    removed: list[Path]  # complete checkpoints removed by the keep rules
    kept: list[Path]  # complete checkpoints kept
    freed_bytes: int
    dry_run: bool
    partial_removed: list[Path]  # partial step_* dirs and stale .tmp-step_* leftovers
    sizes: dict[Path, int] = field(default_factory=dict)  # bytes of every removed path
    left_alone: list[Path] = field(default_factory=list)  # partial-looking dirs that may not be ours, or in use


# ---------------------------------------------------------------------------------------------
# Small filesystem helpers


def _one_line(text: object) -> str:
    s = str(text).strip().splitlines()
    return s[0].strip() if s else ""


def _fsync_dir(path: Path) -> None:
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _tree_bytes(path: Path) -> int:
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


def _newest_mtime(path: Path) -> float:
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


def _writer_alive(pid: int, written_at: float) -> bool:
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


def _remove_tree_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _rmtree(path: Path) -> None:
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


def _exchange(a: Path, b: Path) -> bool:
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


# ---------------------------------------------------------------------------------------------
# safetensors writing (streamed, hashed on the way)

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


@dataclass(frozen=True)
class _FileRecord:
    bytes: int
    sha256: str


def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> _FileRecord:
    """Write ``tensors`` in the safetensors layout (8-byte little-endian header length, JSON
    header, raw little-endian data) one tensor at a time, hashing as we go, then fsync.

    Why not ``safetensors.torch.save_file``: its errors lose the errno (a full disk becomes a
    generic SafetensorError), and older versions copy every tensor to bytes first -- gigabytes
    for a 1B model plus its AdamW moments. The files are read back with the safetensors library,
    which validates the layout."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian targets
        raise CheckpointError("saving checkpoints needs a little-endian machine")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"cannot save tensor {name}: dtype {t.dtype} is not supported by safetensors")
        n = _tensor_nbytes(t)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes, as the reference writer does
    h = hashlib.sha256()
    size = 0
    with open(path, "xb") as f:
        for piece in (struct.pack("<Q", len(head)), head):
            h.update(piece)
            f.write(piece)
            size += len(piece)
        for _name, t in tensors:
            # one tensor at a time on the CPU: a CUDA state never needs a full host copy
            flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            view = memoryview(flat.numpy())
            for start in range(0, len(view), _CHUNK):
                chunk = view[start : start + _CHUNK]
                h.update(chunk)
                f.write(chunk)
            size += len(view)
        f.flush()
        os.fsync(f.fileno())
    return _FileRecord(size, h.hexdigest())


def _write_json(path: Path, data: Any) -> _FileRecord:
    raw = (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "xb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return _FileRecord(len(raw), hashlib.sha256(raw).hexdigest())


def _read_safetensors(path: Path, device: str | torch.device, what: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # SafetensorError, OSError, RuntimeError (bad device): all one line
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {what}: {_one_line(e)}") from e


# ---------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, JSON)
#
# A torch optimizer state_dict is {"state": {int: {name: tensor | number}}, "param_groups":
# [{"params": [int], "lr": float | tensor, "betas": tuple, ...}]}. Tensors go to safetensors
# under their path ("state.3.exp_avg"); 0-d tensors (AdamW's "step") stay readable in JSON
# with their dtype so they come back as 0-d tensors of the same dtype; tuples and non-string
# dict keys are tagged so load_state_dict gets back exactly what state_dict() gave.

_SCALAR_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode_state(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        dtype_name = str(obj.dtype).removeprefix("torch.")
        if obj.dim() == 0 and dtype_name in _SCALAR_DTYPES:
            return {"__scalar__": obj.item(), "dtype": dtype_name}
        key = path
        while key in tensors:  # keys are paths, so a clash needs odd dict keys; keep both anyway
            key += "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode_state(v, _join(path, k), tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise CheckpointError(f"cannot save optimizer state: unsupported key type {type(k).__name__} at {path}")
            items.append([k, _encode_state(v, _join(path, k), tensors)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode_state(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode_state(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot save optimizer state: unsupported value type {type(obj).__name__} at {path}")


def _decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__scalar__" in obj:
        return torch.tensor(obj["__scalar__"], dtype=_SCALAR_DTYPES[obj["dtype"]])
    if "__tuple__" in obj:
        return tuple(_decode_state(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode_state(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode_state(v, tensors) for k, v in obj.items()}


def _flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode_state(state, "", tensors)


# ---------------------------------------------------------------------------------------------
# RNG state <-> JSON-safe data


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
        raise CheckpointError(f"cannot restore RNG state from checkpoint: {_one_line(e)}") from e


# ---------------------------------------------------------------------------------------------
# Saving


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _tied_aliases(model_state: dict[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Keep the first key of every group of identical views (same storage, offset, shape,
    stride, dtype); later keys become aliases. Partly overlapping views are saved as copies."""
    seen: dict[tuple[Any, ...], str] = {}
    unique: list[tuple[str, torch.Tensor]] = []
    tied: dict[str, str] = {}
    for name, t in model_state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot save model state: entry {name!r} is not a named tensor")
        ident = None
        if t.numel() > 0:
            ident = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
        if ident is not None and ident in seen:
            tied[name] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = name
        unique.append((name, t))
    return unique, tied


def _save_error(name: str, run_dir: Path, need_bytes: int, e: BaseException) -> CheckpointError:
    err = getattr(e, "errno", None)
    text = str(e)
    if err is None and "os error 28" in text:  # a Rust library (tokenizers) wrapping ENOSPC
        err = errno.ENOSPC
    if err in _SPACE_ERRNOS:
        why = os.strerror(err).lower()
        need_mb = max(1, math.ceil(need_bytes / 1e6))
        return CheckpointError(
            f"could not save checkpoint {name}: {why} (need ~{need_mb} MB in {run_dir}); older checkpoints are intact"
        )
    why = os.strerror(err).lower() if isinstance(err, int) else _one_line(text) or type(e).__name__
    where = getattr(e, "filename", None)
    where_s = f" ({Path(where).name})" if where else ""
    return CheckpointError(f"could not save checkpoint {name}: {why}{where_s}; older checkpoints are intact")


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    meta: dict[str, Any],
    tokenizer: Any | None = None,
) -> Path:
    """Write ``RUN_DIR/step_XXXXXXX/`` atomically and return its path.

    ``meta`` is stored as given (it must be JSON-serialisable); ``step``, ``format_version``,
    ``created``, ``tied`` and ``files`` are added. Re-saving an existing step replaces it only
    once the new one is complete. Any failure (full disk included) removes the temporary
    directory and raises a one-line :class:`CheckpointError`; existing checkpoints and the
    caller's tensors are never modified.
    """
    run_dir = Path(run_dir)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"checkpoint step must be an integer in 0..{MAX_STEP}, got {step!r}")
    name = step_dir_name(step)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"could not save checkpoint {name}: meta is not JSON-serialisable ({_one_line(e)})"
        ) from e

    unique, tied = _tied_aliases(model_state)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json: Any = None
    if optimizer_state is not None:
        opt_tensors, opt_json = _flatten_optimizer_state(optimizer_state)
    need = sum(_tensor_nbytes(t) for _, t in unique) + sum(_tensor_nbytes(t) for t in opt_tensors.values())
    need += 1_000_000  # headers, JSON, tokenizer: small next to the tensors

    tmp: Path | None = None
    try:
        created_run_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if created_run_dir:
            _fsync_dir(run_dir.parent)
        tmp = run_dir / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}

        rec = _write_safetensors(tmp / MODEL_FILE, unique)
        files[MODEL_FILE] = {"bytes": rec.bytes, "sha256": rec.sha256}
        if optimizer_state is not None:
            rec = _write_safetensors(tmp / OPTIM_TENSORS_FILE, list(opt_tensors.items()))
            files[OPTIM_TENSORS_FILE] = {"bytes": rec.bytes, "sha256": rec.sha256}
            rec = _write_json(tmp / OPTIM_JSON_FILE, {"format_version": FORMAT_VERSION, "state_dict": opt_json})
            files[OPTIM_JSON_FILE] = {"bytes": rec.bytes, "sha256": rec.sha256}
        if tokenizer is not None:
            tok_dir = tmp / TOKENIZER_DIR
            tok_dir.mkdir()
            tokenizer.save(tok_dir)
            for p in sorted(tok_dir.rglob("*")):
                if p.is_file():
                    _fsync_file(p)
                    files[p.relative_to(tmp).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
                elif p.is_dir():
                    _fsync_dir(p)
            _fsync_dir(tok_dir)

        full_meta = dict(meta)
        full_meta.update(
            step=step,
            format_version=FORMAT_VERSION,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tied=tied,
            files=files,
        )
        _write_json(tmp / META_FILE, full_meta)  # last: its presence marks the files as done
        _fsync_dir(tmp)

        final = run_dir / name
        _commit(tmp, final)
        tmp = None
        _fsync_dir(run_dir)
        return final
    except CheckpointError:
        if tmp is not None:
            _remove_tree_quietly(tmp)
        raise
    except Exception as e:
        if tmp is not None:
            _remove_tree_quietly(tmp)
        raise _save_error(name, run_dir, need, e) from e
    except BaseException:  # Ctrl-C mid-save: leave no half directory behind, then stop
        if tmp is not None:
            _remove_tree_quietly(tmp)
        raise


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir to its final name. A re-save of the same step swaps the
    two atomically where the kernel can (the old copy ends up under the temp name and is then
    removed); elsewhere the old one is renamed away first, so at every instant a complete copy
    exists under either the final or a ``.tmp-`` name."""
    if not final.exists():
        os.rename(tmp, final)  # fails (ENOTEMPTY/EEXIST) rather than merging if one appeared
        return
    if _exchange(tmp, final):
        _fsync_dir(final.parent)
        _remove_tree_quietly(tmp)
        return
    old = tmp.with_name(tmp.name + "-old")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    _remove_tree_quietly(old)


# ---------------------------------------------------------------------------------------------
# Inspecting


def _read_meta(ckpt: Path) -> tuple[dict[str, Any] | None, str | None]:
    p = ckpt / META_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None, "no meta.json (the save did not finish)"
    except OSError as e:
        return None, f"cannot read meta.json: {os.strerror(e.errno) if e.errno else e}"
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "meta.json is not valid JSON (truncated or corrupt)"
    if not isinstance(meta, dict):
        return None, "meta.json is not a JSON object"
    return meta, None


def _check(ckpt: Path, expected_step: int | None) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None) when complete by the cheap test (meta parses, listed sizes match); else
    (meta or None, one-line reason)."""
    meta, reason = _read_meta(ckpt)
    if meta is None:
        return None, reason
    files = meta.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        return meta, "meta.json does not list model.safetensors"
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return meta, "meta.json has no integer step"
    if expected_step is not None and step != expected_step:
        return meta, f"meta.json says step {step} but the directory is {step_dir_name(expected_step)}"
    for name, rec in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int):
            return meta, f"meta.json has a bad entry for {name!r}"
        try:
            size = (ckpt / rel).stat().st_size
        except FileNotFoundError:
            return meta, f"{name} is missing"
        except OSError as e:
            return meta, f"cannot read {name}: {os.strerror(e.errno) if e.errno else e}"
        if size != rec["bytes"]:
            if size < rec["bytes"]:
                return meta, f"{name} is truncated ({size} of {rec['bytes']} bytes)"
            return meta, f"{name} has the wrong size ({size} bytes, expected {rec['bytes']})"
    return meta, None


def _verify_hashes(ckpt: Path, meta: dict[str, Any], names: list[str] | None = None) -> str | None:
    """One-line reason for the first file whose sha256 differs from meta.json, else None."""
    for name, rec in meta["files"].items():
        if names is not None and name not in names:
            continue
        expected = rec.get("sha256")
        if not isinstance(expected, str):
            return f"meta.json has no sha256 for {name}"
        try:
            got = _sha256_file(ckpt / name)
        except OSError as e:
            return f"cannot read {name}: {os.strerror(e.errno) if e.errno else e}"
        if got != expected:
            return f"{name} is corrupt (sha256 {got[:12]}… does not match {expected[:12]}… in meta.json)"
    return None


def _eval_loss(meta: dict[str, Any] | None) -> float | None:
    v = (meta or {}).get("eval_loss")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _iter_entries(run_dir: Path) -> Iterator[tuple[Path, int, re.Match[str] | None]]:
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return
    except NotADirectoryError as e:
        raise CheckpointError(f"{run_dir} is not a directory") from e
    for n in names:
        m = STEP_DIR_RE.match(n)
        if m:
            p = run_dir / n
            if p.is_dir():
                yield p, int(m.group(1)), None
            continue
        t = TMP_DIR_RE.match(n)
        if t:
            p = run_dir / n
            if p.is_dir() and not p.is_symlink():
                yield p, int(t.group(1)), t


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every ``step_*`` directory and ``.tmp-step_*`` leftover in ``run_dir``, oldest step
    first, with whether it is complete and why not. Cheap: sizes only, no hashing. A run dir
    that does not exist yet has no checkpoints."""
    run_dir = Path(run_dir)
    infos: list[CheckpointInfo] = []
    now = time.time()
    for path, step, tmp_match in _iter_entries(run_dir):
        size = _tree_bytes(path)
        if tmp_match is not None:
            pid = int(tmp_match.group(2))
            try:
                created_by = os.lstat(path).st_mtime  # set when the writer added its files
            except OSError:
                created_by = now
            alive = _writer_alive(pid, created_by)
            quiet_s = now - _newest_mtime(path)
            in_progress = alive and quiet_s < STALE_TMP_AFTER_S
            kind = {"old": "previous copy of a re-saved step", "del": "checkpoint being deleted"}.get(
                tmp_match.group(4) or "", "unfinished save"
            )
            if in_progress:
                reason = f"{kind}, being written by pid {pid}"
            elif alive:
                reason = f"{kind}, untouched for {quiet_s / 60:.0f} min"
            else:
                reason = f"{kind}, writer pid {pid} is gone"
            infos.append(CheckpointInfo(path, step, False, reason, size, None, temporary=True, in_progress=in_progress))
            continue
        meta, reason = _check(path, step)
        infos.append(CheckpointInfo(path, step, reason is None, reason, size, _eval_loss(meta)))
    infos.sort(key=lambda i: (i.step, i.temporary, i.path.name))
    return infos


def _warn_skipped(info_path: Path, reason: str | None) -> None:
    warnings.warn(f"skipping partial checkpoint {info_path.name} ({reason})", PartialCheckpointWarning, stacklevel=3)


def _skip_silently(info: CheckpointInfo) -> bool:
    """Saves in progress, and leftovers that never were a newer checkpoint (the old copy of a
    re-saved step, a checkpoint prune was deleting), are not worth a warning."""
    return info.in_progress or info.path.name.endswith(("-old", "-del"))


def _complete_newest_first(run_dir: str | os.PathLike[str]) -> Iterator[CheckpointInfo]:
    """The complete checkpoints of ``run_dir``, newest first: the one rule for which checkpoint a
    resume or a load picks. Partial or corrupt ones are skipped with a warning, saves in progress
    silently."""
    for info in reversed(list_checkpoints(run_dir)):
        if _skip_silently(info):
            continue
        if not info.complete:
            _warn_skipped(info.path, info.reason)
            continue
        yield info


def latest_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = False) -> Path | None:
    """Newest complete checkpoint of ``run_dir`` (None if there is none). Newer partial or
    corrupt ones are skipped with a :class:`PartialCheckpointWarning`; saves still in progress
    are skipped silently. ``verify=True`` also checks sha256 (reads every file)."""
    for info in _complete_newest_first(run_dir):
        if verify:
            meta, _ = _read_meta(info.path)
            bad = _verify_hashes(info.path, meta) if meta is not None else "meta.json vanished"
            if bad:
                _warn_skipped(info.path, bad)
                continue
        return info.path
    return None


def _is_checkpoint_dir(p: Path) -> bool:
    return bool(STEP_DIR_RE.match(p.name)) or (p / META_FILE).is_file() or (p / MODEL_FILE).is_file()


def resolve_checkpoint(path_or_run_dir: str | os.PathLike[str], *, verify: bool = False) -> Path:
    """A run directory -> its newest complete checkpoint; a checkpoint directory (or a file in
    one) -> itself, validated. Raises a one-line :class:`CheckpointError` otherwise."""
    p = Path(path_or_run_dir)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {p}")
    if p.is_file():
        p = p.parent
    if _is_checkpoint_dir(p):
        m = STEP_DIR_RE.match(p.name)
        meta, reason = _check(p, int(m.group(1)) if m else None)
        if reason is None and verify:
            reason = _verify_hashes(p, meta)  # type: ignore[arg-type]
        if reason is not None:
            raise CheckpointError(f"checkpoint {p} is incomplete or corrupt: {reason}")
        return p
    found = latest_checkpoint(p, verify=verify)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {p}")
    return found


# ---------------------------------------------------------------------------------------------
# Loading


def _load_verified(
    ckpt: Path, *, map_location: str | torch.device, with_optimizer: bool, verify: bool
) -> LoadedCheckpoint:
    m = STEP_DIR_RE.match(ckpt.name)
    meta, reason = _check(ckpt, int(m.group(1)) if m else None)
    if reason is not None:
        raise _BadCheckpoint(f"checkpoint {ckpt} is incomplete or corrupt: {reason}", reason)
    assert meta is not None
    has_opt = OPTIM_TENSORS_FILE in meta["files"] and OPTIM_JSON_FILE in meta["files"]
    if verify:
        names = [n for n in meta["files"] if with_optimizer or n not in (OPTIM_TENSORS_FILE, OPTIM_JSON_FILE)]
        bad = _verify_hashes(ckpt, meta, names)
        if bad:
            raise _BadCheckpoint(f"checkpoint {ckpt} is corrupt: {bad}", bad)

    model_state = _read_safetensors(ckpt / MODEL_FILE, map_location, MODEL_FILE)
    tied = meta.get("tied") or {}
    for alias, target in tied.items():
        if target not in model_state:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: tied weight {alias} points at missing {target}")
        model_state[alias] = model_state[target]  # the same tensor object: re-tied, not copied

    optimizer_state = None
    if with_optimizer and has_opt:
        tensors = _read_safetensors(ckpt / OPTIM_TENSORS_FILE, map_location, OPTIM_TENSORS_FILE)
        try:
            doc = json.loads((ckpt / OPTIM_JSON_FILE).read_text(encoding="utf-8"))
            optimizer_state = _decode_state(doc["state_dict"], tensors)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: cannot read {OPTIM_JSON_FILE}: {_one_line(e)}") from e
    return LoadedCheckpoint(ckpt, int(meta["step"]), meta, model_state, optimizer_state)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    with_optimizer: bool = True,
    verify: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint (or a run directory's newest complete one). Never unpickles.

    ``verify`` checks the sha256 of every file that is read. Given a run directory, a newest
    checkpoint that fails verification is skipped with a warning and the next older complete one
    is used, so one bad file does not cost the whole run; given a checkpoint directory, any
    problem is a one-line :class:`CheckpointError` naming the file."""
    p = Path(path)
    if p.is_dir() and not _is_checkpoint_dir(p):
        for info in _complete_newest_first(p):
            try:
                return _load_verified(
                    info.path, map_location=map_location, with_optimizer=with_optimizer, verify=verify
                )
            except _BadCheckpoint as e:
                _warn_skipped(info.path, e.reason)
        raise CheckpointError(f"no complete checkpoint in {p}")
    ckpt = resolve_checkpoint(p)
    return _load_verified(ckpt, map_location=map_location, with_optimizer=with_optimizer, verify=verify)


def load_model_for_inference(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[GPT, Profile, Path | None]:
    """Model in eval mode on ``device``, the profile it was trained with, and the checkpoint's
    tokenizer directory (None if it has none). The model is built on the meta device and the
    loaded tensors are assigned, so a 1B model costs one copy of its weights, not two."""
    from ramgpt.config import profile_from_dict
    from ramgpt.model import GPT

    loaded = load_checkpoint(path, map_location="cpu", with_optimizer=False)
    cfg_dict = loaded.meta.get("config")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"checkpoint {loaded.path} has no config in meta.json")
    try:
        profile = profile_from_dict(cfg_dict)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {loaded.path} has an unusable config: {_one_line(e)}") from e
    with torch.device("meta"):
        model = GPT(profile.model, profile.runtime.loss_chunk_tokens)
    state = dict(loaded.model_state)
    if profile.model.tie_embeddings and "head.lm_head.weight" not in state and "embed.wte.weight" in state:
        state["head.lm_head.weight"] = state["embed.wte.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {loaded.path} does not match its config: {_one_line(e)}") from e
    if profile.model.tie_embeddings:
        model.head.lm_head.weight = model.embed.wte.weight  # assign=True wrapped them separately
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CheckpointError(f"checkpoint {loaded.path} does not hold every model tensor")
    model.eval()
    model.to(device)
    return model, profile, loaded.tokenizer_dir


# ---------------------------------------------------------------------------------------------
# Pruning


def _looks_like_ours(path: Path) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return all(n in _OUR_NAMES for n in names)


def prune_checkpoints(
    run_dir: str | os.PathLike[str],
    keep_last: int,
    keep_every: int | None = None,
    keep_best: bool = False,
    dry_run: bool = False,
) -> PruneReport:
    """Delete old checkpoints and leftovers of interrupted saves.

    Kept: the newest complete checkpoint (always), the newest ``keep_last`` complete ones, steps
    that are multiples of ``keep_every``, and with ``keep_best`` the one with the lowest finite
    ``meta["eval_loss"]``. Removed besides: partial ``step_*`` directories that hold only our
    file names, and ``.tmp-step_*`` directories whose writer is gone (or silent for 10 min).
    Anything else in ``run_dir`` is left alone. Safe next to a training process that is saving:
    it only ever writes under temp names and renames, and those are left alone while alive.
    Removal renames a checkpoint to a temp name first, so an interrupted prune never leaves a
    ``step_*`` directory that looks like a damaged checkpoint.
    """
    run_dir = Path(run_dir)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ConfigError(f"keep_last must be a non-negative integer, got {keep_last!r}")
    if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
        raise ConfigError(f"keep_every must be a positive integer, got {keep_every!r}")
    if not run_dir.is_dir():
        raise CheckpointError(f"no run directory {run_dir}")

    infos = list_checkpoints(run_dir)
    complete = [i for i in infos if i.complete]
    keep: set[Path] = set()
    if complete:
        keep.add(complete[-1].path)
        keep.update(i.path for i in complete[-keep_last:] if keep_last > 0)
        if keep_every:
            keep.update(i.path for i in complete if i.step % keep_every == 0)
        if keep_best:
            scored = [i for i in complete if i.eval_loss is not None]
            if scored:
                keep.add(min(scored, key=lambda i: (i.eval_loss, -i.step)).path)

    report = PruneReport(removed=[], kept=[], freed_bytes=0, dry_run=dry_run, partial_removed=[])
    for info in infos:
        if info.complete:
            if info.path in keep:
                report.kept.append(info.path)
            else:
                report.removed.append(info.path)
                report.sizes[info.path] = info.bytes
        elif info.temporary:
            if info.in_progress:
                report.left_alone.append(info.path)
            else:
                report.partial_removed.append(info.path)
                report.sizes[info.path] = info.bytes
        elif not info.path.is_symlink() and _looks_like_ours(info.path):
            report.partial_removed.append(info.path)
            report.sizes[info.path] = info.bytes
        else:
            report.left_alone.append(info.path)

    for p in [*report.removed, *report.partial_removed]:
        if not dry_run and not _delete_checkpoint_dir(p):  # vanished meanwhile: not ours to count
            report.sizes.pop(p, None)
            (report.removed if p in report.removed else report.partial_removed).remove(p)
    report.freed_bytes = sum(report.sizes.values())
    return report


def _delete_checkpoint_dir(path: Path) -> bool:
    """Rename to a temp name of ours, fsync, then delete: a kill mid-delete leaves a leftover
    that the next prune removes, never a half ``step_*`` directory. False if it vanished."""
    target = path
    if not TMP_DIR_RE.match(path.name):
        m = STEP_DIR_RE.match(path.name)
        step = int(m.group(1)) if m else 0
        target = path.with_name(f".tmp-{step_dir_name(step)}-{os.getpid()}-{secrets.token_hex(4)}-del")
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return False  # another prune got there first
        except OSError as e:
            raise CheckpointError(f"could not remove {path}: {os.strerror(e.errno) if e.errno else e}") from e
        _fsync_dir(path.parent)
        try:  # a renamed dir keeps its old mtime; make it ours so other prunes see a live deleter
            os.utime(target)
        except OSError:
            pass
    try:
        _rmtree(target)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CheckpointError(f"could not remove {path}: {os.strerror(e.errno) if e.errno else e}") from e
    return True


__all__ = [
    "CheckpointInfo",
    "LoadedCheckpoint",
    "PartialCheckpointWarning",
    "PruneReport",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_for_inference",
    "prune_checkpoints",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "step_dir_name",
]
