"""The training state one node's ranks share (several GPUs): fp32 masters (which every rank's GPU
loads), AdamW state and per-chunk "updated" counters, each a file in ``/dev/shm`` that every rank maps.

Local rank 0 creates the files, the other ranks map them after a barrier, and then the files are
unlinked: the memory lives exactly as long as the processes that map it, so a crashed job leaves
nothing behind in ``/dev/shm``. Node host RAM is then one copy of the state however many GPUs
train (plus each process's own gradient accumulators for the chunks it owns).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ramgpt.dist import Comm
from ramgpt.engine.hostmem import PAGE, FileArena, aligned
from ramgpt.errors import ConfigError

SHM_DIR = Path("/dev/shm")

class NodeShare:
    def __init__(self, comm: Comm, *, masters_b: int, moments_b: int, n_chunks: int,
                 shm_dir: Path = SHM_DIR, moments_dir: Path | None = None):
        ctx = comm.ctx
        prefix = f"ramgpt-{ctx.job}-node{ctx.node}"
        files = {
            "masters": (shm_dir / f"{prefix}-masters", masters_b),
            "moments": ((moments_dir or shm_dir) / f"{prefix}-moments", moments_b),
            "flags": (shm_dir / f"{prefix}-flags", n_chunks * 8),
        }
        problem = ""
        if ctx.local_main:
            in_shm = sum(aligned(b, PAGE) for p, b in files.values() if p.parent == shm_dir)
            free = shutil.disk_usage(shm_dir).free if shm_dir.is_dir() else 0
            if free < in_shm:
                problem = (f"{shm_dir} has {free / 2**30:.1f} GiB free but this node's shared training state needs "
                           f"{in_shm / 2**30:.1f} GiB; enlarge it (docker: --shm-size; mount -o remount,size=...) or use "
                           "runtime.optimizer_on_disk to keep the AdamW state on disk")
        problems = comm.gather_objects(problem)
        if any(problems):
            raise ConfigError(next(p for p in problems if p))
        create = ctx.local_main
        self.arenas: dict[str, FileArena] = {}
        def arena(k: str, create: bool) -> FileArena:
            p, b = files[k]  # only the low-RAM mode's moments file on disk hands its pages back
            return FileArena(p, b, create=create, release_pages=p.parent != shm_dir)

        if create:
            self.arenas = {k: arena(k, True) for k in files}
        comm.barrier()
        if not create:
            self.arenas = {k: arena(k, False) for k in files}
        comm.barrier()
        if create:  # every rank of the node maps them now: the names can go
            for p, _ in files.values():
                p.unlink(missing_ok=True)
        self.masters = self.arenas["masters"]
        self.moments = self.arenas["moments"]
        self.flags = self.arenas["flags"].take((n_chunks,), torch.int64)  # the update each chunk is at

    def close(self) -> None:
        for a in self.arenas.values():
            a.close()
