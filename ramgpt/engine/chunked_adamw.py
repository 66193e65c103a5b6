"""AdamW over the fp32 masters, one chunk at a time, in a background thread.

The streamed engine's optimizer step used to run after the last backward with the GPU idle: a
CPU foreach norm over 4.4 GB of gradients (0.53 s on the H200 machine's 16 cores), an unscale
pass, a clip pass, fused AdamW (0.26 s) and the refresh of the bf16 copies (0.11 s): 1.0-1.25 s
of a 5.5 s step. Now:

- the global gradient norm arrives with the gradients (the gradient path sums the squares of each
  tensor's final value as it is formed, on the GPU's side stream), so it is known when the last
  backward ends;
- unscale and clip are one factor that fused AdamW applies in its own loop (``grad_scale``), so
  no separate pass over the gradients;
- the update runs chunk by chunk in forward order in a worker thread; the next step's first
  forward loads chunk i (the GPU casts the fp32 masters to bf16 as they arrive, so there is no
  host copy to refresh) as soon as chunk i is ready (:meth:`wait_chunk`), so the optimizer
  overlaps that forward.

On CUDA part of the chunks can be updated by the GPU (``gpu_chunks``, ``runtime.optimizer_gpu_share``):
their fp32 masters, gradients and moments (all page-locked) stream through it in pieces, through
the same fused AdamW kernel on the GPU, and back, on two streams so copies in and out overlap. A
second worker thread does that beside the CPU's, so the update between steps takes less time.

Semantics are those of ``torch.optim.AdamW(fused=True)`` after ``clip_grad_norm_``: the same
kernel on the same state (kept in the one ``torch.optim.AdamW`` object, so its ``state_dict()``
and the checkpoint format are unchanged), with the clip and unscale factor applied inside the
kernel instead of by two passes before it (the results agree to float32 rounding).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ramgpt.engine import native
from ramgpt.engine import planes as pl
from ramgpt.engine.hostmem import FileArena, HostArena


def new_adamw_state(p: nn.Parameter, moments: FileArena | HostArena | None = None) -> dict[str, torch.Tensor]:
    """What ``torch.optim.AdamW(fused=True)`` creates for ``p`` on its first step: a float32 step
    counter and zero moments (in ``moments`` when given: a fresh memory-mapped file reads 0, a
    page-locked arena is zeroed)."""
    if moments is not None:
        avg, avg_sq = moments.take(p.shape, p.dtype), moments.take(p.shape, p.dtype)
        if isinstance(moments, HostArena):
            avg.zero_()
            avg_sq.zero_()
    else:
        avg = torch.zeros_like(p, memory_format=torch.preserve_format)
        avg_sq = torch.zeros_like(p, memory_format=torch.preserve_format)
    return {"step": torch.zeros((), dtype=torch.float32, device=p.device), "exp_avg": avg, "exp_avg_sq": avg_sq}


class ChunkedAdamW:
    PIECE = 4 * 2**20  # elements per GPU piece (16 MiB per tensor, 4 tensors, 2 streams: 128 MiB of VRAM)
    ORDERED = True  # the GPU's share queues behind the compute stream's work (docs/design.md, item 4)
    # chunks the GPU queues ahead of the one it waits for, so the copy engines do not drain between
    # chunks (0: each chunk waited for before the next is queued): with 1 its share ran 1.18x as fast
    # (H200, docs/benchmarks.md, round 8)
    LOOKAHEAD = 1
    TIMELINES: list | None = None  # a list (benchmarks): each update appends its per-chunk times

    def __init__(self, optimizer: torch.optim.AdamW, chunks: Sequence[Sequence[nn.Parameter]],
                 moments: FileArena | None = None, update: Sequence[int] | None = None,
                 gpu_chunks: Sequence[int] = (), device: str | None = None, gpu_moments: HostArena | None = None,
                 planes: pl.MasterPlanes | None = None):
        """``chunks[i]``: the parameters chunk ``i`` owns (each parameter in exactly one chunk).
        ``moments``: keep the AdamW moments in this memory-mapped file (the low-RAM mode): each
        chunk's are paged in ahead of its update and handed back to the OS right after.
        ``gpu_chunks``: the chunks the GPU ``device`` updates; their parameters' moments go to
        ``gpu_moments`` (page-locked; the masters and gradients must be page-locked too).
        ``planes``: the masters are split into 16-bit planes (:mod:`.planes`): each piece is joined
        into fp32 scratch, updated by the same kernel, and split back (the same fp32 arithmetic)."""
        self.opt = optimizer
        self.planes = planes
        self._cpu_scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.native = True  # the CPU's split masters through native.load()'s kernel where there is one
        self.moments = moments
        # the chunks this process updates (several GPUs: the ones it owns; else all)
        self.update = set(range(len(chunks))) if update is None else set(update)
        self.chunks = [list(c) for c in chunks]
        self.group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        owned = [id(p) for c in self.chunks for p in c]
        if sorted(owned) != sorted(self.group_of) or len(set(owned)) != len(owned):
            raise ValueError("every optimizer parameter must belong to exactly one chunk")
        self.gpu_chunks = set(gpu_chunks) & self.update
        self.gpu_moments = gpu_moments
        self.gpu_moments_ready = threading.Event()  # set by whoever provides gpu_moments
        if gpu_moments is not None or not self.gpu_chunks:
            self.gpu_moments_ready.set()
        self._gpu_params = {id(p) for i in self.gpu_chunks for p in self.chunks[i]}
        self.device = torch.device(device) if device is not None else None
        self._gpu: dict | None = None  # streams and scratch, made by the GPU worker on first use
        self.ready = [threading.Event() for _ in self.chunks]
        for e in self.ready:
            e.set()
        self._thread: threading.Thread | None = None
        self._gpu_thread: threading.Thread | None = None
        self._t0, self._ends = 0.0, []
        self.timeline: list[tuple[str, int, float, float]] = []  # the last update's (side, chunk, began, done)
        self._waits: list[tuple[int, float, float]] = []  # the loads that waited for it: (chunk, from, to)
        self.error: BaseException | None = None
        self.work_s_total = 0.0  # time spent updating (hidden or not)
        self.last_work_s = 0.0

    # -- state -----------------------------------------------------------------------------------
    def _ensure_state(self, p: nn.Parameter) -> dict:
        st = self.opt.state[p]
        if not st:
            if id(p) in self._gpu_params:
                self.gpu_moments_ready.wait()
                st.update(new_adamw_state(p, self.gpu_moments))
            else:
                st.update(new_adamw_state(p, self.moments))
        return st

    def ensure_all_states(self, step_arena: FileArena | None = None) -> None:
        """Create every parameter's state now, in the optimizer's order (several GPUs: every rank
        lays out the node-shared moments file the same way; the step counters live there too)."""
        for g in self.opt.param_groups:
            for p in g["params"]:
                st = self._ensure_state(p)
                if step_arena is not None and not step_arena.contains(st["step"]):
                    st["step"] = step_arena.take((), torch.float32)  # a fresh file reads 0, as torch starts it

    def release(self, params: Sequence[nn.Parameter]) -> None:
        """Hand ``params``' moments back to the OS (low-RAM mode; a no-op otherwise)."""
        if self.moments is None:
            return
        for p in params:
            for k in ("exp_avg", "exp_avg_sq"):
                t = self.opt.state.get(p, {}).get(k)
                if t is not None:
                    self.moments.release(t)

    def _prefetch(self, i: int) -> None:
        if self.moments is None or i >= len(self.chunks):
            return
        for p in self.chunks[i]:
            st = self.opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    self.moments.prefetch(st[k])

    def _groups(self, i: int, lr: float) -> list[tuple[dict, list[nn.Parameter], list[dict]]]:
        """Chunk ``i``'s parameters that have gradients, per weight-decay group, with their AdamW
        states, the step counters advanced as torch's fused AdamW does before its kernel."""
        by_group: dict[int, list[nn.Parameter]] = {}
        for p in self.chunks[i]:
            if p.grad is not None:
                by_group.setdefault(id(self.group_of[id(p)]), []).append(p)
        out = []
        for ps in by_group.values():
            g = self.group_of[id(ps[0])]
            states = [self._ensure_state(p) for p in ps]
            torch._foreach_add_([s["step"] for s in states], 1)
            g["lr"] = lr
            out.append((g, ps, states))
        return out

    @torch.no_grad()
    def step_chunk_gpu(self, i: int, lr: float, grad_scale: float) -> list[torch.cuda.Event]:
        """Chunk ``i`` through the GPU: per piece, masters, gradients and moments H2D, fused AdamW
        there, masters and moments D2H; pieces alternate between two streams and scratch sets.
        Returns at once, with the events that complete when the host memory holds the result (the
        worker queues up to ``LOOKAHEAD`` more chunks behind this one before it waits for them).

        The scale and each step counter are written on this thread's current stream, the compute
        stream, and both streams wait for it per parameter: the update then fills the compute
        stream's gaps instead of running beside the forward. Run beside it (round 5, reverted),
        its H2D competed with that forward's loads for the link and more of the update was exposed
        (docs/benchmarks.md, round 5)."""
        dev = self.device
        if self._gpu is None:
            self._gpu = {
                "streams": [torch.cuda.Stream(dev), torch.cuda.Stream(dev)],
                "gs": torch.empty((), dtype=torch.float32, device=dev),
                "fi": torch.zeros((), dtype=torch.float32, device=dev),
            }
        g_ = self._gpu
        planes = self.planes
        if "bufs" not in g_:  # for this update only: the compute stream gets the memory back after it
            g_["bufs"] = [torch.empty(4, self.PIECE, dtype=torch.float32, device=dev) for _ in range(2)]
            if planes is not None:  # the two planes of a piece of masters
                g_["bufs16"] = [torch.empty(2, self.PIECE, dtype=torch.int16, device=dev) for _ in range(2)]
            for s in g_["streams"]:  # the memory may have been freed by work the compute stream still has queued
                s.wait_stream(torch.cuda.current_stream(dev))
        streams, bufs = g_["streams"], g_["bufs"]
        # ORDERED: the small writes go on the compute stream (the update fills its gaps); else on the
        # first update stream, and nothing orders the update behind the forward (an A/B knob)
        cur = torch.cuda.current_stream(dev) if self.ORDERED else streams[0]
        # (queued ahead, the previous chunk's kernels may still read it: the same value within an update)
        with torch.cuda.stream(cur):
            g_["gs"].fill_(grad_scale)
        for s in streams:
            s.wait_stream(cur)  # the scale is written
        k = 0
        for g, ps, states in self._groups(i, lr):
            beta1, beta2 = g["betas"]
            for p, st in zip(ps, states):
                with torch.cuda.stream(cur):
                    step_d = torch.full((), float(st["step"]), dtype=torch.float32, device=dev)
                split = planes is not None and p in planes
                master = None if split else p.data.view(-1)
                host = [master, p.grad.view(-1), st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)]
                for s in streams:
                    s.wait_stream(cur)  # step_d is written
                n = p.numel()
                for a in range(0, n, self.PIECE):
                    b = min(a + self.PIECE, n)
                    stream, buf = streams[k % 2], bufs[k % 2]
                    halves = g_["bufs16"][k % 2] if split else None
                    k += 1
                    with torch.cuda.stream(stream):
                        d = [buf[j, : b - a] for j in range(4)]
                        if split:  # the two planes in, joined into the fp32 master there
                            hi, lo = halves[0, : b - a], halves[1, : b - a]
                            hi.copy_(planes.hi(p)[a:b], non_blocking=True)
                            lo.copy_(planes.lo(p)[a:b], non_blocking=True)
                            pl.join(hi, lo, d[0])
                        for j in range(0 if master is not None else 1, 4):
                            d[j].copy_(host[j][a:b], non_blocking=True)
                        torch._fused_adamw_(
                            [d[0]], [d[1]], [d[2]], [d[3]], [], [step_d], amsgrad=False, lr=lr, beta1=beta1,
                            beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                            grad_scale=g_["gs"], found_inf=g_["fi"],
                        )
                        if split:  # the gradient's buffer is free now: the split's scratch
                            pl.split(d[0], hi, lo, d[1].view(torch.int32))
                            planes.hi(p)[a:b].copy_(hi, non_blocking=True)
                            planes.lo(p)[a:b].copy_(lo, non_blocking=True)
                        for j in ((2, 3) if split else (0, 2, 3)):
                            host[j][a:b].copy_(d[j], non_blocking=True)
                step_d.record_stream(streams[0])
                step_d.record_stream(streams[1])
        done = []
        for s in streams:
            ev = torch.cuda.Event()
            ev.record(s)
            done.append(ev)
        return done

    @torch.no_grad()
    def step_chunk(self, i: int, lr: float, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """``torch._fused_adamw_`` on chunk ``i``'s parameters, per weight-decay group."""
        self._prefetch(i + 1)  # the OS reads the next chunk's moments while this one updates
        for g, ps, states in self._groups(i, lr):
            beta1, beta2 = g["betas"]
            if self.planes is not None and any(p in self.planes for p in ps):
                if not all(p in self.planes for p in ps):  # a split master's Parameter has no storage to update
                    raise RuntimeError(f"chunk {i} mixes split and whole masters in one parameter group")
                self._step_split(g, ps, states, lr, grad_scale, found_inf)
                continue
            torch._fused_adamw_(
                ps, [p.grad for p in ps], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                [s["step"] for s in states], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                weight_decay=g["weight_decay"], eps=g["eps"], maximize=False, grad_scale=grad_scale,
                found_inf=found_inf,
            )
        self.release(self.chunks[i])

    def _step_split(self, g: dict, ps: list[nn.Parameter], states: list[dict], lr: float,
                    grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Fused AdamW over split masters on the CPU: with :attr:`native`, the C kernel of
        :mod:`.native` where it loads (one pass; torch's bits, checked); else pieces of at most ``planes.PIECE`` elements
        (cut at multiples of it within a tensor, several small tensors to a call) are joined into
        fp32 scratch, updated there by the one kernel, and split back; the scratch stays in cache."""
        planes = self.planes
        kernel = native.load() if self.native else None
        if kernel is not None:  # join, update and split in one pass (csrc/adamw_planes.c)
            if float(found_inf) == 1.0:  # as torch's kernel: no update (the counters have moved)
                return
            beta1, beta2 = g["betas"]
            kernel.step([(planes.hi(p), planes.lo(p), p.grad.view(-1), st["exp_avg"].view(-1),
                          st["exp_avg_sq"].view(-1), st["step"]) for p, st in zip(ps, states)],
                        lr=lr, beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"],
                        grad_scale=grad_scale)
            return
        if self._cpu_scratch is None:
            self._cpu_scratch = (torch.empty(pl.PIECE, dtype=torch.float32), torch.empty(pl.PIECE, dtype=torch.int32))
        buf, tmp = self._cpu_scratch
        beta1, beta2 = g["betas"]
        batch: list[tuple[nn.Parameter, int, int, dict]] = []

        def flush() -> None:
            views, off = [], 0
            for p, a, b, _ in batch:
                views.append(buf[off : off + b - a])
                off += b - a
                pl.join(planes.hi(p)[a:b], planes.lo(p)[a:b], views[-1])
            torch._fused_adamw_(
                views, [p.grad.view(-1)[a:b] for p, a, b, _ in batch],
                [st["exp_avg"].view(-1)[a:b] for _, a, b, st in batch],
                [st["exp_avg_sq"].view(-1)[a:b] for _, a, b, st in batch], [], [st["step"] for *_, st in batch],
                amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"],
                maximize=False, grad_scale=grad_scale, found_inf=found_inf,
            )
            for (p, a, b, _), v in zip(batch, views):
                pl.split(v, planes.hi(p)[a:b], planes.lo(p)[a:b], tmp[: b - a])
            batch.clear()

        used = 0
        for p, st in zip(ps, states):
            n = p.numel()
            for a in range(0, n, pl.PIECE):
                b = min(a + pl.PIECE, n)
                if used + b - a > pl.PIECE:
                    flush()
                    used = 0
                batch.append((p, a, b, st))
                used += b - a
        if batch:
            flush()

    # -- the background job ----------------------------------------------------------------------
    def start(self, lr: float, grad_scale: float, after_chunk: Callable[[int], None],
              before_chunk: Callable[[int], None] | None = None) -> None:
        """Update every chunk in order in a worker thread: ``before_chunk(i)`` (wait for whatever
        must finish first, e.g. a checkpoint write), the update, then ``after_chunk(i)`` (refresh
        the chunk's compute copy); chunk i is then :meth:`ready`."""
        self.wait_all()
        t0 = time.perf_counter()
        timeline: list[tuple[str, int, float, float]] = []  # (side, chunk, began, done) since t0
        self.timeline, self._waits, self._t0 = timeline, [], t0  # before a loader can wait on this update
        for e in self.ready:
            e.clear()
        gs = torch.tensor(grad_scale, dtype=torch.float32)
        fi = torch.zeros((), dtype=torch.float32)
        ends: list[float] = []
        on_gpu = sorted(self.gpu_chunks)
        on_cpu = [i for i in range(len(self.chunks)) if i not in self.gpu_chunks]

        if self.TIMELINES is not None:
            self.TIMELINES.append({"chunks": timeline, "waits": self._waits, "t0": t0,
                                   "sizes": [sum(p.numel() for p in c) for c in self.chunks]})

        def run(mine: list[int], gpu: bool) -> None:
            side = "gpu" if gpu else "cpu"
            queued: list[tuple[int, float, list]] = []  # the GPU's chunks in flight, oldest first

            def finish(j: int, began: float, events: list) -> None:
                for ev in events:
                    ev.synchronize()
                after_chunk(j)
                timeline.append((side, j, began, time.perf_counter() - t0))
                self.ready[j].set()

            try:
                if gpu:
                    torch.cuda.set_device(self.device)
                for i in mine:
                    if i not in self.update:
                        self.ready[i].set()
                        continue
                    while queued and all(ev.query() for ev in queued[0][2]):
                        finish(*queued.pop(0))  # done already: ready before a gate below can hold it up
                    if before_chunk is not None:
                        before_chunk(i)
                    began = time.perf_counter() - t0
                    if gpu:  # queued; finished once more than LOOKAHEAD chunks are in flight behind it
                        queued.append((i, began, self.step_chunk_gpu(i, lr, grad_scale)))
                        if len(queued) > self.LOOKAHEAD:
                            finish(*queued.pop(0))
                    else:
                        self.step_chunk(i, lr, gs, fi)
                        finish(i, began, [])
                while queued:
                    finish(*queued.pop(0))
            except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
                self.error = e
                for ev in self.ready:  # never leave a waiter hanging
                    ev.set()
            finally:
                ends.append(time.perf_counter())
                if gpu and self._gpu is not None:
                    try:
                        for stream in self._gpu["streams"]:  # (after an error a piece may still be in flight)
                            stream.synchronize()
                    except RuntimeError as e:  # a CUDA error that persists: keep the first one
                        self.error = self.error or e
                    self._gpu.pop("bufs", None)  # every piece is done (or the device has failed)
                    self._gpu.pop("bufs16", None)

        self._thread = threading.Thread(target=run, args=(on_cpu, False), name="ramgpt-adamw", daemon=True)
        self._gpu_thread = (threading.Thread(target=run, args=(on_gpu, True), name="ramgpt-adamw-gpu", daemon=True)
                            if on_gpu else None)
        self._ends = ends
        self._thread.start()
        if self._gpu_thread is not None:
            self._gpu_thread.start()

    def running(self) -> bool:
        return any(t is not None and t.is_alive() for t in (self._thread, self._gpu_thread))

    def wait_chunk(self, i: int) -> None:
        if not self.ready[i].is_set():
            t = time.perf_counter()
            self.ready[i].wait()
            self._waits.append((i, t - self._t0, time.perf_counter() - self._t0))
        self._raise()

    def wait_all(self) -> None:
        if self._thread is not None:
            for t in (self._thread, self._gpu_thread):
                if t is not None:
                    t.join()
            self._thread = self._gpu_thread = None
            self.last_work_s = max(self._ends, default=self._t0) - self._t0  # start to the last chunk's end
            self.work_s_total += self.last_work_s
        self._raise()

    def raise_error(self) -> None:
        """Raise on the caller's thread if the update failed (for waiters that poll)."""
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError("the optimizer step failed") from err
