"""Where each weight pass's gradients go: into fp32 accumulators in CPU RAM (the ``.grad`` of the
fp32 masters), summed over the passes of an optimizer step.

Two paths (``runtime.grad_accum``):

- :class:`DeviceGradPath` (``device``, the default on CUDA): the accumulators are one flat host
  buffer, page-locked once. After chunk i's backward, an accumulation thread queues on a side
  stream: H2D of the running sum, add the pass's bf16 gradients on the GPU, D2H back, in 64 MiB
  pieces. The compute thread only records an event and hands the chunk over (on the H200 the
  issuing alone cost ~3 ms of compute-thread time per chunk: 100 ms of GPU idle per pass).
- :class:`HostGradPath` (``host``): the bf16 gradients go D2H into a ring of pinned staging slots
  and a CPU worker adds them (least VRAM; 0.69 s per 1b pass of CPU adds).

Both sum the squares of every tensor's *final* value for the step as it is formed (the last pass
is announced; a tensor's final contribution is at the lowest chunk it appears in, since backward
runs from the last chunk down: the tied embedding's at chunk 0), so the global gradient norm is
known when the last backward ends, with no pass of its own over the 4.4 GB of gradients.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ramgpt.engine.hostmem import aligned, register, unregister


class _GradPathBase:
    def __init__(self, params: list[nn.Parameter], master_of: list[dict[str, nn.Parameter]], device: str,
                 d2h_clock: Any, comm: Any = None, owner_of: dict[int, int] | None = None):
        self.comm = comm  # several GPUs (ramgpt.dist.Comm): sums go to each tensor's owner rank
        self.owner_of = owner_of or {}
        self.me = comm.ctx.local_rank if comm is not None else 0
        self.comm_s = 0.0  # time in collectives (NCCL or gloo), for the metrics
        self.params = params
        self.master_of = master_of
        self.device = device
        self.cuda = device.startswith("cuda")
        self.d2h = d2h_clock
        self.touched: set[int] = set()
        self.wait_s = 0.0  # compute-thread time spent waiting for this path (a "grad" stall)
        # per chunk: the params whose last contribution in a pass is this chunk's backward
        lowest: dict[int, int] = {}
        for idx in range(len(master_of) - 1, -1, -1):
            for p in master_of[idx].values():
                lowest[id(p)] = idx
        self.final_at = [{id(p) for p in m.values() if lowest[id(p)] == idx} for idx, m in enumerate(master_of)]
        self.last_pass = False
        self._sq_host = torch.zeros((), dtype=torch.float64)
        self._sq_dev: torch.Tensor | None = None

    def start_pass(self, last: bool) -> None:
        self.last_pass = last

    def sq_norm(self) -> float:
        """Sum of squares of the step's final gradients (valid after :meth:`drain` of the last pass)."""
        total = float(self._sq_host)
        if self._sq_dev is not None:
            total += float(self._sq_dev)
        return total

    def zero(self) -> None:
        """Keep the fp32 buffers: the next step's first contribution to each master overwrites
        (copy_) instead of adding, so no 4 GB zero-fill."""
        self.touched.clear()
        self._sq_host.zero_()
        if self._sq_dev is not None:
            self._sq_dev.zero_()

    def zero_untouched(self) -> None:
        """A parameter that got no gradient this step must not step on last step's."""
        for p in self.params:
            if id(p) not in self.touched and p.grad is not None:
                p.grad.zero_()

    def _mine(self, p: nn.Parameter) -> bool:
        return self.owner_of.get(id(p), self.me) == self.me

    def _add_on_cpu(self, idx: int, grads: dict[str, torch.Tensor], last_pass: bool) -> None:
        """Sum into the fp32 masters' grads on the CPU (and the final tensors' squares). With
        several ranks, each tensor is first summed over the ranks onto its owner (gloo)."""
        masters = self.master_of[idx]
        with torch.no_grad():
            for k, g in grads.items():
                p = masters[k]
                if self.comm is not None:
                    g = g.float().clone()  # the collective sums in place, in fp32
                    t0 = time.perf_counter()
                    self.comm.reduce_to(g, self.owner_of[id(p)])
                    self.comm_s += time.perf_counter() - t0
                    if not self._mine(p):
                        continue
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                if id(p) not in self.touched:
                    p.grad.copy_(g)
                    self.touched.add(id(p))
                else:
                    p.grad.add_(g)
                if last_pass and id(p) in self.final_at[idx]:
                    self._sq_host += torch.linalg.vector_norm(p.grad, dtype=torch.float64) ** 2


