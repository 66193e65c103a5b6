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

from ramgpt.engine.base import Engine, StepReport, make_optimizer, release_freed_heap
from ramgpt.engine.chunked_adamw import ChunkedAdamW
from ramgpt.engine.gradpath import DeviceGradPath, HostGradPath
from ramgpt.engine.hostmem import FileArena, HostArena, aligned
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


def _compute_copies(masters: list[nn.Module], dtype: torch.dtype, arena: HostArena) -> list[nn.Module]:
    """A ``dtype`` copy of each chunk whose parameters are views of ``arena`` (no fp32 deep copy:
    the masters' parameters map to meta placeholders while the modules are copied)."""
    copies = []
    for c in masters:
        memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=False)
                for p in c.parameters()}
        cp = copy.deepcopy(c, memo)
        for name, p in c.named_parameters():
            view = arena.take(p.shape, dtype)
            view.copy_(p.detach())
            _set_param(cp, name, view)
        copies.append(cp)
    return copies


class StreamedEngine(Engine):
    name = "streamed"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, seqs_per_pass: int,
                 window: int = 3, pin: int = 0, vram_budget_b: int | None = None, grad_accum: str = "host",
                 moments_file: Path | None = None):
        """``moments_file``: the low-RAM mode (``runtime.optimizer_on_disk``): AdamW's moments live in
        this memory-mapped file (removed on close) instead of RAM."""
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
        self.masters = model.chunks()
        # per chunk: streamed-copy param name -> fp32 master Parameter (tied weight appears twice)
        self._master_of: list[dict[str, nn.Parameter]] = [dict(c.named_parameters()) for c in self.masters]
        owned: set[int] = set()
        self._owned: list[list[nn.Parameter]] = []  # per chunk, in forward order: params it updates
        for m in self._master_of:
            mine = [p for p in m.values() if id(p) not in owned]
            owned.update(id(p) for p in mine)
            self._owned.append(mine)

        sizes = [sum(aligned(p.numel() * self.compute_dtype.itemsize) for p in c.parameters()) for c in self.masters]
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

        if self.grad_accum == "device":
            self.grads: DeviceGradPath | HostGradPath = DeviceGradPath(self.params, self._master_of, device, self.d2h,
                                                                       self._owned)
            if self.grads.fallback:  # page-locking refused: the CPU worker is faster than pageable DMA
                self.grads.close()
                self.grad_accum = "host"
        if self.grad_accum == "host":
            slot = max(sum(aligned(p.numel() * p.element_size()) for p in c.parameters()) for c in copies)
            self.grads = HostGradPath(self.params, self._master_of, device, self.d2h, slot, max(2, min(4, len(copies))))
        self.moments = None
        if moments_file is not None:
            per = [aligned(p.numel() * 4, 4096) * 2 for p in self.params]
            self.moments = FileArena(moments_file, sum(per))
        self.adamw = ChunkedAdamW(self.optimizer, self._owned, self.moments)
        self._norm_from_path = False
        self._update_gate = None
        self._opt_wait_s = 0.0  # compute-thread waits for chunks the optimizer had not updated yet
        self._load_wait_s = 0.0
        del copies
        release_freed_heap()

    @property
    def seqs_per_pass(self) -> int:
        return self._spp

    # -- ramtorch hooks ------------------------------------------------------------------------
    def _observe_load(self, state):
        return self.h2d.span(self.om._h2d_stream, state.nbytes())

    def _wait_for_update(self, idx: int) -> None:
        """Loader thread, before copying chunk ``idx`` to the GPU: its update must be done."""
        self.adamw.wait_chunk(idx)

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
        if self._norm_from_path:
            sq = self.grads.sq_norm()
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
            self.adamw.start(lr, 1.0 / (factor * coef), after_chunk=self._refresh_chunk, before_chunk=self._gate_chunk)
        self.scaler.update(finite)
        self.grads.zero()
        return StepReport(norm, not finite, previous_work + (time.perf_counter() - t0), self.scaler.scale)

    def set_update_gate(self, gate) -> bool:
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

    @torch.no_grad()
    def _refresh_chunk(self, idx: int) -> None:
        """The bf16 copies of chunk ``idx`` from its updated fp32 masters."""
        for k, t in self.om._state[idx].tensors.items():
            t.copy_(self._master_of[idx][k])

    def wait_optimizer(self) -> None:
        self.adamw.wait_all()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.wait_optimizer()
        return super().state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        self.wait_optimizer()
        return super().optimizer_state()

    def load_state(self, model_state, optimizer_state, scaler_state) -> None:
        self.wait_optimizer()
        super().load_state(model_state, optimizer_state, scaler_state)

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
            self.arena.close()
            if self.moments is not None:  # scratch: the state that matters is in the checkpoints
                self.moments.close()
                self.moments.path.unlink(missing_ok=True)
