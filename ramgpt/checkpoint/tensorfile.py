"""Tensor files: a streaming safetensors writer (hashed on the way, errno kept), the reader, and
the codec that turns an optimizer ``state_dict()`` into (tensors, JSON) and back. Nothing unpickles."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ramgpt.errors import CheckpointError
from ramgpt.fmt import first_line

_CHUNK = 64 * 1024 * 1024  # bytes hashed and written per call: bounded, large enough to stream

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
class FileRecord:
    bytes: int
    sha256: str


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]],
                      after_tensor: Callable[[torch.Tensor], None] | None = None) -> FileRecord:
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
        n = tensor_nbytes(t)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes, as the reference writer does
    h = _Hasher()
    size = 0
    try:
        with open(path, "xb") as f:
            for piece in (struct.pack("<Q", len(head)), head):
                h.update(piece)
                f.write(piece)
                size += len(piece)
            for _name, t in tensors:
                for chunk in _byte_pieces(t):
                    h.update(chunk)  # hashed by the hasher's thread while this one writes
                    f.write(chunk)
                    size += len(chunk)
                h.wait()  # every byte of t is hashed: the caller may now change (or release) it
                if after_tensor is not None:
                    after_tensor(t)
            f.flush()
            os.fsync(f.fileno())
    finally:
        digest = h.close()
    return FileRecord(size, digest)


def is_source(t: Any) -> bool:
    """A tensor source: not a tensor, but a value written piece by piece (``byte_pieces``), with a
    tensor's ``shape``, ``dtype``, ``numel()``, ``element_size()``, ``data_ptr()`` and ``load()``
    (the streamed engine's split masters, :class:`ramgpt.engine.planes.JoinedTensor`)."""
    return not isinstance(t, torch.Tensor) and hasattr(t, "byte_pieces")


_SOURCE_PIECE = 16 * 1024 * 1024  # bytes a tensor source joins at a time (a few are in flight to the hasher)


def _byte_pieces(t: Any):
    if is_source(t):
        yield from t.byte_pieces(_SOURCE_PIECE)
        return
    # one tensor at a time on the CPU: a CUDA state never needs a full host copy
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    view = memoryview(flat.numpy())
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


class _Hasher:
    """SHA-256 of a stream on a thread of its own: hashing (1.4 GB/s on one core of the CPU machine)
    and writing both release the GIL, so a save takes about the longer of the two instead of their
    sum. Updates are applied in order; :meth:`wait` returns when all given so far are applied."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(maxsize=4)  # bounded: the chunks are views of live tensors
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ramgpt-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._h.update(item)
            except BaseException as e:  # noqa: BLE001 - raised on the writer's thread
                self._error = e
            finally:
                self._q.task_done()

    def update(self, data) -> None:
        self._q.put(data)

    def wait(self) -> None:
        self._q.join()
        if self._error is not None:
            raise self._error

    def close(self) -> str:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()


def write_json(path: Path, data: Any) -> FileRecord:
    raw = (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "xb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(len(raw), hashlib.sha256(raw).hexdigest())


class LazyTensor:
    """One tensor of a safetensors file, read when :meth:`load` is called: a resume copies tensors
    into the training state one at a time, so it needs no more RAM than training itself (a whole
    1b checkpoint read at once held an extra 12 GB)."""

    def __init__(self, path: Path, key: str, what: str):
        self.path, self.key, self.what = path, key, what

    def load(self) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return f.get_tensor(self.key)
        except Exception as e:  # SafetensorError, OSError: one line
            raise CheckpointError(f"checkpoint {self.path.parent}: cannot read {self.what}: {first_line(e)}") from e


def materialize(t: torch.Tensor | LazyTensor) -> torch.Tensor:
    return t.load() if isinstance(t, LazyTensor) or is_source(t) else t


def lazy_safetensors(path: Path, what: str) -> dict[str, LazyTensor]:
    """The tensors of ``path`` as :class:`LazyTensor` handles (the header is read now)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {what}: {first_line(e)}") from e
    return {k: LazyTensor(path, k, what) for k in keys}


def read_safetensors(path: Path, device: str | torch.device, what: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # SafetensorError, OSError, RuntimeError (bad device): all one line
        raise CheckpointError(f"checkpoint {path.parent}: cannot read {what}: {first_line(e)}") from e


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


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__scalar__" in obj:
        return torch.tensor(obj["__scalar__"], dtype=_SCALAR_DTYPES[obj["dtype"]])
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: decode_state(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode_state(state, "", tensors)

