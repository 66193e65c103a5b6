"""``runtime.compile_blocks``: the transformer blocks run through one ``torch.compile``d graph.

A block's training forward is :func:`ramgpt.model.block_body`, a function of the block: compiled
once (``fullgraph``, static shapes), it serves all the blocks of a model, whose weights are the
graph's inputs, not constants. So the streamed engine, which hands each block freshly loaded
tensors, compiles two graphs per pass size: the no-grad forward and the recompute with grad (its
backward compiled with it). Inductor fuses the LayerNorms, bias adds, GELU and residual adds, and
the compute thread makes one Python call per block instead of one per operator.

Compiling happens before the first step (:class:`BlockWarmUp`, with the real shapes, beside the
engine's set-up), so that a missing compiler or an unsupported platform shows up there, where the
blocks fall back to eager with a warning, rather than in the middle of a step.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Any

import torch

from ramgpt.errors import is_out_of_memory

BACKEND = "inductor"  # tests on the CPU use "aot_eager": the same tracing without code generation


GRAPH_LIMIT = 64  # graphs per compiled function (dynamo's default, 8, is reached by a few runs in one process)


def compiled_block_body():
    """The compiled :func:`ramgpt.model.block_body` for :data:`BACKEND`, one object per backend:
    dynamo's guards tie a compiled graph to the compiling object, so the warm-up and the engine
    must share it (compilation itself happens at the first call). Locked: the warm-up thread and
    the engine may ask at once, and two objects would compile everything twice."""
    with _LOCK:
        return _compiled(BACKEND)


_LOCK = threading.Lock()


# Inductor's options for the blocks. Pointwise autotuning off: with it, a compile with an empty cache
# benchmarked every candidate config of each pointwise kernel in this process, and their loaded
# kernels stayed, 0.37 GiB of RSS for the whole first run (none on later runs, which load the chosen
# config from the cache). Without it the block's fwd+bwd ran as fast (5.08 against 5.05-5.16 ms on the
# H200 machine), the cold warm-up took 9.8 s against 9.4-15.4 s, and it left 0.06 GiB (round 11)
INDUCTOR_OPTIONS = {"triton.autotune_pointwise": False}


@functools.cache
def _compiled(backend):
    from ramgpt.model import block_body

    if backend == "inductor":  # other backends take no options
        try:
            return torch.compile(block_body, backend=backend, dynamic=False, fullgraph=True, options=INDUCTOR_OPTIONS)
        except RuntimeError:  # a torch that renamed an option ("Unexpected optimization option"): its defaults
            pass
    return torch.compile(block_body, backend=backend, dynamic=False, fullgraph=True)


class CompiledBlocks:
    """What a block calls once the warm-up is done: the compiled graphs where one fits the call,
    eager where none does (a shape or tensor type nobody planned for, e.g. the ``nn.Parameter``
    weights of a chunk kept on the GPU with ``runtime.stream_pin``): never a compilation, or the
    compile-limit error, in the middle of a run."""

    stance = "eager_on_recompile"  # tests: "fail_on_recompile", to prove the warm-up left nothing out

    def __init__(self):
        self.body = compiled_block_body()
        # one context object, entered per call (~6 us on the CPU machine; building one costs ~125 us,
        # 864 calls a step of the 1b); building it also applies it, so the stance is put back at once
        self._stance: Any = contextlib.nullcontext()
        if hasattr(torch.compiler, "set_stance"):  # torch < 2.6: the warm-up fails and the blocks run eager
            self._stance = torch.compiler.set_stance(self.stance)
            self._stance.__exit__(None, None, None)

    def __call__(self, block, x):
        with self._stance:
            return self.body(block, x)


def pass_sizes(n_seqs: int, seqs_per_pass: int, world: int = 1) -> list[int]:
    """The batch sizes of the passes over ``n_seqs`` sequences split over ``world`` ranks
    (``t[rank::world]``: a rank has the ceiling or the floor of its share), each rank's cut into
    passes of ``seqs_per_pass`` and a last shorter one."""
    sizes: set[int] = set()
    for mine in {-(-n_seqs // world), n_seqs // world} - {0}:
        sizes |= {min(seqs_per_pass, mine), mine % seqs_per_pass}
    return sorted(sizes - {0})


class BlockWarmUp(threading.Thread):
    """Compiles the blocks' graphs -- for each training pass size the no-grad forward and the
    recompute with its backward, for each evaluation batch size the forward, as the streamed engine
    runs them (weights as plain tensors in the block's ``_parameters``, the compute dtype and
    autocast) -- on a stand-in block with random weights, in a thread of its own: started before
    the engine places the weights, it compiles meanwhile. Each shape is a graph of its own
    (``dynamic=False``), so none is left to compile in the middle of a run. :meth:`result` waits
    and returns None, or a warning where compiling failed (the blocks must then run eager).
    Running out of memory is not a compile failure: :meth:`result` raises it."""

    TIMINGS: list | None = None  # a list (benchmarks): (what, time.perf_counter()) as the warm-up goes

    def __init__(self, cfg, device: str, dtype: torch.dtype, seq_len: int, train_seqs: list[int],
                 eval_seqs: list[int] = ()):
        super().__init__(name="ramgpt-compile", daemon=True)
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # "cuda" is this thread's current device; the worker's is 0
            dev = torch.device("cuda", torch.cuda.current_device())
        self.cfg, self.dev, self.dtype, self.seq_len = cfg, dev, dtype, seq_len
        self.train_seqs, self.eval_seqs = sorted(set(train_seqs)), sorted(set(eval_seqs) - set(train_seqs))
        # torch.compile's first call imports dynamo (1.5 s): here, before the thread starts. Imported by
        # the thread, beside the engine's set-up, both took longer (page faults and the GIL: the first
        # pass began 1-3 s later on the H200 machine, round 8)
        self.body = compiled_block_body()
        self.warning: str | None = None
        self._error: BaseException | None = None

    def _mark(self, what: str) -> None:
        if self.TIMINGS is not None:
            self.TIMINGS.append((what, time.perf_counter()))

    def _compile(self) -> None:
        self._mark("started")
        import torch._dynamo.config as dynamo_config

        self._mark("imported")

        if not hasattr(torch.compiler, "set_stance"):
            raise RuntimeError(f"needs torch 2.6 or later (torch.compiler.set_stance), this is {torch.__version__}")

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # before 2.7
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), GRAPH_LIMIT))
        with torch.compiler.set_stance("default"):
            self._compile_all()

    def _compile_all(self) -> None:
        from ramgpt.model import Block

        dev, dtype = self.dev, self.dtype
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        gen = torch.Generator(device=dev).manual_seed(0)  # training's own random state stays untouched
        with torch.no_grad():
            with torch.device("meta"):  # no draw from the global generator (the main thread's weights use it)
                block = Block(self.cfg)
            block.to_empty(device=dev)
            weights = []
            for mod in block.modules():
                for leaf, p in list(mod._parameters.items()):
                    t = p.detach().to(dtype).normal_(0.0, 0.02, generator=gen)
                    mod._parameters[leaf] = t  # the engine hands a block plain tensors
                    weights.append(t)

        def autocast():
            return torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

        for seqs in [*self.train_seqs, *self.eval_seqs]:
            x = torch.randn(seqs, self.seq_len, self.cfg.n_embd, device=dev, dtype=dtype, generator=gen)
            with torch.no_grad(), autocast():  # the forward phase of a pass; an evaluation batch
                self.body(block, x)
            self._mark(f"forward {seqs}")
            if seqs not in self.train_seqs:
                continue
            for t in weights:
                t.requires_grad_(True)
            inp = x.detach().requires_grad_(True)
            with torch.enable_grad():  # the recompute and its backward, as ramtorch runs them
                with autocast():
                    out = self.body(block, inp)
                torch.autograd.grad([out], [inp, *weights], grad_outputs=[torch.ones_like(out)])
            self._mark(f"backward {seqs}")
            for t in weights:
                t.requires_grad_(False)
            del x, inp, out
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(self) -> None:
        try:
            self._compile()
        except Exception as e:  # noqa: BLE001 - any failure to compile means: run eager
            if is_out_of_memory(e):  # also where dynamo wrapped it: not a compile failure
                self._error = e
                return
            root, seen = e, {id(e)}  # dynamo wraps the backend's error (BackendCompilerFailed): name the original
            while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None and id(inner) not in seen:
                seen.add(id(inner))
                root = inner
            first = (str(root).strip().splitlines() or [""])[0][:200]
            self.warning = (f"torch.compile of the blocks failed ({type(root).__name__}: {first}); they run "
                            "uncompiled (runtime.compile_blocks: false skips the attempt)")

    def result(self) -> str | None:
        self.join()
        if self._error is not None:
            raise self._error
        return self.warning