class HostGradPath(_GradPathBase):
    """D2H into pinned staging slots; a CPU worker adds (FIFO, so tied-weight sums are race-free).
    A ring of slots instead of a buffer per chunk keeps pinned RAM at a few chunks' worth."""

    def __init__(self, params, master_of, device, d2h_clock, slot_bytes: int, n_slots: int):
        super().__init__(params, master_of, device, d2h_clock)
        self._stream = torch.cuda.Stream(torch.device(device)) if self.cuda else None
        self._slot_bytes = slot_bytes
        self._slots: list[torch.Tensor] = []
        self._free: queue.Queue = queue.Queue()
        self._n_slots = n_slots
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="ramgpt-grad-accum", daemon=True)
        self._worker.start()

    @property
    def pinned_b(self) -> int:
        return len(self._slots) * self._slot_bytes

    def _take_slot(self) -> int:
        if self._free.empty() and len(self._slots) < self._n_slots:
            self._slots.append(torch.empty(self._slot_bytes, dtype=torch.uint8, pin_memory=True))
            return len(self._slots) - 1
        t0 = time.perf_counter()
        slot = self._free.get()  # the worker has consumed this slot's previous grads
        self.wait_s += time.perf_counter() - t0
        return slot

    def on_grads(self, idx: int, named_grads: dict[str, torch.Tensor]) -> None:
        """Compute thread, right after chunk ``idx``'s backward."""
        if self._error is not None:
            raise RuntimeError("gradient worker failed") from self._error
        if not self.cuda:
            self._q.put((idx, {k: g.detach() for k, g in named_grads.items()}, None, None, self.last_pass))
            return
        slot = self._take_slot()
        buf = self._slots[slot]
        stage: dict[str, torch.Tensor] = {}
        off = 0
        for k, g in named_grads.items():
            nb = g.numel() * g.element_size()
            stage[k] = buf[off : off + nb].view(g.dtype).view(g.shape)
            off += aligned(nb)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(torch.device(self.device)))
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            with self.d2h.span(self._stream, off):
                for k, g in named_grads.items():
                    stage[k].copy_(g.detach(), non_blocking=True)
                    g.record_stream(self._stream)
            done = torch.cuda.Event()
            done.record(self._stream)
        # the pass flag travels with the job: the worker may run a pass behind the compute thread
        self._q.put((idx, stage, done, slot, self.last_pass))

    def _work(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                idx, grads, done, slot, last_pass = job
                if done is not None:
                    done.synchronize()
                self._add_on_cpu(idx, grads, last_pass)
                if slot is not None:
                    self._free.put(slot)
            except BaseException as e:  # noqa: BLE001 - surfaced on the compute thread
                self._error = e
            finally:
                self._q.task_done()

    def drain(self) -> None:
        t0 = time.perf_counter()
        self._q.join()
        self.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise RuntimeError("gradient worker failed") from self._error

    def close(self) -> None:
        self._q.put(None)
        self._worker.join(timeout=5)


class DeviceGradPath(_GradPathBase):
    """fp32 accumulators in one page-locked host buffer, summed on the GPU by a side stream."""

    PIECE = 16 * 2**20  # elements per GPU scratch piece (64 MiB of fp32)
    IN_FLIGHT = 2  # chunks whose bf16 grads may wait for the side stream (bounds their VRAM)

    def __init__(self, params, master_of, device, d2h_clock, chunk_order: Sequence[Sequence[nn.Parameter]],
                 comm: Any = None, owner_of: dict[int, int] | None = None):
        """``chunk_order``: the chunks whose accumulators this process keeps (several GPUs: the
        chunks it owns), each parameter once."""
        super().__init__(params, master_of, device, d2h_clock, comm, owner_of)
        # the flat buffer in chunk order (each parameter once, where its chunk owns it), so a
        # chunk's accumulators are neighbours in memory
        order = [p for c in chunk_order for p in c]
        sizes = [aligned(p.numel() * 4) // 4 for p in order]
        self.flat = torch.zeros(sum(sizes), dtype=torch.float32)  # no garbage for a param without grads
        self.registered = register(self.flat, device) if self.cuda else False
        self.fallback = self.cuda and not self.registered
        if self.fallback:
            warnings.warn(f"could not page-lock {self.flat.numel() * 4 / 2**30:.1f} GiB for gradient accumulation "
                          "on the GPU; summing gradients on the CPU instead (runtime.grad_accum=host)",
                          RuntimeWarning, stacklevel=3)
        off = 0
        for p, n in zip(order, sizes):
            p.grad = self.flat[off : off + p.numel()].view_as(p)
            off += n
        self.h2d_bytes = 0  # H2D bytes of the running sums (counted, not timed: they overlap weight loads)
        self._run_cache: dict[tuple, list[tuple[int, int, list[str]]]] = {}
        self.nccl = type(d2h_clock)(self.cuda)  # time the collectives take on the side stream
        if self.cuda and self.registered:
            dev = torch.device(device)
            self._stream = torch.cuda.Stream(dev)
            self._sq_dev = torch.zeros((), dtype=torch.float64, device=dev)
            self._slots = threading.Semaphore(self.IN_FLIGHT)
            self._q: queue.Queue = queue.Queue()
            self._error: BaseException | None = None
            self._worker = threading.Thread(target=self._work, name="ramgpt-grad-sum", daemon=True)
            self._worker.start()

    @property
    def on_gpu(self) -> bool:
        return self.cuda and self.registered

    @property
    def pinned_b(self) -> int:
        return self.flat.numel() * 4 if self.registered else 0

    def on_grads(self, idx: int, named_grads: dict[str, torch.Tensor]) -> None:
        """Compute thread: mark where the grads are ready and hand them to the worker."""
        if not self.on_gpu:  # the CPU engine (tests) or no page-locking: add on the CPU right here
            if self.cuda:
                named_grads = {k: g.detach().float().cpu() for k, g in named_grads.items()}
            self._add_on_cpu(idx, named_grads, self.last_pass)
            return
        if self._error is not None:
            raise RuntimeError("gradient accumulation failed") from self._error
        t0 = time.perf_counter()
        while not self._slots.acquire(timeout=1.0):
            if self._error is not None:
                raise RuntimeError("gradient accumulation failed") from self._error
        self.wait_s += time.perf_counter() - t0
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(torch.device(self.device)))
        # the queue holds the grad tensors alive until the worker has recorded them on its stream
        self._q.put((idx, {k: g.detach() for k, g in named_grads.items()}, ready, self.last_pass))

    def _work(self) -> None:
        """Issue each chunk's sums; release a slot once the chunk queued behind it is issued and
        its own copies are done. Never dies: after an error it keeps taking jobs (releasing their
        slots), so neither the compute thread nor :meth:`drain` can hang; the error is raised there."""
        pending: list[torch.cuda.Event] = []
        try:
            torch.cuda.set_device(torch.device(self.device))
        except BaseException as e:  # noqa: BLE001 - surfaced on the compute thread
            self._error = e
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                if job == "drain" or self._error is not None:
                    for ev in pending:
                        if self._error is None:
                            ev.synchronize()
                        self._slots.release()
                    pending.clear()
                    if job != "drain":
                        self._slots.release()  # this job's own slot: nothing was issued
                    continue
                pending.append(self._issue(*job))
                while len(pending) > 1:  # keep one chunk queued behind the one in flight
                    pending.pop(0).synchronize()
                    self._slots.release()
            except BaseException as e:  # noqa: BLE001 - surfaced on the compute thread
                self._error = e
                for _ in pending:
                    self._slots.release()
                pending.clear()
                if job not in (None, "drain"):
                    self._slots.release()
            finally:
                self._q.task_done()

    def _runs(self, idx: int, grads: dict[str, torch.Tensor]) -> list[tuple[int, int, list[str]]]:
        """Chunk ``idx``'s gradients whose accumulators lie back to back in :attr:`flat` (at most
        alignment padding between), grouped into runs of at most ``PIECE`` elements:
        ``(start, end, names)``. Tensors larger than a piece are left out (they go piece by piece)."""
        key = (idx, tuple(grads))
        cached = self._run_cache.get(key)
        if cached is not None:
            return cached
        base = self.flat.data_ptr()
        spans = sorted(((self.master_of[idx][k].grad.data_ptr() - base) // 4, k, g.numel()) for k, g in grads.items())
        runs: list[tuple[int, int, list[str]]] = []
        for off, k, n in spans:
            if n > self.PIECE:
                continue
            if runs and 0 <= off - runs[-1][1] < 16 and off + n - runs[-1][0] <= self.PIECE:
                runs[-1] = (runs[-1][0], off + n, [*runs[-1][2], k])
            else:
                runs.append((off, off + n, [k]))
        self._run_cache[key] = runs
        return runs

    def _issue_run(self, idx: int, run: tuple[int, int, list[str]], grads: dict[str, torch.Tensor],
                   last_pass: bool) -> bool:
        """Side stream: one run of a chunk's accumulators with a few calls instead of several per
        tensor (each Python call holds the GIL the compute thread needs to launch its kernels):
        one H2D of the running sums, one foreach add (or cast-copy in the step's first pass), one
        foreach norm of the final ones, one D2H. False (nothing issued) when the run's tensors are
        not all first or all later contributions (a tied weight another chunk contributed first)."""
        start, end, names = run
        masters = self.master_of[idx]
        params = [masters[k] for k in names]
        first = [id(p) not in self.touched for p in params]
        if any(first) and not all(first):
            return False
        self.touched.update(id(p) for p in params)
        host = self.flat[start:end]
        buf = torch.empty(end - start, dtype=torch.float32, device=torch.device(self.device))
        offs = [(p.grad.data_ptr() - self.flat.data_ptr()) // 4 - start for p in params]
        dst = [buf[o : o + p.numel()] for o, p in zip(offs, params)]
        src = [grads[k].reshape(-1) for k in names]
        if first[0]:
            torch._foreach_copy_(dst, src)
        else:
            buf.copy_(host, non_blocking=True)
            self.h2d_bytes += buf.numel() * 4
            torch._foreach_add_(dst, src)
        final = [d for d, p in zip(dst, params) if last_pass and id(p) in self.final_at[idx]]
        if final:
            self._sq_dev += torch.stack(torch._foreach_norm(final, 2, dtype=torch.float64)).square().sum()
        with self.d2h.span(self._stream, buf.numel() * 4):
            host.copy_(buf, non_blocking=True)
        return True

    @torch.no_grad()
    def _issue(self, idx: int, grads: dict[str, torch.Tensor], ready: torch.cuda.Event,
               last_pass: bool) -> torch.cuda.Event:
        """H2D the running sum, add, D2H, run by run (or piece by piece), on the side stream
        (ordered after the compute stream's backward of this chunk and after earlier chunks' sums:
        one stream)."""
        dev = torch.device(self.device)
        masters = self.master_of[idx]
        s = self._stream
        piece = self.PIECE
        with torch.cuda.stream(s):
            s.wait_event(ready)
            if self.comm is None:  # one process: whole runs of this chunk's accumulators at once
                done_names = set()
                for run in self._runs(idx, grads):
                    if self._issue_run(idx, run, grads, last_pass):
                        done_names.update(run[2])
                if done_names:
                    for g in grads.values():
                        g.record_stream(s)
                    grads = {k: g for k, g in grads.items() if k not in done_names}
            for k, g in grads.items():
                p = masters[k]
                mine = self._mine(p)
                first = id(p) not in self.touched
                if mine:
                    self.touched.add(id(p))
                final = last_pass and id(p) in self.final_at[idx]
                gf = g.reshape(-1)
                hf = p.grad.view(-1) if mine else None
                # in pieces, so the fp32 scratch on the GPU stays small (the tied embedding alone is
                # 0.3 GB in fp32); allocations on the side stream are reused stream-ordered
                for a in range(0, gf.numel(), piece):
                    b = min(a + piece, gf.numel())
                    nb = (b - a) * 4
                    part = gf[a:b]
                    if self.comm is not None:  # sum this piece over the ranks, onto its owner
                        part = part.float()
                        with self.nccl.span(s, nb):
                            self.comm.reduce_to(part, self.owner_of[id(p)])
                        if not mine:
                            continue
                    assert hf is not None
                    if first:
                        buf = part.float()
                    else:
                        buf = torch.empty(b - a, dtype=torch.float32, device=dev)
                        buf.copy_(hf[a:b], non_blocking=True)
                        self.h2d_bytes += nb
                        buf.add_(part)
                    if final:
                        self._sq_dev += torch.linalg.vector_norm(buf, dtype=torch.float64) ** 2
                    with self.d2h.span(s, nb):
                        hf[a:b].copy_(buf, non_blocking=True)
                g.record_stream(s)
            done = torch.cuda.Event()
            done.record(s)
        return done

    def drain(self) -> None:
        if not self.on_gpu:
            return
        t0 = time.perf_counter()
        self._q.put("drain")
        self._q.join()
        self._stream.synchronize()
        self.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise RuntimeError("gradient accumulation failed") from self._error

    def close(self) -> None:
        if self.on_gpu:
            self._q.put(None)
            self._worker.join(timeout=5)
        if self.registered:
            torch.cuda.synchronize(torch.device(self.device))
            unregister(self.flat)
            self.registered = False
