"""Execution engines: the only module that imports ramtorch.

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
import math
import queue
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ramgpt.model import GPT
from ramgpt.placement import resolve_grad_accum

# ------------------------------------------------------------------------------------------------
# shared pieces


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def apply_vram_budget(device: str, budget_gib: float | None) -> int | None:
    """Cap this process's CUDA caching allocator at ``budget_gib`` (honoured on any card).

    Returns the budget in bytes, or None when there is no budget or no CUDA device."""
    if budget_gib is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    budget = int(budget_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), idx)
    return min(budget, total)


@dataclass
class StepReport:
    grad_norm: float
    skipped: bool  # non-finite gradients: no update was applied
    optimizer_time_s: float
    loss_scale: float


class _LossScaler:
    """Dynamic loss scaling for fp16 (a grad scaler); a fixed 1.0 otherwise."""

    def __init__(self, enabled: bool, init: float = 2.0**16, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = init if enabled else 1.0
        self.growth_interval = growth_interval
        self._good = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self._good = 0
        else:
            self._good += 1
            if self._good % self.growth_interval == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good": self._good}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.scale = float(d.get("scale", self.scale))
        self._good = int(d.get("good", 0))


def _unscale_clip_(params: list[nn.Parameter], factor: float, clip: float) -> float:
    """grads *= factor, then clip the global norm; returns the pre-clip norm (inf/nan if bad)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    torch._foreach_mul_(grads, factor)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True)
    return float(norm)


