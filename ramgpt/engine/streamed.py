"""The streamed engine: fp32 masters and AdamW in CPU RAM, streamed through the GPU.

ramtorch's ``OffloadModel`` runs the chunks ``[embed, block_0 .. block_{L-1}, head]`` through a
GPU window, loading each chunk from page-locked CPU RAM and recomputing each block in backward.
What ramtorch does not provide is built around it (docs/design.md):

1. The fp32 masters live in one page-locked arena (:mod:`.hostmem`) and are what the GPU loads:
   each chunk is cast to bf16 on the device as it arrives. No bf16 copy of the weights is kept
   on the host (2.2 GB less RSS for the 1b) and the optimizer has nothing to refresh.
2. Gradients leave the GPU once per pass, through the ``_accumulate`` hook, into fp32
   accumulators in CPU RAM (:mod:`.gradpath`), which also produce the global gradient norm.
3. Many sequences share one weight pass (``seqs_per_pass``): the PCIe cost of a pass is fixed,
   so the pass must carry enough tokens to hide it behind compute.
4. The tied embedding lives in the first and last chunk; both chunks load the one fp32 master,
   and both chunks' gradients land in its accumulator.
5. The optimizer (:mod:`.chunked_adamw`) updates chunk by chunk in a worker thread while the next
   step's first forward loads each chunk as soon as it is updated.
6. The head's forward in the no-grad phase of a pass skips the loss (its backward recomputes it
   anyway): one vocabulary-sized matmul less per pass.
"""

from __future__ import annotations

import copy
import gc
import math
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ramgpt.dist import Comm, chunk_owners
from ramgpt.engine import native
from ramgpt.engine.base import Engine, StepReport, make_optimizer, release_freed_heap
from ramgpt.engine.chunked_adamw import ChunkedAdamW
from ramgpt.engine.compiled import BlockWarmUp, CompiledBlocks
from ramgpt.engine.gradpath import DeviceGradPath, HostGradPath
from ramgpt.engine.hostmem import ALIGN, PAGE, FileArena, HostArena, aligned
from ramgpt.engine.nodeshare import NodeShare
from ramgpt.engine.offload import load_plan, offload_model_class
from ramgpt.engine.planes import JoinedTensor, MasterPlanes
from ramgpt.engine.planes import works as planes_work
from ramgpt.model import GPT, Block
from ramgpt.placement import gpu_update_chunks, resolve_grad_accum


class EventTimes:
    """Device-timed spans by key: CUDA event pairs, read lazily (:meth:`harvest` adds each finished
    pair's time to ``by_key``); without CUDA, host-timed seconds added directly."""

    def __init__(self):
        self.by_key: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, Any, Any]] = []
        self._lock = threading.Lock()

    @contextmanager
    def events(self, key: str, stream):
        """Time the work queued on ``stream`` inside the block: an event before, one after."""
        a = torch.cuda.Event(enable_timing=True)
        a.record(stream)
        try:
            yield
        finally:
            b = torch.cuda.Event(enable_timing=True)
            b.record(stream)
            with self._lock:
                self._pending.append((key, a, b))

    def harvest(self) -> None:
        with self._lock:
            keep = []
            for key, a, b in self._pending:
                if b.query():
                    self.by_key[key] += a.elapsed_time(b) / 1000.0
                else:
                    keep.append((key, a, b))
            self._pending = keep


class TransferClock(EventTimes):
    """Bytes and device-timed durations of copies on one stream."""

    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda = cuda
        self.bytes = 0

    @property
    def seconds(self) -> float:
        return self.by_key["copy"]

    @contextmanager
    def span(self, stream, nbytes: int):
        if not self.cuda:
            t = time.perf_counter()
            try:
                yield
            finally:
                with self._lock:
                    self.bytes += nbytes
                    self.by_key["copy"] += time.perf_counter() - t
            return
        try:
            with self.events("copy", stream):
                yield
        finally:
            with self._lock:
                self.bytes += nbytes


