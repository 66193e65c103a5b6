"""Checkpoint write rate on this machine (no GPU needed): ramgpt's safetensors writer (SHA-256 on
a second thread beside the writes) against the same bytes hashed and written one after the other
on one thread (the writer before round 5), in alternating order, four rounds, into DIR (default:
the current directory), with an fsync at the end of each file.

    python bench/ckpt_write.py [DIR] [GiB]
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ramgpt.checkpoint.tensorfile import _CHUNK, write_safetensors  # noqa: E402


def serial(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    with open(path, "xb") as f:
        head = b"{}"
        for piece in (struct.pack("<Q", len(head)), head):
            h.update(piece)
            f.write(piece)
        for _, t in tensors:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            for a in range(0, len(view), _CHUNK):
                h.update(view[a : a + _CHUNK])
                f.write(view[a : a + _CHUNK])
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def main() -> None:
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
    gib = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    n = int(gib * 2**30 / 4 / 16)
    tensors = [(f"t{i}", torch.randn(n)) for i in range(16)]  # 16 tensors, like a model's large ones
    rows = []
    for rnd in range(4):
        for how in (("serial", "ramgpt") if rnd % 2 == 0 else ("ramgpt", "serial")):
            p = where / f".ckpt-write-{os.getpid()}-{how}-{rnd}"
            t0 = time.perf_counter()
            serial(p, tensors) if how == "serial" else write_safetensors(p, tensors)
            dt = time.perf_counter() - t0
            p.unlink()
            rows.append({"how": how, "gib": gib, "s": round(dt, 3), "gb_per_s": round(gib * 2**30 / dt / 1e9, 3)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
