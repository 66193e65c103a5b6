"""The streamed engine: fp32 masters and AdamW in CPU RAM, bf16 copies streamed through the GPU.

ramtorch's ``OffloadModel`` runs the chunks ``[embed, block_0 .. block_{L-1}, head]`` through a
GPU window, loading each chunk's *bf16 copy* from page-locked CPU RAM and recomputing each block
in backward. What ramtorch does not provide is built around it (docs/design.md):

1. The bf16 copies live in one page-locked arena (:mod:`.hostmem`): RSS = tensor bytes.
2. Gradients leave the GPU once per pass, through the ``_accumulate`` hook, into fp32
   accumulators in CPU RAM (:mod:`.gradpath`), which also produce the global gradient norm.
3. Many sequences share one weight pass (``seqs_per_pass``): the PCIe cost of a pass is fixed,
   so the pass must carry enough tokens to hide it behind compute.
4. The tied embedding lives in the first and last chunk; each chunk streams its own bf16 copy,
   and both copies' gradients land in the one fp32 master.
5. The optimizer (:mod:`.chunked_adamw`) updates chunk by chunk in a worker thread while the next
   step's first forward loads each chunk as soon as it is updated and refreshed.
6. The head's forward in the no-grad phase of a pass skips the loss (its backward recomputes it
   anyway): one vocabulary-sized matmul less per pass.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ramgpt.dist import Comm, chunk_owners
from ramgpt.engine.base import Engine, StepReport, make_optimizer, release_freed_heap
from ramgpt.engine.chunked_adamw import ChunkedAdamW
from ramgpt.engine.gradpath import DeviceGradPath, HostGradPath
from ramgpt.engine.hostmem import PAGE, FileArena, HostArena, aligned
from ramgpt.engine.nodeshare import NodeShare
from ramgpt.engine.offload import offload_model_class
from ramgpt.model import GPT
from ramgpt.placement import resolve_grad_accum


class TransferClock:
    """Bytes and device-timed durations of copies on one stream (CUDA events, read lazily)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.bytes = 0
        self.seconds = 0.0
        self._pending: list[tuple[Any, Any]] = []
        self._lock = threading.Lock()

    def span(self, stream, nbytes: int):
        clock = self

        class _Span:
            def __enter__(self_inner):
                if clock.cuda:
                    self_inner.a = torch.cuda.Event(enable_timing=True)
                    self_inner.a.record(stream)
                else:
                    self_inner.t = time.perf_counter()

            def __exit__(self_inner, *exc):
                with clock._lock:
                    clock.bytes += nbytes
                    if clock.cuda:
                        b = torch.cuda.Event(enable_timing=True)
                        b.record(stream)
                        clock._pending.append((self_inner.a, b))
                    else:
                        clock.seconds += time.perf_counter() - self_inner.t

        return _Span()

    def harvest(self) -> None:
        with self._lock:
            keep = []
            for a, b in self._pending:
                if b.query():
                    self.seconds += a.elapsed_time(b) / 1000.0
                else:
                    keep.append((a, b))
            self._pending = keep


def _set_param(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _compute_copies(masters: list[nn.Module], dtype: torch.dtype, arena: HostArena | FileArena,
                    fill: bool = True) -> list[nn.Module]:
    """A ``dtype`` copy of each chunk whose parameters are views of ``arena`` (no fp32 deep copy:
    the masters' parameters map to meta placeholders while the modules are copied)."""
    copies = []
    for c in masters:
        memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=False)
                for p in c.parameters()}
        cp = copy.deepcopy(c, memo)
        for name, p in c.named_parameters():
            view = arena.take(p.shape, dtype)
            if fill:  # several GPUs: only the node's first rank writes the shared copies
                view.copy_(p.detach())
            _set_param(cp, name, view)
        copies.append(cp)
    return copies