class GpuIdleClock(EventTimes):
    """GPU time the compute stream sits idle across the compute thread's waits, by kind.

    An event is recorded on the compute stream before the wait and one after: the first completes
    when the GPU has finished the work queued before the wait, the second when the GPU could go on
    (the awaited copy landed, or the thread queued more work). Their distance is the GPU's idle
    time that the wait caused; a wait while the GPU still had queued work costs nothing."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)

    @property
    def seconds(self) -> dict[str, float]:
        return self.by_key

    @contextmanager
    def span(self, kind: str):
        with self.events(kind, torch.cuda.current_stream(self.device)):
            yield


def _set_param(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _streamed_modules(masters: list[nn.Module], copies: HostArena | None = None,
                      dtype: torch.dtype | None = None, planes: MasterPlanes | None = None) -> list[nn.Module]:
    """The modules ramtorch streams: each chunk's structure, with parameters that share the fp32
    masters' storage but are not them (ramtorch's own leaves; no deep copy of the weights: the
    masters map to meta placeholders while the modules are copied). With ``copies``: parameters
    that are ``dtype`` copies of the masters in that arena instead, chunk by chunk (the tied
    embedding twice). With ``planes``: the masters' bf16 ``hi`` planes."""
    mods = []
    for c in masters:
        memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
                for p in c.parameters()}
        m = copy.deepcopy(c, memo)
        for name, p in c.named_parameters():
            if planes is not None and p in planes:
                _set_param(m, name, planes.compute_view(p))
            elif copies is None:
                _set_param(m, name, p.detach())
            else:
                view = copies.take(p.shape, dtype)
                view.copy_(p.detach())
                _set_param(m, name, view)
        mods.append(m)
    return mods


