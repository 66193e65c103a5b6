"""The only module that imports ramtorch: the OffloadModel subclass the streamed engine drives, and
the plain OffloadModel that streamed inference uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

PIECE = 16 * 2**20  # elements: a cast load goes through fp32 scratch of at most 64 MiB on the GPU


def cast_copy(dst: torch.Tensor, src: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """``dst.copy_(src)`` for a host ``src`` and a device ``dst`` of another dtype, with the cast
    done on the device (a plain ``copy_`` casts on the CPU first, into pageable memory): each piece
    goes H2D into fp32 ``scratch`` (1-D, on ``dst``'s device, reused in stream order) on the current
    stream, then is cast there. Asynchronous."""
    cross = dst.device != src.device
    if dst.dtype == src.dtype:
        dst.copy_(src, non_blocking=cross)
        return
    d, s = dst.view(-1), src.reshape(-1)
    step = scratch.numel() if scratch is not None else PIECE
    for a in range(0, s.numel(), step):
        b = min(a + step, s.numel())
        buf = scratch[: b - a] if scratch is not None else torch.empty(b - a, dtype=s.dtype, device=dst.device)
        buf.copy_(s[a:b], non_blocking=cross)
        d[a:b].copy_(buf)


# A chunk's load plan: runs of its tensors that lie back to back in one host buffer, each loaded
# with one copy per piece: (first element, end element, [(name, offset in the run, shape)])
Run = tuple[int, int, list[tuple[str, int, torch.Size]]]


def load_plan(tensors: dict[str, torch.Tensor], flat: torch.Tensor, gap: int = 16) -> list[Run] | None:
    """Group ``tensors`` (views of the 1-D ``flat``, of its dtype) into runs separated by at most
    ``gap`` elements of alignment padding; None when one of them is not such a view."""
    base, item, end = flat.data_ptr(), flat.element_size(), flat.data_ptr() + flat.numel() * flat.element_size()
    spans = []
    for name, t in tensors.items():
        ptr = t.data_ptr()
        if t.dtype != flat.dtype or not t.is_contiguous() or not base <= ptr < end or (ptr - base) % item:
            return None
        spans.append(((ptr - base) // item, name, t))
    runs: list[Run] = []
    for off, name, t in sorted(spans, key=lambda s: s[0]):
        if runs and 0 <= off - runs[-1][1] <= gap:
            start, _, members = runs[-1]
            runs[-1] = (start, off + t.numel(), [*members, (name, off - start, t.shape)])
        else:
            runs.append((off, off + t.numel(), [(name, 0, t.shape)]))
    return runs


def offload_model_class():
    import ramtorch

    class _GradTapOffloadModel(ramtorch.OffloadModel):
        """OffloadModel with four hooks for ramgpt's engine.

        ``_accumulate``, ``_materialize`` and ``_acquire`` are ramtorch 1.11 internals (pinned in
        pyproject); the subclass only observes or redirects them:

        - ``grad_sink(chunk_idx, named_grads)`` replaces ramtorch's gradient accumulators;
        - ``load_gate(chunk_idx)`` runs on the loader thread before a chunk is copied to the GPU
          (the optimizer may still be updating it);
        - ``load_observer(state)`` is a context manager around the copy (transfer timing);
        - ``acquire_observer(seconds, during_update, phase)`` gets every compute-thread wait for a
          chunk, whether a gated update was still running when the wait began, and whether the
          chunk was wanted for a forward ("F") or a backward ("B");
        - ``gpu_wait`` (a context manager factory taking ``during_update, phase``) brackets each
          wait with events on the compute stream, so the GPU's own idle time is measured.

        With ``cast_dtype`` set, the chunks' floating tensors (the fp32 masters) are cast to it on
        the device as they are loaded, so no low-precision copy of the weights is kept on the host.
        With ``load_src`` (the 1-D host buffer the masters are views of) and ``load_plans`` (per
        chunk, :func:`load_plan`), a chunk's tensors that lie back to back load as one run: one
        copy and one cast per 64 MiB piece instead of four operations per tensor.
        """

        cast_dtype: torch.dtype | None = None
        load_src: torch.Tensor | None = None
        load_plans: list[list[Run] | None] | None = None
        _scratch: torch.Tensor | None = None
        gpu_wait: Callable[[bool], AbstractContextManager] | None = None

        grad_sink: Callable[[int, dict], None] | None = None
        load_gate: Callable[[int], None] | None = None
        load_observer: Callable[[Any], AbstractContextManager] | None = None
        acquire_observer: Callable[[float, bool], None] | None = None
        update_running: Callable[[], bool] = staticmethod(lambda: False)

        def _accumulate(self, state, named_grads):  # noqa: D401
            if named_grads:
                self.grad_sink(state.idx, named_grads)

        def _materialize(self, state):
            if self.load_gate is not None:
                self.load_gate(state.idx)
            obs = self.load_observer
            with obs(state) if obs is not None else nullcontext():
                plan = self.load_plans[state.idx] if self.load_plans is not None and not state.nvme else None
                if plan is not None and not self._keep_graph:
                    return self._load_runs(plan)
                if self.cast_dtype is None or state.nvme:
                    return super()._materialize(state)
                return self._materialize_cast(state)

        def _cast_scratch(self) -> torch.Tensor:
            """fp32 scratch the loads go through, allocated once on the loader's stream (so reuse
            by the next load is ordered after the cast that reads it)."""
            if self._scratch is None:
                self._scratch = torch.empty(PIECE, dtype=torch.float32, device=self.device)
            return self._scratch

        def _load(self, t: torch.Tensor) -> torch.Tensor:
            dtype = self.cast_dtype if t.is_floating_point() else t.dtype
            out = torch.empty(t.shape, dtype=dtype, device=self.device)
            cast_copy(out, t, self._cast_scratch() if t.dtype == torch.float32 else None)
            return out

        def _load_runs(self, runs: list[Run]) -> dict[str, torch.Tensor]:
            out = {}
            for start, end, members in runs:
                buf = torch.empty(end - start, dtype=self.cast_dtype or self.load_src.dtype, device=self.device)
                src = self.load_src[start:end]
                cast_copy(buf, src, self._cast_scratch() if buf.dtype != src.dtype else None)
                for name, off, shape in members:
                    out[name] = buf[off : off + shape.numel()].view(shape)
            return out

        def _materialize_cast(self, state):
            """ramtorch's ``_materialize`` (fresh tensors per load; in keep mode the same graph
            tensors refilled) with the cast on the device."""
            if not self._keep_graph:
                return {n: self._load(t) for n, t in state.tensors.items()}
            if state.graph_tensors is None:
                gt = {}
                for n, t in state.tensors.items():
                    g = self._load(t)
                    if n in state.param_names:
                        g.requires_grad_(True)
                    gt[n] = g
                state.graph_tensors = gt
                return gt
            for n, t in state.tensors.items():
                g = state.graph_tensors[n]
                store = g.untyped_storage()
                if store.size() == 0:
                    store.resize_(g.numel() * g.element_size())
                # through .data: invisible to autograd's version check
                cast_copy(g.data, t, self._cast_scratch() if t.dtype == torch.float32 else None)
            return state.graph_tensors

        def _acquire(self, layer):
            if self.acquire_observer is None:
                return super()._acquire(layer)
            during = self.update_running()
            # the itinerary is announced and advanced by this (the compute) thread: safe to read
            phase = self._future_kinds[self._fpos] if self._fpos < len(self._future_kinds) else "F"
            t0 = time.perf_counter()
            try:
                with self.gpu_wait(during, phase) if self.gpu_wait is not None else nullcontext():
                    return super()._acquire(layer)
            finally:
                self.acquire_observer(time.perf_counter() - t0, during, phase)

    return _GradTapOffloadModel


def offload_model(chunks, **kwargs):
    """A plain ramtorch ``OffloadModel`` (streamed inference)."""
    import ramtorch

    return ramtorch.OffloadModel(chunks, **kwargs)
