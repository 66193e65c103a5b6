"""The streamed engine.

Both engines own the fp32 master weights (``engine.model``, a ``ramgpt.model.GPT``) and an
AdamW over them, and expose the same four calls to the training loop:

- ``forward_backward(x, y) -> loss_sum``: one pass over some sequences; grads accumulate.
- ``optimizer_step(lr, n_tokens) -> StepReport``: unscale, clip, AdamW, zero.
- ``eval_loss_sum(x, y) -> float``.
- ``counters() -> dict`` for the live panel (transfer bytes, GB/s, stalls, VRAM).

**ResidentEngine**: everything on one device (CPU fp32, or a GPU with bf16/fp16 autocast and
per-block activation checkpointing).

**StreamedEngine**: ramtorch ``OffloadModel`` streams *bf16 copies* of the chunks
``[embed, block_0 .. block_{L-1}, head]`` from pinned CPU RAM through a GPU window, recomputing
each block in backward. What ramtorch does not provide is built around it (docs/design.md):

1. fp32 masters + fused CPU AdamW stay on the CPU; the GPU only ever sees bf16 weights
   (half the PCIe bytes of streaming fp32 masters).
2. Gradients leave the GPU once per pass: ``_accumulate`` (ramtorch's per-chunk gradient hook)
   is overridden to copy each chunk's bf16 grads D2H on a dedicated stream into reusable pinned
   buffers, and a worker thread adds them into the fp32 master grads while the GPU carries on
   with the rest of the backward. ramtorch's own accumulators would keep bf16 sums (lossy over
   many micro-batches) and flush them in one synchronous batch at the end.
3. Many sequences share one weight pass (``seqs_per_pass``): the PCIe cost of a pass is fixed
   (~2x the bf16 weights in, 1x the bf16 grads out), so the pass must carry enough tokens to
   hide it behind compute.
4. The tied embedding lives in the first and last chunk; each chunk streams its own bf16 copy,
   and both copies' gradients land in the one fp32 master.
"""


from __future__ import annotations

import copy
import queue
import threading
import time
import warnings
from typing import Any

import torch
import torch.nn as nn

from ramgpt.engine.base import Engine, aligned, consume_cuda_error, make_optimizer, release_freed_heap
from ramgpt.engine.offload import offload_model_class
from ramgpt.model import GPT
from ramgpt.placement import resolve_grad_accum


class _TransferClock:
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


