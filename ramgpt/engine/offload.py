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


def _padded(n: int) -> int:
    """Elements a run takes in a load slot: runs start 64-element aligned."""
    return -(-n // 64) * 64


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
        With ``load_srcs`` (per chunk, the 1-D host buffer its tensors are views of: the fp32 masters,
        or their bf16 halves; or one per run, where a chunk has both) and ``load_plans`` (per chunk, :func:`load_plan`), a chunk's tensors
        that lie back to back load as one run: one copy (and one cast) per piece instead of four
        operations per tensor; a run already in the slots' dtype is copied as it is.
        """

        cast_dtype: torch.dtype | None = None
        load_srcs: list[torch.Tensor | list[torch.Tensor]] | None = None
        load_plans: list[list[Run] | None] | None = None
        _scratch: torch.Tensor | None = None
        gpu_wait: Callable[[bool], AbstractContextManager] | None = None

        grad_sink: Callable[[int, dict], None] | None = None
        load_gate: Callable[[int], None] | None = None
        load_observer: Callable[[Any], AbstractContextManager] | None = None
        acquire_observer: Callable[[float, bool], None] | None = None
        update_running: Callable[[], bool] = staticmethod(lambda: False)

        # the run loads' device buffers (see _slot_for) and the cast pipeline (see _cast_run)
        use_load_slots = True  # False: a fresh allocation per load (the caching allocator recycles them)
        _slots: list[torch.Tensor] | None = None
        _slot_owner: list[int | None]
        _slot_free: list[Any]
        _held: int | None = None  # the chunk the compute thread holds (between _acquire and _release)
        _cast_stream: Any = None
        _pieces: list[torch.Tensor] | None = None
        _piece_free: list[Any]
        _next_piece = 0

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
                    return self._load_runs(state.idx, plan)
                if self.cast_dtype is None or state.nvme:
                    return super()._materialize(state)
                return self._materialize_cast(state)

        def _cast_scratch(self) -> torch.Tensor:
            """fp32 scratch the per-tensor loads go through, allocated once on the loader's stream
            (so reuse by the next load is ordered after the cast that reads it)."""
            if self._scratch is None:
                self._scratch = torch.empty(PIECE, dtype=torch.float32, device=self.device)
            return self._scratch

        def _load(self, t: torch.Tensor) -> torch.Tensor:
            dtype = self.cast_dtype if t.is_floating_point() else t.dtype
            out = torch.empty(t.shape, dtype=dtype, device=self.device)
            cast_copy(out, t, self._cast_scratch() if t.dtype == torch.float32 else None)
            return out

        def _slot_for(self, idx: int, nelem: int, dtype: torch.dtype) -> torch.Tensor:
            """Loader thread: a device buffer for chunk ``idx``'s runs, one of ``window`` allocated
            once (the largest chunk's size) instead of a fresh allocation per load: under a VRAM cap
            the caching allocator, holding blocks the compute stream still reads, would otherwise
            free its cache and retry (a device-wide synchronisation). A slot whose chunk has left
            the window is reused once the compute stream is past that chunk's last use (the loader's
            stream waits for the event :meth:`_release` recorded; the CPU does not wait)."""
            if self._slots is None:
                runs = [r for r in self.load_plans if r is not None]
                size = max(sum(_padded(e - s) for s, e, _ in rs) for rs in runs)
                self._slots = [torch.empty(size, dtype=dtype, device=self.device) for _ in range(self.window)]
                self._slot_owner = [None] * self.window
                self._slot_free = [None] * self.window
            with self._cv:
                busy = set(self._resident) | {self._held}
            free = [s for s, o in enumerate(self._slot_owner) if o is None or o not in busy or o == idx]
            if not free:  # cannot happen while residents + the load in flight <= window
                raise RuntimeError(f"no free load slot for chunk {idx}: slots hold {self._slot_owner}")
            s = next((s for s in free if self._slot_owner[s] == idx), free[0])
            for t, o in enumerate(self._slot_owner):
                if o == idx:
                    self._slot_owner[t] = None
            self._slot_owner[s] = idx
            if self._slot_free[s] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._slot_free[s])
            return self._slots[s][:nelem]

        def _cast_run(self, dst: torch.Tensor, src: torch.Tensor) -> None:
            """Loader thread, CUDA: H2D of fp32 ``src`` into ``dst`` of the compute dtype, piece by
            piece through rotating fp32 scratch: the copies stay on the loader's stream and each
            cast runs on a high-priority stream of its own, so the copy engine goes on with the next
            piece while a cast waits for SMs the compute stream holds. The loader's stream then
            waits for the casts (the chunk's ready event follows them)."""
            h2d = torch.cuda.current_stream(self.device)
            if self._pieces is None:
                self._cast_stream = torch.cuda.Stream(self.device, priority=-1)
                self._pieces = [torch.empty(PIECE // 2, dtype=torch.float32, device=self.device) for _ in range(3)]
                self._piece_free = [None] * len(self._pieces)
            step = self._pieces[0].numel()
            for a in range(0, src.numel(), step):
                b = min(a + step, src.numel())
                k = self._next_piece
                self._next_piece = (k + 1) % len(self._pieces)
                if self._piece_free[k] is not None:
                    h2d.wait_event(self._piece_free[k])  # the cast that read this piece is done
                piece = self._pieces[k][: b - a]
                piece.copy_(src[a:b], non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(h2d)
                with torch.cuda.stream(self._cast_stream):
                    self._cast_stream.wait_event(landed)
                    dst[a:b].copy_(piece)
                    done = torch.cuda.Event()
                    done.record(self._cast_stream)
                self._piece_free[k] = done
            h2d.wait_stream(self._cast_stream)

        def _load_runs(self, idx: int, runs: list[Run]) -> dict[str, torch.Tensor]:
            srcs = self.load_srcs[idx]  # one buffer for the chunk's runs, or one per run
            flats = srcs if isinstance(srcs, list) else [srcs] * len(runs)
            dtype = self.cast_dtype or flats[0].dtype
            total = sum(_padded(end - start) for start, end, _ in runs)
            if self.use_load_slots:
                slot = self._slot_for(idx, total, dtype)
            else:
                slot = torch.empty(total, dtype=dtype, device=self.device)
            out, off = {}, 0
            for (start, end, members), flat in zip(runs, flats):
                buf = slot[off : off + end - start]
                off += _padded(end - start)
                src = flat[start:end]
                if self._cuda and buf.dtype != src.dtype:
                    self._cast_run(buf, src)
                else:
                    cast_copy(buf, src, self._cast_scratch() if buf.dtype != src.dtype else None)
                for name, o, shape in members:
                    out[name] = buf[o : o + shape.numel()].view(shape)
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

        # per chunk: where each of its tensors lives in its module (owner, leaf, dict name, tensor name)
        _homes: dict[int, list[tuple[Any, str, str, str]] | None] | None = None

        def _call_chunk(self, layer, tensors, args):
            """ramtorch calls each chunk through ``torch.func.functional_call``, whose general
            machinery (untying, swapping every tensor through accessors) cost the compute thread
            ~0.13 ms more per call than a direct call (CPU measurement), 76 calls a pass. The chunks' tensors are plain entries of their
            modules' ``_parameters``/``_buffers``: put the loaded ones there for the call and put
            the originals back (any other layout goes through functional_call)."""
            if self._homes is None:
                self._homes = {}
            where = self._homes.get(layer, ...)
            mod = self.chunks[layer]
            if where is ...:
                where = []
                for name in tensors:
                    *path, leaf = name.split(".")
                    owner = mod.get_submodule(".".join(path)) if path else mod
                    kind = "_parameters" if leaf in owner._parameters else "_buffers" if leaf in owner._buffers else None
                    if kind is None:
                        where = None
                        break
                    where.append((owner, leaf, kind, name))
                self._homes[layer] = where
            if where is None or len(where) != len(tensors):
                return super()._call_chunk(layer, tensors, args)
            saved = [getattr(o, kind)[leaf] for o, leaf, kind, _ in where]
            try:
                for o, leaf, kind, name in where:
                    getattr(o, kind)[leaf] = tensors[name]
                return mod(*args)
            finally:
                for (o, leaf, kind, _), t in zip(where, saved):
                    getattr(o, kind)[leaf] = t

        def _gate_kept(self, layer):
            """A chunk kept on the GPU (``runtime.stream_pin``) is never loaded, so the loader's
            gate never holds it back: the compute thread itself waits until its update (and the
            refresh of its device copy) is done, or it would compute with the old weights, or
            with weights being overwritten."""
            if self.load_gate is not None and self._state[layer].gpu_pinned:
                self.load_gate(layer)

        def _acquire(self, layer):
            if self.acquire_observer is None:
                self._gate_kept(layer)
                out = super()._acquire(layer)
                self._held = layer
                return out
            during = self.update_running()
            # the itinerary is announced and advanced by this (the compute) thread: safe to read
            phase = self._future_kinds[self._fpos] if self._fpos < len(self._future_kinds) else "F"
            t0 = time.perf_counter()
            try:
                with self.gpu_wait(during, phase) if self.gpu_wait is not None else nullcontext():
                    self._gate_kept(layer)
                    out = super()._acquire(layer)
                    self._held = layer
                    return out
            finally:
                self.acquire_observer(time.perf_counter() - t0, during, phase)

        def _release(self):
            """Before the chunk may leave the window: where its tensors live in a load slot, an
            event on the compute stream marks the end of its use (the slot's next load waits for it)."""
            layer, self._held = self._held, None
            if self._cuda and layer is not None and self._slots is not None and layer in self._slot_owner:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self._slot_free[self._slot_owner.index(layer)] = ev
            super()._release()

    return _GradTapOffloadModel


def offload_model(chunks, **kwargs):
    """A plain ramtorch ``OffloadModel`` (streamed inference)."""
    import ramtorch

    return ramtorch.OffloadModel(chunks, **kwargs)