def _make_optimizer(model: GPT, lr: float, wd: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    # fused=True: one kernel over all params, on CUDA and (since torch 2.4) on the CPU
    return torch.optim.AdamW(model.param_groups(wd), lr=lr, betas=betas, eps=eps, fused=True)


def _release_freed_heap() -> None:
    """glibc keeps large freed blocks in the heap; malloc_trim returns them (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _consume_cuda_error(device: str) -> None:
    """A failed CUDA runtime call (cudaHostRegister) stays the runtime's "last error", which the
    launch check of the next kernel would raise as its own. torch exposes no cudaGetLastError, so
    launch a tiny kernel and let its check consume the stale error."""
    for _ in range(2):
        try:
            torch.ones(1, device=device).add_(1)
            return
        except RuntimeError:
            continue


def _aligned(nbytes: int, align: int = 64) -> int:
    return -(-nbytes // align) * align


class Engine:
    """Common optimizer-side logic; subclasses provide the passes."""

    name = "base"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, vram_budget_b: int | None):
        self.model = model
        self.device = device
        self.precision = precision
        self.compute_dtype = _DTYPES[precision]
        self.cfg = optim_cfg
        self.vram_budget_b = vram_budget_b
        self.scaler = _LossScaler(enabled=precision == "fp16")
        self.params = [p for g in model.param_groups(0.0) for p in g["params"]]
        self.optimizer: torch.optim.AdamW  # set by subclasses once masters are placed

    # -- autocast -------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.compute_dtype)

    # -- API --------------------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError

    def _before_optimizer(self) -> None:
        """Wait for gradients still in flight (streamed engine)."""

    def _after_optimizer(self) -> None:
        """Propagate updated masters to wherever compute reads them (streamed engine)."""

    def _zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, lr: float, n_tokens: int) -> StepReport:
        """Mean-over-tokens gradients, clip, AdamW at ``lr``, zero grads. Skips the update
        (and lowers the fp16 loss scale) when the gradients are not finite."""
        self._before_optimizer()
        t0 = time.perf_counter()
        norm = _unscale_clip_(self.params, 1.0 / (self.scaler.scale * max(n_tokens, 1)), self.cfg.grad_clip)
        finite = math.isfinite(norm)
        if finite:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
        self.scaler.update(finite)
        self._zero_grads()
        self._after_optimizer()
        return StepReport(norm, not finite, time.perf_counter() - t0, self.scaler.scale)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            out["vram_allocated_b"] = torch.cuda.memory_allocated(self.device)
            out["vram_reserved_b"] = torch.cuda.memory_reserved(self.device)
            out["vram_peak_reserved_b"] = torch.cuda.max_memory_reserved(self.device)
            if self.vram_budget_b:
                out["vram_budget_b"] = self.vram_budget_b
        return out

    def state_dict(self) -> dict[str, Any]:
        """Model masters (fp32, CPU tensors, tied weights once via the model's own dict)."""
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}

    def load_model_state(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            # the tied head weight may be stored once under the embedding's name
            missing = [m for m in missing if not (m == "head.lm_head.weight" and self.model.cfg.tie_embeddings)]
            if missing or unexpected:
                raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self._after_optimizer()

    def optimizer_state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_optimizer_state_dict(self, d: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(d["optimizer"])
        if "scaler" in d:
            self.scaler.load_state_dict(d["scaler"])

    @property
    def seqs_per_pass(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# resident


class ResidentEngine(Engine):
    name = "resident"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, micro_batch_size: int,
                 gradient_checkpointing: bool, vram_budget_b: int | None = None):
        super().__init__(model, device=device, precision=precision, optim_cfg=optim_cfg, vram_budget_b=vram_budget_b)
        self.model.to(device)
        self.model.gradient_checkpointing = gradient_checkpointing
        self._mb = micro_batch_size
        self.optimizer = _make_optimizer(model, optim_cfg.lr, optim_cfg.weight_decay,
                                         (optim_cfg.beta1, optim_cfg.beta2), optim_cfg.eps)

    @property
    def seqs_per_pass(self) -> int:
        return self._mb

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.train()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with self._autocast():
            loss_sum = self.model(x, y)
        (loss_sum * self.scaler.scale).backward()
        return loss_sum.detach()

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        with self._autocast():
            out = self.model(x.to(self.device), y.to(self.device))
        self.model.train()
        return float(out)


# ------------------------------------------------------------------------------------------------
# streamed


def _offload_cls():
    import ramtorch

    class _GradTapOffloadModel(ramtorch.OffloadModel):
        """OffloadModel whose per-chunk gradient hook hands grads to ramgpt (see module doc).

        ``_accumulate`` and ``_materialize`` are ramtorch 1.11 internals (pinned in
        pyproject); the subclass only observes/redirects them."""

        grad_sink = None  # callable(chunk_idx, named_grads)
        load_observer = None  # callable(state) -> context manager around a chunk load

        def _accumulate(self, state, named_grads):  # noqa: D401
            if named_grads:
                self.grad_sink(state.idx, named_grads)

        def _materialize(self, state):
            obs = self.load_observer
            if obs is None:
                return super()._materialize(state)
            with obs(state):
                return super()._materialize(state)

    return _GradTapOffloadModel


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
        self.optimizer = _make_optimizer(model, optim_cfg.lr, optim_cfg.weight_decay,
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
        cls = _offload_cls()
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
        self._slot_bytes = max(sum(_aligned(p.numel() * p.element_size()) for p in c.parameters()) for c in copies)
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
        _release_freed_heap()  # the fp32 deep copies were freed after pinning; give them back to the OS

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
            off += _aligned(nb)
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
        sizes = [_aligned(p.numel() * 4) // 4 for p in params]
        self._grad_flat = torch.zeros(sum(sizes), dtype=torch.float32)  # no garbage for a param without grads
        self._registered = False
        if self.cuda:
            rc = torch.cuda.cudart().cudaHostRegister(self._grad_flat.data_ptr(), self._grad_flat.numel() * 4, 0)
            self._registered = int(rc) == 0
            if not self._registered:
                # e.g. a locked-memory limit (WSL2, containers): unpinned copies would be synchronous,
                # so the CPU worker is faster; the grads stay in the flat buffer either way
                _consume_cuda_error(self.device)
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


# ------------------------------------------------------------------------------------------------
# streamed inference (generate with weights that do not fit the VRAM budget)


class _InferEmbed(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed
        self.pos_offset = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(idx, None, pos_offset=self.pos_offset)
        return x


class _InferBlock(nn.Module):
    """A block that keeps its KV cache as plain state: ramtorch swaps the streamed weights in with
    functional_call, and the cache (activations, not weights) stays on the GPU between calls."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, self.cache = self.block.forward_cached(x, self.cache)
        return x


class _InferHead(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.logits(x[:, -1:, :])[:, -1, :].float()  # (B, V) logits of the last position


class StreamedInferenceModel:
    """``GPT.forward_logits`` with the weights streamed from pinned CPU RAM through a GPU window
    (ramtorch ``OffloadModel.forward``), for checkpoints that do not fit the VRAM budget. Same
    interface as ``GPT`` for ``ramgpt.generate``: ``.cfg`` and
    ``forward_logits(idx, kv_caches, pos_offset) -> (logits, caches)``."""

    def __init__(self, model: GPT, *, device: str, dtype: torch.dtype, window: int = 3):
        import ramtorch

        self.cfg = model.cfg
        self.device = device
        self._embed = _InferEmbed(copy.deepcopy(model.embed).to(dtype))
        self._blocks = [_InferBlock(copy.deepcopy(b).to(dtype)) for b in model.h]
        self._head = _InferHead(copy.deepcopy(model.head).to(dtype))
        self.om = ramtorch.OffloadModel([self._embed, *self._blocks, self._head], device=device, window=window)
        _release_freed_heap()

    def eval(self) -> StreamedInferenceModel:
        self.om.eval()
        return self

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor, kv_caches: list | None = None, pos_offset: int = 0):
        for i, blk in enumerate(self._blocks):
            blk.cache = None if kv_caches is None else kv_caches[i]
        self._embed.pos_offset = pos_offset
        logits = self.om(idx)
        return logits, [blk.cache for blk in self._blocks]

    def close(self) -> None:
        self.om.close()


# ------------------------------------------------------------------------------------------------
# construction


def build_engine(profile, model: GPT, device: str, precision: str, *, engine: str | None = None,
                 seqs_per_pass: int | None = None) -> Engine:
    """Build the engine the profile asks for (``auto`` decides from the VRAM budget)."""
    rt = profile.runtime
    budget_b = apply_vram_budget(device, rt.vram_budget_gib)
    kind = engine or rt.engine
    if kind == "auto":
        kind = "resident"
        if device.startswith("cuda"):
            from ramgpt.memory import choose_engine

            vram = budget_b or torch.cuda.mem_get_info(torch.device(device))[0]
            kind = choose_engine(profile, vram)
    if kind == "streamed":
        spp = seqs_per_pass or rt.seqs_per_pass
        if spp is None:
            if device.startswith("cuda"):
                from ramgpt.memory import max_seqs_per_pass

                vram = budget_b or torch.cuda.mem_get_info(torch.device(device))[0]
                spp = max(1, max_seqs_per_pass(profile, vram))
            else:
                spp = profile.optim.micro_batch_size
        spp = min(spp, profile.optim.seqs_per_step)
        return StreamedEngine(model, device=device, precision=precision, optim_cfg=profile.optim,
                              seqs_per_pass=spp, window=rt.stream_window, pin=rt.stream_pin,
                              vram_budget_b=budget_b, grad_accum=resolve_grad_accum(rt.grad_accum, device))
    return ResidentEngine(model, device=device, precision=precision, optim_cfg=profile.optim,
                          micro_batch_size=seqs_per_pass or profile.optim.micro_batch_size,
                          gradient_checkpointing=rt.gradient_checkpointing and device != "cpu",
                          vram_budget_b=budget_b)
