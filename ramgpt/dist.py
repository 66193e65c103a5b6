"""Several processes, one per GPU, launched by ``torchrun`` (or ``ramgpt train --gpus N``, which
starts torchrun): who this process is, and the collectives training needs.

Layout (docs/design.md, "Several GPUs"): on each node, the fp32 masters (which every GPU loads) and the
AdamW state live once, in ``/dev/shm`` files shared by the node's ranks; each chunk of the model has
an owner among the node's ranks (:func:`chunk_owners`). Every rank streams every chunk and
back-propagates its share of the global batch; each chunk's gradients are summed onto the chunk's
owner (a node-local ``reduce``, then an ``all_reduce`` among the owners of that chunk on the other
nodes), and only the owner keeps fp32 gradient accumulators and updates the chunk. Every node thus
holds one copy of the state, whatever the number of its GPUs, and the nodes stay identical without
sending weights.

Three kinds of process group keep collectives from different threads apart (each group has its
own order): the world group (the training thread: loss, norm, barriers), the node group (the
gradient worker's node-local reduces) and one cross-node group per local rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from ramgpt.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    local_world: int
    node: int
    nodes: int
    job: str  # names this job's shared-memory files

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        return self.local_rank == 0

    def node_ranks(self, node: int | None = None) -> list[int]:
        n = self.node if node is None else node
        return list(range(n * self.local_world, (n + 1) * self.local_world))


def from_env(env: dict[str, str] | None = None) -> DistContext | None:
    """The torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``GROUP_RANK``), or None for a plain single process."""
    env = dict(os.environ) if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if world % local_world:
        raise ConfigError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local_world}: give every "
                          "node the same --nproc-per-node")
    job = env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}"
    job = "".join(c if c.isalnum() or c in "-_" else "_" for c in job)[:48]
    return DistContext(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), local_world,
                       int(env.get("GROUP_RANK", int(env["RANK"]) // local_world)), world // local_world, job)


def torchrun_command(gpus: int, argv: list[str]) -> list[str]:
    """``ramgpt train ... --gpus N`` -> ``python -m torch.distributed.run --standalone
    --nproc-per-node N -m ramgpt train ...`` (the same options, without ``--gpus``)."""
    import sys

    rest, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m", "ramgpt",
            *rest]


def chunk_owners(sizes: list[int], local_world: int) -> list[int]:
    """The local rank that owns each chunk: contiguous runs of chunks of about equal bytes (the
    embedding chunk is large), so each rank updates ~1/N of the parameters."""
    total, owners, acc = sum(sizes), [], 0
    for s in sizes:
        owners.append(min(local_world - 1, int(acc * local_world / max(total, 1))))
        acc += s
    return owners


class Comm:
    """The process groups and collectives of one rank (gloo on the CPU, NCCL on GPUs)."""

    def __init__(self, ctx: DistContext, device: str, timeout_s: float = 1800.0):
        import torch.distributed as dist

        self.ctx = ctx
        self.device = device
        self.dist = dist
        cuda = device.startswith("cuda")
        if cuda and not dist.is_nccl_available():
            raise ConfigError("this torch has no NCCL: several GPUs need a CUDA build of torch with NCCL")
        self.backend = "nccl" if cuda else "gloo"
        if not dist.is_initialized():
            kw: dict[str, Any] = {"backend": self.backend, "timeout": datetime.timedelta(seconds=timeout_s)}
            if cuda:
                kw["device_id"] = torch.device(device)
            dist.init_process_group(**kw)
        # every rank creates every group, in the same order
        self.node_groups = [dist.new_group(ctx.node_ranks(n)) for n in range(ctx.nodes)]
        self.cross_groups = [dist.new_group([n * ctx.local_world + lr for n in range(ctx.nodes)])
                             for lr in range(ctx.local_world)]
        self.node_group = self.node_groups[ctx.node]
        # a CPU (gloo) group for small objects and barriers that must not wait on the GPU
        self.cpu_group = dist.new_group(backend="gloo") if cuda else None

    # -- the training thread -------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t

    def sum_floats(self, *values: float) -> list[float]:
        dev = self.device if self.backend == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        self.all_reduce_sum(t)
        return [float(v) for v in t.cpu()]

    def barrier(self) -> None:
        self.dist.barrier(group=self.cpu_group) if self.cpu_group is not None else self.dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.ctx.world
        self.dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]

    # -- the gradient worker -----------------------------------------------------------------------
    def reduce_to(self, t: torch.Tensor, owner_local: int) -> None:
        """Sum ``t`` over this node's ranks into the rank ``owner_local`` of this node, then (on that
        rank) over the owners of the same chunk on the other nodes."""
        dst = self.ctx.node * self.ctx.local_world + owner_local
        if self.ctx.local_world > 1:
            self.dist.reduce(t, dst=dst, op=self.dist.ReduceOp.SUM, group=self.node_group)
        if self.ctx.nodes > 1 and self.ctx.local_rank == owner_local:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.cross_groups[owner_local])

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