class StreamedEngine(Engine):
    name = "streamed"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, seqs_per_pass: int,
                 window: int = 3, pin: int = 0, vram_budget_b: int | None = None, grad_accum: str = "host"):
        super().__init__(model, device=device, precision=precision, optim_cfg=optim_cfg, vram_budget_b=vram_budget_b)
        if grad_accum not in ("auto", "host", "device"):
            raise ValueError(f"grad_accum must be 'auto', 'host' or 'device', got {grad_accum!r}")
        self.cuda = device.startswith("cuda")
        grad_accum = resolve_grad_accum(grad_accum, device)
        self.grad_accum = grad_accum
        self._spp = seqs_per_pass
        self.model.to("cpu")  # fp32 masters live in CPU RAM
        self.optimizer = make_optimizer(model, optim_cfg.lr, optim_cfg.weight_decay,
                                         (optim_cfg.beta1, optim_cfg.beta2), optim_cfg.eps)
        self.masters = model.chunks()
        # per chunk: streamed-copy param name -> fp32 master Parameter (tied weight appears twice)
        self._master_of: list[dict[str, nn.Parameter]] = [dict(c.named_parameters()) for c in self.masters]
        copies = []
        for c in self.masters:
            cp = copy.deepcopy(c).to(dtype=self.compute_dtype)
            for p in cp.parameters():
                p.requires_grad_(False)
            copies.append(cp)
        keep = "checkpoint" if model.cfg.dropout > 0 else False  # recompute would resample dropout
        cls = offload_model_class()
        self.h2d = _TransferClock(self.cuda)
        self.d2h = _TransferClock(self.cuda)
        self.om = cls(copies, device=device, window=window, pin=pin, keep_activations=keep)
        self.om.grad_sink = self._on_grads
        self.om.load_observer = self._observe_load
        # grads: D2H stream + a small ring of reusable pinned staging slots (each as large as the
        # largest chunk) and one CPU worker that adds them into the fp32 master grads in FIFO
        # order, so tied-weight sums are race-free. A ring instead of a buffer per chunk keeps
        # pinned RAM at four chunks' worth (1 GiB for the 1b profile, since pinned allocations
        # round up to powers of two, instead of over 2.2 GB).
        self._d2h_stream = torch.cuda.Stream(torch.device(device)) if self.cuda else None
        self._slot_bytes = max(sum(aligned(p.numel() * p.element_size()) for p in c.parameters()) for c in copies)
        self._slots: list[torch.Tensor] = []
        self._free_slots: queue.Queue = queue.Queue()
        self._n_slots = max(2, min(4, len(copies)))
        self._touched: set[int] = set()
        self._q: queue.Queue = queue.Queue()
        self._worker_error: BaseException | None = None
        self._grad_wait_s = 0.0
        self._worker = threading.Thread(target=self._grad_worker, name="ramgpt-grad-accum", daemon=True)
        self._worker.start()
        if grad_accum == "device":
            self._setup_device_accum()
        del copies
        release_freed_heap()  # the fp32 deep copies were freed after pinning; give them back to the OS

    @property
    def seqs_per_pass(self) -> int:
        return self._spp

    # -- transfer observation ------------------------------------------------------------------
    def _observe_load(self, state):
        return self.h2d.span(self.om._h2d_stream, state.nbytes())

    # -- gradient path -----------------------------------------------------------------------
    def _take_slot(self) -> int:
        if self._free_slots.empty() and len(self._slots) < self._n_slots:
            self._slots.append(torch.empty(self._slot_bytes, dtype=torch.uint8, pin_memory=True))
            return len(self._slots) - 1
        t0 = time.perf_counter()
        slot = self._free_slots.get()  # the worker has consumed this slot's previous grads
        self._grad_wait_s += time.perf_counter() - t0
        return slot

    def _on_grads(self, idx: int, named_grads: dict[str, torch.Tensor]) -> None:
        """Compute thread, right after chunk ``idx``'s backward: ship its grads to the host."""
        if self.grad_accum == "device":
            self._on_grads_device(idx, named_grads)
            return
        if self._worker_error is not None:
            raise RuntimeError("gradient worker failed") from self._worker_error
        if not self.cuda:
            self._q.put((idx, {k: g.detach() for k, g in named_grads.items()}, None, None))
            return
        slot = self._take_slot()
        buf = self._slots[slot]
        stage: dict[str, torch.Tensor] = {}
        off = 0
        for k, g in named_grads.items():
            nb = g.numel() * g.element_size()
            stage[k] = buf[off : off + nb].view(g.dtype).view(g.shape)
            off += aligned(nb)
        compute = torch.cuda.current_stream(torch.device(self.device))
        ready = torch.cuda.Event()
        ready.record(compute)
        with torch.cuda.stream(self._d2h_stream):
            self._d2h_stream.wait_event(ready)
            with self.d2h.span(self._d2h_stream, off):
                for k, g in named_grads.items():
                    stage[k].copy_(g.detach(), non_blocking=True)
                    g.record_stream(self._d2h_stream)
            done = torch.cuda.Event()
            done.record(self._d2h_stream)
        self._q.put((idx, stage, done, slot))

    # -- gradient path, grad_accum="device" (the default on CUDA; see docs/design.md) -----------
    _ACC_PIECE = 16 * 2**20  # elements per GPU scratch piece (64 MiB of fp32)

    def _setup_device_accum(self) -> None:
        """fp32 master grads as views of one flat host buffer, registered with CUDA so the side
        stream can DMA it both ways (one registration: no per-tensor power-of-two rounding)."""
        params = self.params
        sizes = [aligned(p.numel() * 4) // 4 for p in params]
        self._grad_flat = torch.zeros(sum(sizes), dtype=torch.float32)  # no garbage for a param without grads
        self._registered = False
        if self.cuda:
            rc = torch.cuda.cudart().cudaHostRegister(self._grad_flat.data_ptr(), self._grad_flat.numel() * 4, 0)
            self._registered = int(rc) == 0
            if not self._registered:
                # e.g. a locked-memory limit (WSL2, containers): unpinned copies would be synchronous,
                # so the CPU worker is faster; the grads stay in the flat buffer either way
                consume_cuda_error(self.device)
                warnings.warn(f"could not page-lock {self._grad_flat.numel() * 4 / 2**30:.1f} GiB for gradient "
                              f"accumulation on the GPU ({rc}); summing gradients on the CPU instead "
                              "(runtime.grad_accum=host)", RuntimeWarning, stacklevel=2)
                self.grad_accum = "host"
        off = 0
        for p, n in zip(params, sizes):
            p.grad = self._grad_flat[off : off + p.numel()].view_as(p)
            off += n
        self._acc_stream = torch.cuda.Stream(torch.device(self.device)) if self.cuda else None
        self._acc_pending: list = []  # done-events of chunks whose accumulation is in flight
        self._acc_h2d_bytes = 0  # H2D bytes of the running sums (not timed; see _on_grads_device)

    def _on_grads_device(self, idx: int, named_grads: dict[str, torch.Tensor]) -> None:
        """Sum this pass's bf16 grads into the fp32 host accumulators on the GPU: H2D the
        accumulator, add, D2H it back, all on one side stream (ordered after the previous pass's
        D2H of the same tensor, and after the head chunk's part of the tied embedding)."""
        masters = self._master_of[idx]
        if not self.cuda:
            with torch.no_grad():
                for k, g in named_grads.items():
                    p = masters[k]
                    if id(p) in self._touched:
                        p.grad.add_(g.float())
                    else:
                        p.grad.copy_(g)
                        self._touched.add(id(p))
            return
        dev = torch.device(self.device)
        # bound the GPU memory held by accumulations in flight (the chunks' bf16 grads stay
        # alive until the side stream has read them) to two chunks' worth
        while len(self._acc_pending) >= 2:
            t0 = time.perf_counter()
            self._acc_pending.pop(0).synchronize()
            self._grad_wait_s += time.perf_counter() - t0
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))
        s = self._acc_stream
        piece = self._ACC_PIECE
        with torch.no_grad(), torch.cuda.stream(s):
            s.wait_event(ready)
            for k, g in named_grads.items():
                p = masters[k]
                first = id(p) not in self._touched
                self._touched.add(id(p))
                gf, hf = g.detach().reshape(-1), p.grad.view(-1)
                # in pieces, so the fp32 scratch on the GPU stays small (the tied embedding alone
                # is 0.3 GB in fp32); allocations on the side stream are reused stream-ordered
                for a in range(0, gf.numel(), piece):
                    b = min(a + piece, gf.numel())
                    nb = (b - a) * 4
                    if first:
                        buf = gf[a:b].float()
                    else:
                        buf = torch.empty(b - a, dtype=torch.float32, device=dev)
                        # counted, not timed: these overlap the weight loads on ramtorch's stream, so
                        # summed event times would double-count and understate the link's rate
                        buf.copy_(hf[a:b], non_blocking=True)
                        self._acc_h2d_bytes += nb
                        buf.add_(gf[a:b])
                    with self.d2h.span(s, nb):
                        hf[a:b].copy_(buf, non_blocking=True)
                g.record_stream(s)
            done = torch.cuda.Event()
            done.record(s)
        self._acc_pending.append(done)

    def _grad_worker(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                idx, grads, done, slot = job
                if done is not None:
                    done.synchronize()
                masters = self._master_of[idx]
                with torch.no_grad():
                    for k, g in grads.items():
                        p = masters[k]
                        if id(p) not in self._touched or p.grad is None:
                            if p.grad is None:
                                p.grad = torch.empty_like(p)
                            p.grad.copy_(g)
                            self._touched.add(id(p))
                        else:
                            p.grad.add_(g)
                if slot is not None:
                    self._free_slots.put(slot)
            except BaseException as e:  # noqa: BLE001 - surfaced on the compute thread
                self._worker_error = e
            finally:
                self._q.task_done()

    def _zero_grads(self) -> None:
        """Keep the fp32 grad buffers allocated: the next pass's first contribution to each
        master overwrites (copy_) instead of adding, so no 4 GB zero-fill or re-allocation."""
        self._touched.clear()

    def _before_optimizer(self) -> None:
        if self.grad_accum == "device" and self.cuda:
            t0 = time.perf_counter()
            self._acc_stream.synchronize()
            self._acc_pending.clear()
            self._grad_wait_s += time.perf_counter() - t0
        self._q.join()
        if self._worker_error is not None:
            raise RuntimeError("gradient worker failed") from self._worker_error
        self.h2d.harvest()
        self.d2h.harvest()

    @torch.no_grad()
    def _after_optimizer(self) -> None:
        """Refresh the pinned bf16 copies from the updated fp32 masters; drop stale GPU copies."""
        for st, masters in zip(self.om._state, self._master_of):
            for k, t in st.tensors.items():
                t.copy_(masters[k])
        self.om.invalidate_residency()

    # -- passes ---------------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = self.scaler.scale
        with self._autocast():
            res = self.om.step((x, y), loss_fn=lambda out, _t: out * scale)
        return res.output.detach().float()

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self._autocast():
            out = self.om((x, y))
        return float(out)

    def counters(self) -> dict[str, float]:
        out = super().counters()
        self.h2d.harvest()
        self.d2h.harvest()
        # all H2D bytes; the rate uses only the timed ones (the weight loads)
        out["h2d_bytes_total"] = self.h2d.bytes + getattr(self, "_acc_h2d_bytes", 0)
        out["h2d_timed_bytes_total"] = self.h2d.bytes
        out["d2h_bytes_total"] = self.d2h.bytes
        out["h2d_seconds_total"] = self.h2d.seconds
        out["d2h_seconds_total"] = self.d2h.seconds
        # compute-thread waits: for the loader to bring a chunk in, and for a free gradient
        # staging slot (the CPU worker's backlog); the panel shows their sum as "stall"
        out["stall_load_s_total"] = self.om.stats.get("acquire_wait_s", 0.0)
        out["stall_grad_s_total"] = self._grad_wait_s
        out["stall_s_total"] = out["stall_load_s_total"] + out["stall_grad_s_total"]
        out["pinned_b"] = sum(st.nbytes() for st in self.om._state) + len(self._slots) * self._slot_bytes
        if getattr(self, "_registered", False):  # grad_accum=device: the page-locked fp32 grads
            out["pinned_b"] += self._grad_flat.numel() * 4
        return out

    def close(self) -> None:
        self._q.put(None)
        self._worker.join(timeout=5)
        if getattr(self, "_registered", False):
            torch.cuda.synchronize(torch.device(self.device))
            torch.cuda.cudart().cudaHostUnregister(self._grad_flat.data_ptr())
            self._registered = False
        self.om.close()