class StreamedEngine(Engine):
    name = "streamed"
    TIMINGS: list | None = None  # a list (benchmarks): (what, time.perf_counter()) as the set-up goes

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, seqs_per_pass: int,
                 window: int = 3, pin: int = 0, vram_budget_b: int | None = None, grad_accum: str = "host",
                 moments_file: Path | None = None, comm: Comm | None = None, optimizer_gpu_share: float = 0.0,
                 host_bf16_copies: bool = False, compile_blocks: bool = False,
                 split_masters: str | Sequence[int] = "none", on_phase: Callable[[str], None] | None = None):
        """``moments_file``: the low-RAM mode (``runtime.optimizer_on_disk``): AdamW's moments live in
        this memory-mapped file (removed on close) instead of RAM. ``comm``: one of several ranks
        (:mod:`ramgpt.dist`): the state is shared by the node's ranks and each chunk updated by its owner.
        ``optimizer_gpu_share``: the share of the parameters whose update the GPU does (one process on
        CUDA with ``grad_accum=device``, moments in RAM; otherwise the CPU updates everything).
        ``host_bf16_copies``: keep page-locked bf16 copies of the chunks for the GPU to load (one
        process; the default loads the fp32 masters and casts them on the GPU). ``compile_blocks``:
        the blocks run through one compiled graph (:mod:`.compiled`), compiled by :meth:`warm_up`.
        ``split_masters``: which chunks keep each fp32 master as its bf16 rounding, which the GPU
        loads, and the remaining 16 bits (:mod:`.planes`): "none", "gpu" (those the GPU updates),
        "all", "auto" ("all" where the CPU's kernel for them loads, :mod:`.native`, else "gpu"), or
        the chunks' indices (one process, bf16 compute, not with ``host_bf16_copies``).
        ``on_phase``: told what the set-up is doing as each of its long steps begins (the panel shows it)."""
        phase = on_phase or (lambda _text: None)
        kernel_built = None
        if split_masters == "auto":  # the CPU's kernel for split masters builds while the model does
            kernel_built = threading.Thread(target=native.load, name="ramgpt-native-build", daemon=True)
            kernel_built.start()

        def mark(what: str) -> None:
            if self.TIMINGS is not None:
                self.TIMINGS.append((what, time.perf_counter()))

        if device.startswith("cuda") and torch.device(device).index is None:
            # worker threads must name the device: the current one is per thread
            device = f"cuda:{torch.cuda.current_device()}"
        arena = None
        if any(p.is_meta for p in model.parameters()):  # build_gpt(materialize=False): place, then initialise
            phase("initialising the fp32 master weights")
            arena = self._materialize(model, device, several=comm is not None)
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
        # the fp32 masters move into one page-locked arena (one process) or the node's shared memory
        # (several GPUs): the GPU loads them from there
        if comm is not None:
            self._share_node_state(moments_file)
            self.arena = self.share.masters
            self.arena.register(device)
        elif arena is not None:  # the weights were initialised in place in the arena
            self.arena = arena
        else:
            self.arena = HostArena(sum(aligned(p.numel() * 4) for p in self.params), device, "the fp32 master weights")
            with torch.no_grad():
                for p in (p for ps in self._owned for p in ps):  # chunk by chunk: a chunk's masters are one run
                    view = self.arena.take(p.shape, p.dtype)
                    view.copy_(p.detach())
                    p.data = view  # the same Parameter (the optimizer holds it); the old storage is freed
        # runtime.host_bf16_copies: the GPU loads bf16 copies kept in a second page-locked arena and
        # refreshed after each update (half the link traffic of the weights, 2 bytes more RAM per
        # parameter); else the masters themselves, cast on the GPU
        self.copies: HostArena | None = None
        if host_bf16_copies and comm is None and self.compute_dtype != torch.float32:
            item = self.compute_dtype.itemsize
            self.copies = HostArena(sum(aligned(p.numel() * item) for c in self.masters for p in c.parameters()),
                                    device, "the bf16 weight copies")
        self.h2d = TransferClock(self.cuda)
        self.d2h = TransferClock(self.cuda)
        self.idle = GpuIdleClock(device) if self.cuda else None
        # the gradient path first: whether the GPU updates a share (and so which chunks "gpu" splits)
        # depends on it (a refused page-lock falls back to the host path)
        owner_of = {id(p): self._owner[i] for i, ps in enumerate(self._owned) for p in ps}
        if comm is not None:
            if self.cuda and self.grad_accum != "device":
                raise ValueError("several GPUs sum gradients on the GPU: use runtime.grad_accum=device (or auto)")
            self.grad_accum = "device"  # on the CPU its path sums over the ranks with gloo
        phase("page-locking the gradient accumulators")
        if self.grad_accum == "device":
            mine = [ps for ps, m in zip(self._owned, self._mine) if m]
            self.grads: DeviceGradPath | HostGradPath = DeviceGradPath(
                self.params, self._master_of, device, self.d2h, mine, comm=comm, owner_of=owner_of)
            if self.grads.fallback:  # page-locking refused: the CPU worker is faster than pageable DMA
                self.grads.close()
                self.grad_accum = "host"
        if self.grad_accum == "host":  # staging slots for a chunk's gradients in the compute dtype
            item = self.compute_dtype.itemsize
            slot = max(sum(aligned(p.numel() * item) for p in c.parameters()) for c in self.masters)
            self.grads = HostGradPath(self.params, self._master_of, device, self.d2h, slot,
                                      max(2, min(4, len(self.masters))))
        # runtime.split_masters: the fp32 masters of some chunks become two 16-bit planes in the same
        # bytes of the arena; the GPU loads their bf16 plane (half the link traffic, no cast). "gpu":
        # the chunks the GPU updates (it joins and splits the planes itself, at no CPU cost); "all":
        # every chunk (the CPU joins, updates and splits its share in one pass where engine/native.py's
        # kernel builds, else around each piece of torch's update)
        if isinstance(split_masters, str) and split_masters not in ("none", "gpu", "all", "auto"):
            raise ValueError(f"split_masters must be 'none', 'gpu', 'all', 'auto' or chunk indices, "
                             f"got {split_masters!r}")
        if kernel_built is not None:
            kernel_built.join()
            # without the kernel the CPU's split update is 3-4x slower (torch's pieces): keep its masters whole
            split_masters = "all" if native.load() is not None else "gpu"
        self.split_masters = split_masters
        self.planes: MasterPlanes | None = None
        self._sources: dict[int, JoinedTensor] = {}
        counts = [sum(p.numel() for p in ps) for ps in self._owned]
        gpu_planned = (optimizer_gpu_share > 0 and self.cuda and comm is None and moments_file is None
                       and self.arena.registered and isinstance(self.grads, DeviceGradPath) and self.grads.on_gpu)
        gpu_chunks = gpu_update_chunks(counts, optimizer_gpu_share) if gpu_planned else []
        if isinstance(split_masters, str):
            split = {"none": [], "all": list(range(len(counts))), "gpu": gpu_chunks}[split_masters]
        else:  # these chunks (tests)
            split = sorted(set(split_masters))
        if split and self.copies is None and comm is None and self.compute_dtype == torch.bfloat16:
            if planes_work("cpu") and (not self.cuda or planes_work(device)):
                phase("splitting the masters into 16-bit halves")
                self.planes = MasterPlanes()
                self.planes.convert_chunks([self._owned[i] for i in split if self._owned[i]], self.arena.buf)
                self._sources = {id(p): self.planes.source(p) for p in self.params if p in self.planes}
                if set(split) - set(gpu_chunks):  # the CPU updates split masters: build its kernel meanwhile
                    threading.Thread(target=native.load, name="ramgpt-native-build", daemon=True).start()
            else:
                warnings.warn("this torch build cannot split fp32 weights into 16-bit halves exactly; the GPU loads "
                              "the fp32 masters instead (runtime.split_masters)", RuntimeWarning, stacklevel=2)
        phase("setting up the weight stream")
        mark("weight stream")
        modules = _streamed_modules(self.masters, self.copies, self.compute_dtype, self.planes)
        self._head_copy = modules[-1]
        self.compile_blocks = compile_blocks
        if compile_blocks:
            body = CompiledBlocks()
            for m in modules:
                if isinstance(m, Block):
                    m.compiled = body
        keep = "checkpoint" if model.cfg.dropout > 0 else False  # recompute would resample dropout
        mark("modules copied")
        self.om = offload_model_class()(modules, device=device, window=window, pin=pin, keep_activations=keep)
        mark("ramtorch's OffloadModel")
        # the host holds every chunk in the compute dtype already: nothing to cast
        low = self.copies is not None or (self.planes is not None and len(split) == len(counts))
        self.om.cast_dtype = self.compute_dtype if self.compute_dtype != torch.float32 and not low else None
        self.om.grad_sink = self._on_grads
        self.om.load_observer = self._observe_load
        self.om.load_gate = self._wait_for_update
        self.om.acquire_observer = self._observe_wait
        self.om.gpu_wait = self._gpu_wait if self.cuda else None
        self.om.update_running = lambda: self.adamw.running()
        if self.copies is None:
            self._adopt_masters()
        mark("masters adopted")
        # a chunk's tensors lie back to back in the arena the GPU loads from: each loads as one run
        # (where ramtorch re-pinned them elsewhere, load_plan finds no run and they load one by one)
        src = self.copies if self.copies is not None else self.arena
        align = PAGE if self.share is not None else ALIGN  # the arena's alignment, in bytes
        flats = [src.buf.view(self.compute_dtype)] if self.compute_dtype != torch.float32 else []
        if not low:
            flats.append(src.buf.view(torch.float32))
        # each chunk from the view of the arena its tensors are (fp32 masters or bf16 planes); a chunk
        # with both (the head's LayerNorm beside a split embedding) has runs of each, into one slot
        self.om.load_srcs, self.om.load_plans = [], []
        for st in self.om._state:
            plan, srcs = None, flats[-1]
            if not st.gpu_pinned:
                runs, run_srcs = [], []
                for f in flats:
                    part = load_plan({k: t for k, t in st.tensors.items() if t.dtype == f.dtype}, f,
                                     align // f.element_size())
                    if part is None:
                        runs = None
                        break
                    runs += part
                    run_srcs += [f] * len(part)
                if runs and sum(len(m) for *_, m in runs) == len(st.tensors):
                    plan, srcs = runs, (run_srcs[0] if len(set(map(id, run_srcs))) == 1 else run_srcs)
            self.om.load_srcs.append(srcs)
            self.om.load_plans.append(plan)

        mark("load plans")
        self.moments = None
        if self.share is not None:
            self.moments = self.share.moments
        elif moments_file is not None:
            per = [aligned(p.numel() * 4, PAGE) * 2 for p in self.params]
            self.moments = FileArena(moments_file, sum(per))
        self.adamw = ChunkedAdamW(self.optimizer, self._owned, self.moments,
                                  update=[i for i, m in enumerate(self._mine) if m], gpu_chunks=gpu_chunks,
                                  device=device if gpu_chunks else None, planes=self.planes)
        if gpu_chunks:
            # their moments live page-locked; locking 3.5 GB takes seconds, which the first pass hides
            nbytes = sum(2 * aligned(p.numel() * 4) for i in gpu_chunks for p in self._owned[i])

            def lock_moments() -> None:
                try:
                    torch.cuda.set_device(torch.device(device))  # the runtime's current device is per thread
                    self.adamw.gpu_moments = HostArena(nbytes, device, "the AdamW moments the GPU updates")
                finally:
                    self.adamw.gpu_moments_ready.set()

            threading.Thread(target=lock_moments, name="ramgpt-lock-moments", daemon=True).start()
        if self.share is not None:
            self.adamw.ensure_all_states(step_arena=self.share.moments)  # the same layout in every rank
        self._norm_from_path = False
        self._update_gate = None
        self._opt_wait_s = 0.0  # compute-thread waits for chunks the optimizer had not updated yet
        self._load_wait_s: dict[str, float] = defaultdict(float)  # by the phase the chunk was for: F or B
        del modules
        release_freed_heap()
        mark("done")

    @staticmethod
    def _materialize(model: GPT, device: str, several: bool) -> HostArena | None:
        """A model built on the meta device gets its fp32 masters here. One process: as views of one
        page-locked arena, laid out chunk by chunk as :meth:`__init__` wants them, initialised in
        place (no second 4.4 GB allocation and copy for the 1b); the arena is returned. Several
        ranks: ordinary CPU tensors (their masters move to the node's shared memory later)."""
        if several:
            model.to_empty(device="cpu")
            model.tie_weights()
            model.init_weights()
            return None
        seen: dict[int, nn.Parameter] = {}
        order = []
        for chunk in model.chunks():
            for mod in chunk.modules():
                for leaf, p in mod.named_parameters(recurse=False):
                    order.append((mod, leaf, p))
                    seen.setdefault(id(p), p)
        # page-locked once written: the init's threads fault the pages in, in parallel
        arena = HostArena(sum(aligned(p.numel() * 4) for p in seen.values()), device, "the fp32 master weights",
                          lock=False)
        new: dict[int, nn.Parameter] = {}
        for mod, leaf, p in order:
            if id(p) not in new:
                new[id(p)] = nn.Parameter(arena.take(p.shape, torch.float32), requires_grad=p.requires_grad)
            mod._parameters[leaf] = new[id(p)]
        model.tie_weights()
        model.init_weights()
        arena.lock()
        return arena

    @property
    def seqs_per_pass(self) -> int:
        return self._spp

    @property
    def shared_b(self) -> int:
        """Bytes of the node-shared training state (several GPUs; 0 for one process)."""
        return sum(a.nbytes for a in self.share.arenas.values()) if self.share is not None else 0

    def _share_node_state(self, moments_file: Path | None) -> None:
        """Several GPUs: the fp32 masters and AdamW state once per node, in shared memory; the
        masters become views of it (the node's first rank writes their values)."""
        comm = self.comm
        assert comm is not None
        masters_b = sum(aligned(p.numel() * 4, PAGE) for p in self.params)
        moments_b = sum(2 * aligned(p.numel() * 4, PAGE) + PAGE for p in self.params)
        self.share = NodeShare(comm, masters_b=masters_b, moments_b=moments_b, n_chunks=len(self.masters),
                               moments_dir=moments_file.parent if moments_file else None)
        with torch.no_grad():
            for p in (p for ps in self._owned for p in ps):  # chunk by chunk, as in one process
                view = self.share.masters.take(p.shape, p.dtype)
                if comm.ctx.local_main:
                    view.copy_(p.detach())
                p.data = view  # the same Parameter object (the optimizer holds it), shared storage
        comm.barrier()

    @torch.no_grad()
    def _adopt_masters(self) -> None:
        """ramtorch page-locks a streamed chunk's tensors unless they already are: where the arena
        could not be page-locked it made pinned copies, which the optimizer would never update, so
        the chunks go back to the masters (pageable: slower copies, same values). Chunks ramtorch
        keeps on the GPU (``runtime.stream_pin``) hold their copy in the compute dtype."""
        for idx, st in enumerate(self.om._state):
            for k, t in st.tensors.items():
                m = self._master_of[idx].get(k)
                if m is None:
                    continue
                home = self._load_view(m)
                if st.gpu_pinned:
                    t.data = t.data.to(self.compute_dtype)
                elif t.data_ptr() != home.data_ptr():
                    t.data = home.detach()

    def _load_view(self, p: nn.Parameter) -> torch.Tensor:
        """What the GPU loads of master ``p``: its bf16 plane (``split_masters``) or the master itself."""
        return self.planes.compute_view(p) if self.planes is not None and p in self.planes else p

    @torch.no_grad()
    def _refresh_copies(self, idx: int) -> None:
        """A chunk's copies from its updated masters: the host bf16 copies (``host_bf16_copies``)
        and a chunk kept on the GPU (synchronous, so it is done before the chunk is marked ready)."""
        st = self.om._state[idx]
        if self.copies is not None or st.gpu_pinned:
            for k, t in st.tensors.items():
                if k in self._master_of[idx]:
                    t.data.copy_(self._load_view(self._master_of[idx][k]))

    def _gpu_wait(self, during_update: bool, phase: str):
        return self.idle.span("update" if during_update else f"load_{phase}")

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

    def _observe_wait(self, seconds: float, during_update: bool, phase: str) -> None:
        if during_update:
            self._opt_wait_s += seconds
        else:
            self._load_wait_s[phase] += seconds

    def _on_grads(self, idx: int, named_grads: dict[str, torch.Tensor]) -> None:
        with self.idle.span("grad") if self.idle is not None else nullcontext():
            self.grads.on_grads(idx, named_grads)

    def warm_up(self, seq_len: int, started: BlockWarmUp | None = None) -> str | None:
        """With ``compile_blocks``: compile the blocks' graphs for passes of ``seqs_per_pass`` x
        ``seq_len`` tokens (or wait for ``started``, a warm-up begun before this engine was built,
        for every pass and evaluation size of a run); where that fails the blocks run eager and the
        warning is returned."""
        if not self.compile_blocks:
            return started.result() if started is not None else None
        if started is None:
            started = BlockWarmUp(self.model.cfg, self.device, self.compute_dtype, seq_len, [self._spp])
            started.start()
        try:
            warning = started.result()
        finally:
            if self.cuda:
                torch.cuda.empty_cache()  # the warm-up's activations: give the cap's room back to training
            # the compiler's garbage back to the OS before the optimizer's state is first touched:
            # 0.01 GiB after the 1b's warm-up (round 11). What the first compile kept was the
            # pointwise autotuning's kernels, now off (compiled.INDUCTOR_OPTIONS)
            gc.collect()
            release_freed_heap()
        if warning is not None:
            self.compile_blocks = False
            for m in self.om.chunks:
                if isinstance(m, Block):
                    m.compiled = None
        return warning

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
        with self.idle.span("grad") if self.idle is not None else nullcontext():
            self.grads.drain()
        self.h2d.harvest()
        self.d2h.harvest()

    def optimizer_step(self, lr: float, n_tokens: int) -> StepReport:
        """Decide the clip from the norm the gradient path summed, then update in the background
        (the next forward waits per chunk). A non-finite norm skips the update."""
        self._before_optimizer()
        t0 = time.perf_counter()
        with self.idle.span("optimizer") if self.idle is not None else nullcontext():
            return self._decide_and_start(lr, n_tokens, t0)

    def _decide_and_start(self, lr: float, n_tokens: int, t0: float) -> StepReport:
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
        tensors = [self._sources.get(id(p), p) for p in self._owned[idx]]
        for p in self._owned[idx]:
            tensors.extend(v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor))
        self._update_gate(tensors)

    def _chunk_updated(self, idx: int) -> None:
        # a tied weight in this chunk is a master another chunk updates (the head's embedding):
        # with several ranks that update may still be running
        if self.share is not None:
            for j in self._tied_from[idx]:
                self._wait_for_update(j)
        self._refresh_copies(idx)
        if self.share is not None:
            self.share.flags[idx] = self._update_count  # the node's other ranks may load it now

    def wait_optimizer(self) -> None:
        """Every chunk's update is done (with several GPUs: by every owner on this node)."""
        self.adamw.wait_all()
        if self.share is not None:
            for idx in range(len(self.masters)):
                self._wait_for_update(idx)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """With ``split_masters`` the masters come as :class:`~.planes.JoinedTensor` (joined piece by
        piece when written or loaded; one object per parameter, so a tied weight is saved once)."""
        self.wait_optimizer()
        if self.planes is None:
            return super().state_dict()
        return {k: self._sources[id(v)] if id(v) in self._sources else v.detach().to("cpu")
                for k, v in self.model.state_dict(keep_vars=True).items()}

    def _set_master(self, target: torch.Tensor, value: torch.Tensor) -> None:
        if self.planes is not None and target in self.planes:
            self.planes.write(target, value)
        else:
            super()._set_master(target, value)

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
        """After a resume: drop stale GPU copies (chunks kept on the GPU are refreshed)."""
        for idx in range(len(self.masters)):
            self._refresh_copies(idx)
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
        # the compute thread's waits: for the loader to bring a chunk in, for the gradient path, and
        # for the optimizer's update of a chunk
        loads = self._load_wait_s
        thread = {"load": loads["F"] + loads["B"], "grad": self.grads.wait_s, "update": self._opt_wait_s}
        out["thread_wait_s_total"] = sum(thread.values())
        if self.idle is not None:  # on a GPU, a stall is the GPU idle across those waits
            self.idle.harvest()
            sec = self.idle.seconds
            fwd, bwd = sec["load_F"], sec["load_B"]
            stall = {"load": fwd + bwd, "grad": sec["grad"]}
            exposed = sec["update"] + sec["optimizer"]
        else:  # no GPU: the waits themselves
            fwd, bwd = loads["F"], loads["B"]
            stall, exposed = {"load": thread["load"], "grad": thread["grad"]}, thread["update"]
        # which loads the GPU waited for: the forward's or the backward's (the two halves of a pass)
        out["stall_load_fwd_s_total"], out["stall_load_bwd_s_total"] = fwd, bwd
        out["stall_load_s_total"] = stall["load"]
        out["stall_grad_s_total"] = stall["grad"]
        out["stall_s_total"] = stall["load"] + stall["grad"]
        out["optimizer_exposed_s_total"] = exposed  # the optimizer's share of the step nothing hid
        if self.comm is not None:
            self.grads.nccl.harvest()
            out["comm_s_total"] = self.grads.nccl.seconds + self.grads.comm_s
        out["optimizer_work_s_total"] = self.adamw.work_s_total
        out["pinned_b"] = ((self.arena.nbytes if self.arena.registered else 0) + self.grads.pinned_b
                           + (self.copies.nbytes if self.copies is not None and self.copies.registered else 0)
                           + (self.adamw.gpu_moments.nbytes if self.adamw.gpu_moments is not None else 0))
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
                if self.copies is not None:
                    self.copies.close()
                self.adamw.gpu_moments_ready.wait()
                if self.adamw.gpu_moments is not None:
                    self.adamw.gpu_moments.close()
                if self.moments is not None:  # scratch: the state that matters is in the checkpoints
                    self.moments.close()
                    self.moments.path.unlink(missing_ok=True)