class StreamedEngine(Engine):
    name = "streamed"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, seqs_per_pass: int,
                 window: int = 3, pin: int = 0, vram_budget_b: int | None = None, grad_accum: str = "host",
                 moments_file: Path | None = None, comm: Comm | None = None):
        """``moments_file``: the low-RAM mode (``runtime.optimizer_on_disk``): AdamW's moments live in
        this memory-mapped file (removed on close) instead of RAM. ``comm``: one of several ranks
        (:mod:`ramgpt.dist`): the state is shared by the node's ranks and each chunk updated by its owner."""
        if device.startswith("cuda") and torch.device(device).index is None:
            # worker threads must name the device: the current one is per thread
            device = f"cuda:{torch.cuda.current_device()}"
        super().__init__(model, device=device, precision=precision, optim_cfg=optim_cfg, vram_budget_b=vram_budget_b)
        if grad_accum not in ("auto", "host", "device"):
            raise ValueError(f"grad_accum must be 'auto', 'host' or 'device', got {grad_accum!r}")
        self.cuda = device.startswith("cuda")
        self.grad_accum = resolve_grad_accum(grad_accum, device)
        self._spp = seqs_per_pass
        self.model.to("cpu")  # fp32 masters live in CPU RAM
        self.optimizer = make_optimizer(model, optim_cfg.lr, optim_cfg.weight_decay,
                                        (optim_cfg.beta1, optim_cfg.beta2), optim_cfg.eps)
        self.comm = comm
        self.masters = model.chunks()
        # per chunk: streamed-copy param name -> fp32 master Parameter (tied weight appears twice)
        self._master_of: list[dict[str, nn.Parameter]] = [dict(c.named_parameters()) for c in self.masters]
        owned: set[int] = set()
        self._owned: list[list[nn.Parameter]] = []  # per chunk, in forward order: params it updates
        for m in self._master_of:
            mine = [p for p in m.values() if id(p) not in owned]
            owned.update(id(p) for p in mine)
            self._owned.append(mine)

        owner_chunk = {id(p): j for j, ps in enumerate(self._owned) for p in ps}
        # per chunk: the other chunks whose masters its copy holds (the head's copy of the embedding)
        self._tied_from = [{owner_chunk[id(p)] for p in m.values()} - {i} for i, m in enumerate(self._master_of)]
        sizes = [sum(aligned(p.numel() * self.compute_dtype.itemsize) for p in c.parameters()) for c in self.masters]
        # which rank of the node updates each chunk (one process: this one)
        self._owner = chunk_owners(sizes, comm.ctx.local_world) if comm else [0] * len(sizes)
        self._mine = [o == (comm.ctx.local_rank if comm else 0) for o in self._owner]
        self.share: NodeShare | None = None
        self._update_count = 0  # optimizer updates started: the per-chunk counters must reach it
        self.update_timeout_s = 1800.0
        if comm is not None:
            self._share_node_state(sizes, moments_file)
            self.arena = self.share.copies
            copies = _compute_copies(self.masters, self.compute_dtype, self.arena, fill=comm.ctx.local_main)
            self.arena.register(device)
            comm.barrier()  # the node's copies are written
        else:
            self.arena = HostArena(sum(sizes), device, "the bf16 weight copies")
            copies = _compute_copies(self.masters, self.compute_dtype, self.arena)
        self._head_copy = copies[-1]
        keep = "checkpoint" if model.cfg.dropout > 0 else False  # recompute would resample dropout
        self.h2d = TransferClock(self.cuda)
        self.d2h = TransferClock(self.cuda)
        self.om = offload_model_class()(copies, device=device, window=window, pin=pin, keep_activations=keep)
        self.om.grad_sink = self._on_grads
        self.om.load_observer = self._observe_load
        self.om.load_gate = self._wait_for_update
        self.om.acquire_observer = self._observe_wait
        self.om.update_running = lambda: self.adamw.running()
        # chunks ramtorch keeps on the GPU (pin) or re-pinned outside the arena, for the pinned count
        self._extra_pinned = sum(t.numel() * t.element_size() for st in self.om._state for t in st.tensors.values()
                                 if not self.arena.contains(t) and t.device.type == "cpu" and self.arena.registered)

        owner_of = {id(p): self._owner[i] for i, ps in enumerate(self._owned) for p in ps}
        if comm is not None:
            if self.cuda and self.grad_accum != "device":
                raise ValueError("several GPUs sum gradients on the GPU: use runtime.grad_accum=device (or auto)")
            self.grad_accum = "device"  # on the CPU its path sums over the ranks with gloo
        if self.grad_accum == "device":
            mine = [ps for ps, m in zip(self._owned, self._mine) if m]
            self.grads: DeviceGradPath | HostGradPath = DeviceGradPath(
                self.params, self._master_of, device, self.d2h, mine, comm=comm, owner_of=owner_of)
            if self.grads.fallback:  # page-locking refused: the CPU worker is faster than pageable DMA
                self.grads.close()
                self.grad_accum = "host"
        if self.grad_accum == "host":
            slot = max(sum(aligned(p.numel() * p.element_size()) for p in c.parameters()) for c in copies)
            self.grads = HostGradPath(self.params, self._master_of, device, self.d2h, slot, max(2, min(4, len(copies))))
        self.moments = None
        if self.share is not None:
            self.moments = self.share.moments
        elif moments_file is not None:
            per = [aligned(p.numel() * 4, PAGE) * 2 for p in self.params]
            self.moments = FileArena(moments_file, sum(per))
        self.adamw = ChunkedAdamW(self.optimizer, self._owned, self.moments,
                                  update=[i for i, m in enumerate(self._mine) if m])
        if self.share is not None:
            self.adamw.ensure_all_states(step_arena=self.share.moments)  # the same layout in every rank
        self._norm_from_path = False
        self._update_gate = None
        self._opt_wait_s = 0.0  # compute-thread waits for chunks the optimizer had not updated yet
        self._load_wait_s = 0.0
        del copies
        release_freed_heap()

    @property
    def seqs_per_pass(self) -> int:
        return self._spp

    @property
    def shared_b(self) -> int:
        """Bytes of the node-shared training state (several GPUs; 0 for one process)."""
        return sum(a.nbytes for a in self.share.arenas.values()) if self.share is not None else 0

    def _share_node_state(self, sizes: list[int], moments_file: Path | None) -> None:
        """Several GPUs: the fp32 masters, bf16 copies and AdamW state once per node, in shared
        memory; the masters become views of it (the node's first rank writes their values)."""
        comm = self.comm
        assert comm is not None
        masters_b = sum(aligned(p.numel() * 4, PAGE) for p in self.params)
        copies_b = sum(aligned(p.numel() * self.compute_dtype.itemsize, PAGE) for c in self.masters
                       for p in c.parameters())
        moments_b = sum(2 * aligned(p.numel() * 4, PAGE) + PAGE for p in self.params)
        self.share = NodeShare(comm, masters_b=masters_b, copies_b=copies_b, moments_b=moments_b,
                               n_chunks=len(sizes), moments_dir=moments_file.parent if moments_file else None)
        with torch.no_grad():
            for p in self.params:
                view = self.share.masters.take(p.shape, p.dtype)
                if comm.ctx.local_main:
                    view.copy_(p.detach())
                p.data = view  # the same Parameter object (the optimizer holds it), shared storage
        comm.barrier()

    # -- ramtorch hooks ------------------------------------------------------------------------
    def _observe_load(self, state):
        return self.h2d.span(self.om._h2d_stream, state.nbytes())

    def _wait_for_update(self, idx: int) -> None:
        """Loader thread, before copying chunk ``idx`` to the GPU: its update must be done (by this
        process, or, with several GPUs, by the chunk's owner: the node-shared counter says)."""
        if self.share is None:
            self.adamw.wait_chunk(idx)
            return
        deadline = time.monotonic() + self.update_timeout_s
        while int(self.share.flags[idx]) < self._update_count:
            self.adamw.raise_error()
            if time.monotonic() > deadline:
                raise TimeoutError(f"chunk {idx} was not updated by rank {self._owner[idx]} of this node within "
                                   f"{self.update_timeout_s:.0f} s")
            time.sleep(0.0005)

    def _observe_wait(self, seconds: float, during_update: bool) -> None:
        if during_update:
            self._opt_wait_s += seconds
        else:
            self._load_wait_s += seconds

    def _on_grads(self, idx: int, named_grads: dict[str, torch.Tensor]) -> None:
        self.grads.on_grads(idx, named_grads)

    # -- passes ----------------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_pass: bool = False) -> torch.Tensor:
        """One pass. ``last_pass``: the step's last, so the gradient path sums the squares of the
        final gradients as they form (without it, the optimizer step computes the norm itself)."""
        self.grads.start_pass(last=last_pass)
        self._norm_from_path = last_pass
        scale = self.scaler.scale
        self._head_copy.defer_loss = True
        try:
            with self._autocast():
                res = self.om.step((x, y), loss_fn=lambda out, _t: out * scale)
        finally:
            self._head_copy.defer_loss = False
        return res.loss.detach().float() / scale

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self._autocast():
            out = self.om((x, y))
        return float(out)

    # -- the optimizer ---------------------------------------------------------------------------
    def _before_optimizer(self) -> None:
        """All of this step's gradients are in the fp32 accumulators (and their norm is known)."""
        self.grads.drain()
        self.h2d.harvest()
        self.d2h.harvest()

    def optimizer_step(self, lr: float, n_tokens: int) -> StepReport:
        """Decide the clip from the norm the gradient path summed, then update in the background
        (the next forward waits per chunk). A non-finite norm skips the update."""
        self._before_optimizer()
        t0 = time.perf_counter()
        self.adamw.wait_all()  # the previous update (always done by now: this step's forward waited for it)
        previous_work = self.adamw.last_work_s
        factor = 1.0 / (self.scaler.scale * max(n_tokens, 1))
        if self._norm_from_path or self.comm is not None:
            sq = self.grads.sq_norm()
            if self.comm is not None:  # each chunk's squares were summed by one rank per node
                sq = self.comm.sum_floats(sq)[0] / self.comm.ctx.nodes
        else:  # passes run one by one without announcing the last (tests, benchmarks): one pass over the grads
            grads = [p.grad for p in self.params if p.grad is not None and id(p) in self.grads.touched]
            sq = float(sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads)) if grads else 0.0
        self._norm_from_path = False
        norm = math.sqrt(sq) * factor if sq >= 0 else float("nan")
        finite = math.isfinite(norm)
        self.om.invalidate_residency()  # GPU copies of the old weights must not be reused
        if finite:
            self.grads.zero_untouched()
            clip = self.cfg.grad_clip
            coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
            self._update_count += 1
            self.adamw.start(lr, 1.0 / (factor * coef), after_chunk=self._chunk_updated, before_chunk=self._gate_chunk)
        self.scaler.update(finite)
        self.grads.zero()
        return StepReport(norm, not finite, previous_work + (time.perf_counter() - t0), self.scaler.scale)

    def set_update_gate(self, gate) -> bool:
        if self.comm is not None:  # several GPUs: checkpoints are written with training paused
            return False
        self._update_gate = gate
        return True

    def _gate_chunk(self, idx: int) -> None:
        """Before chunk ``idx`` is updated: a background checkpoint must have written its masters
        and moments."""
        if self._update_gate is None:
            return
        tensors = list(self._owned[idx])
        for p in self._owned[idx]:
            tensors.extend(v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor))
        self._update_gate(tensors)

    def _chunk_updated(self, idx: int) -> None:
        # a tied weight's copy in this chunk is refreshed from a master another chunk updates
        # (the head's copy of the embedding): with several ranks that update may still be running
        if self.share is not None:
            for j in self._tied_from[idx]:
                self._wait_for_update(j)
        self._refresh_chunk(idx)
        if self.share is not None:
            self.share.flags[idx] = self._update_count  # the node's other ranks may load it now

    @torch.no_grad()
    def _refresh_chunk(self, idx: int) -> None:
        """The bf16 copies of chunk ``idx`` from its updated fp32 masters."""
        for k, t in self.om._state[idx].tensors.items():
            t.copy_(self._master_of[idx][k])

    def wait_optimizer(self) -> None:
        """Every chunk's update is done (with several GPUs: by every owner on this node)."""
        self.adamw.wait_all()
        if self.share is not None:
            for idx in range(len(self.masters)):
                self._wait_for_update(idx)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.wait_optimizer()
        return super().state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        self.wait_optimizer()
        return super().optimizer_state()

    def load_state(self, model_state, optimizer_state, scaler_state) -> None:
        self.wait_optimizer()
        if self.comm is None or self.comm.ctx.local_main:
            super().load_state(model_state, optimizer_state, scaler_state)
        else:  # the node's first rank fills the shared state
            if scaler_state:
                self.scaler.load_state_dict(scaler_state)
            self.om.invalidate_residency()
        if self.comm is not None:
            self.comm.barrier()

    def _state_for(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        return self.adamw._ensure_state(p)

    def _state_loaded(self, p: nn.Parameter) -> None:
        self.adamw.release([p])

    def tensor_saved(self, t: torch.Tensor) -> None:
        if self.moments is not None:
            self.moments.release(t)

    @torch.no_grad()
    def _after_optimizer(self) -> None:
        """Refresh every bf16 copy (after a resume); drop stale GPU copies."""
        for idx in range(len(self.masters)):
            self._refresh_chunk(idx)
        self.om.invalidate_residency()

    def counters(self) -> dict[str, float]:
        out = super().counters()
        self.h2d.harvest()
        self.d2h.harvest()
        # all H2D bytes; the rate uses only the timed ones (the weight loads)
        acc_h2d = self.grads.h2d_bytes if isinstance(self.grads, DeviceGradPath) else 0
        out["h2d_bytes_total"] = self.h2d.bytes + acc_h2d
        out["h2d_timed_bytes_total"] = self.h2d.bytes
        out["d2h_bytes_total"] = self.d2h.bytes
        out["h2d_seconds_total"] = self.h2d.seconds
        out["d2h_seconds_total"] = self.d2h.seconds
        # compute-thread waits: for the loader to bring a chunk in, for the gradient path, and for
        # the optimizer's update of a chunk (the optimizer's exposed time, reported apart)
        out["stall_load_s_total"] = self._load_wait_s
        out["stall_grad_s_total"] = self.grads.wait_s
        out["stall_s_total"] = out["stall_load_s_total"] + out["stall_grad_s_total"]
        out["optimizer_exposed_s_total"] = self._opt_wait_s
        if self.comm is not None:
            self.grads.nccl.harvest()
            out["comm_s_total"] = self.grads.nccl.seconds + self.grads.comm_s
        out["optimizer_work_s_total"] = self.adamw.work_s_total
        out["pinned_b"] = (self.arena.nbytes if self.arena.registered else 0) + self.grads.pinned_b + self._extra_pinned
        if self.moments is not None:
            out["optimizer_file_b"] = self.moments.nbytes
        return out

    def close(self) -> None:
        try:
            self.adamw.wait_all()
        finally:
            self.grads.close()
            self.om.close()
            if self.share is not None:
                self.share.close()
            else:
                self.arena.close()
                if self.moments is not None:  # scratch: the state that matters is in the checkpoints
                    self.moments.close()
                    self.moments.path.unlink(missing_ok=True)
