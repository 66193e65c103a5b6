"""The per-term arithmetic of the memory model: GPU memory, CPU RAM, disk and PCIe traffic of a
profile, each a sum of named tensors (pure functions, no torch, no machine access).

Every number here is a sum of named tensors (docs/memory-model.md lists each one and why it
exists); the per-token activation counts follow Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (arXiv:2205.05198), adapted to SDPA/flash attention
(no s^2 score matrix is ever saved) and no dropout. The constants that are not tensor sizes
(CUDA context, allocator fragmentation, torch's own RSS, workspaces) were measured and are
named in :class:`Assumptions`.

The engines (through :mod:`ramgpt.placement`) call :func:`choose_engine` (``runtime.engine=auto``),
:func:`max_seqs_per_pass` (streamed, ``runtime.seqs_per_pass`` unset) and
:func:`largest_micro_batch` (resident). Their ``vram_bytes`` is what the caching allocator may use:
the VRAM budget, or the free memory reported *after* the CUDA context exists
(``torch.cuda.mem_get_info()[0]``). :mod:`ramgpt.memory.report` assembles the user-facing report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from ramgpt.config import ModelConfig, Profile

from ramgpt.placement import resolve_grad_accum

GiB = 2**30
MiB = 2**20

Engine = Literal["resident", "streamed"]


# ---------------------------------------------------------------------------------------------
# assumptions


@dataclass(frozen=True)
class Assumptions:
    """Everything the estimate assumes that is not a tensor shape. Defaults were measured with
    torch 2.11 + CUDA 13 on an H100 80GB (GPU side) and torch 2.13 CPU on 2 cores (CPU side);
    docs/memory-model.md has the measurements."""

    link_gbps: float = 12.0
    """Host<->device copy rate (GB/s) for pinned memory: PCIe 4.0 x8, as on an RTX 3050."""
    link_source: str = "assumed: PCIe 4.0 x8 (RTX 3050 class)"
    cuda_context_bytes: int = 768 * MiB
    """CUDA context + kernel images: outside the caching allocator, so outside the budget.
    Measured 765 MiB on the H100; consumer cards are usually 300-500 MiB."""
    workspace_bytes: int = 64 * MiB
    """cuBLAS/cuDNN workspaces and small buffers the allocator holds (measured 66-69 MB)."""
    headroom_resident: float = 0.10
    """Allocator slack on top of the live peak that a capped (budget) or full card still needs
    (the allocator frees its cache and retries before it reports out of memory), resident
    engine: measured peak reserved / peak allocated 1.03-1.11."""
    headroom_streamed: float = 0.25
    """Same for the streamed engine. Measured under a 5.1 GiB cap on the H100 (1b): a live peak
    of 4.36 GB ran (x1.26 fits), 4.82 GB ran out of memory (x1.14 does not)."""
    frag_resident: float = 0.05
    """Peak reserved / peak allocated with memory to spare, resident engine (measured 1.03-1.11)."""
    frag_streamed: float = 0.35
    """Same for the streamed engine, default allocator (measured 1.28-1.42: streaming chunks of
    different sizes through the cache fragments it); 0.20 with expandable_segments."""
    expandable_segments: bool = False
    fused_adamw: bool = True
    """The engines use ``AdamW(fused=True)``: no optimizer-step temporaries."""
    autocast_weight_cache: bool = True
    """torch.autocast keeps a bf16 copy of every fp32 Linear weight it casts until the autocast
    region ends (the resident engine's forward): L x (12C^2 + 9C) x 2 bytes."""
    streamed_autocast: bool = True
    """The streamed engine runs its bf16 chunks under autocast, so LayerNorms save fp32 copies
    of their inputs (6 extra bytes per token per C in a block) and ln_f's output is fp32."""
    pinned_rounding: Literal["pow2", "exact"] = "pow2"
    """torch's pinned host allocator rounds each allocation up to a power of two (the host-path
    gradient staging slots are such allocations; the bf16 weight copies are one page-locked arena)."""
    pinned_overhead: float = 0.04
    """Extra RSS per pinned byte (driver bookkeeping; measured +4%)."""
    grad_slots: int = 4
    """Pinned D2H staging slots of the streamed engine, each the size of the largest chunk."""
    cpu_baseline_bytes: int = 264 * MiB
    """RSS of a CPU-only process after ``import torch, ramgpt.model`` and a first op
    (torch 2.13 CPU, Python 3.11: bare ``import torch`` is 243 MiB)."""
    cuda_baseline_bytes: int = 1380 * MiB
    """RSS of a CUDA training process before its own tensors (torch 2.11 + CUDA 13 libraries,
    kernels loaded; measured 1357-1414 MiB)."""
    cpu_heap_frag: float = 0.45
    """CPU training: the C allocator keeps freed activations (glibc raises its mmap threshold
    to 32 MiB, so mid-sized tensors come from a heap that fragments); peak RSS exceeds the live
    peak by this share of the transient (activation + loss) bytes. Fitted on five models."""
    cpu_first_step_bytes: int = 90 * MiB
    """CPU training: RSS the first forward/backward/AdamW step adds beyond tensors (oneDNN and
    autograd scratch, thread arenas)."""
    datasets_bytes: int = 90 * MiB
    """RSS added by ``import datasets`` (measured 85 MiB)."""
    wandb_bytes: int = 60 * MiB
    doc_bytes: int = 8 * 1024
    """Average document held in the streaming shuffle buffer."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_ASSUMPTIONS = Assumptions()


# ---------------------------------------------------------------------------------------------
# small records


@dataclass(frozen=True)
class Term:
    """One named line of a breakdown."""

    name: str
    bytes: int
    note: str = ""
    fixed: bool = False  # allocated once at exactly this size (no allocator headroom on it)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": int(self.bytes), "gib": round(self.bytes / GiB, 3), "note": self.note}


def _total(terms: list[Term] | tuple[Term, ...]) -> int:
    return int(sum(t.bytes for t in terms))


@dataclass(frozen=True)
class ChunkSize:
    name: str
    params: int
    tensors: tuple[int, ...]  # element counts of each parameter tensor in the chunk


@dataclass(frozen=True)
class _Dtypes:
    """Bytes per element of the tensors one pass touches."""

    weight: int  # weights the matmuls read (fp32 masters resident, bf16 copies streamed)
    act: int  # matmul inputs/outputs (compute dtype)
    resid: int  # residual stream / chunk boundaries
    ln_in: int  # what LayerNorm saves of its input
    lnf_out: int  # ln_f output fed to the loss


@dataclass(frozen=True)
class GpuEstimate:
    engine: str
    seqs: int  # micro-batch (resident) or seqs_per_pass (streamed)
    tokens: int
    peak_phase: str
    terms: tuple[Term, ...]  # live tensors at the peak phase, then workspaces and headroom
    live_bytes: int
    need_bytes: int  # live + headroom: what must fit the budget
    expected_reserved_bytes: int  # peak reserved when memory is plentiful (no cap)
    context_bytes: int
    activations_checkpointed_bytes: int
    activations_full_bytes: int
    phases: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "seqs": self.seqs,
            "tokens": self.tokens,
            "peak_phase": self.peak_phase,
            "terms": [t.to_dict() for t in self.terms],
            "live_bytes": self.live_bytes,
            "need_bytes": self.need_bytes,
            "expected_reserved_bytes": self.expected_reserved_bytes,
            "context_bytes": self.context_bytes,
            "on_card_bytes": self.need_bytes + self.context_bytes,
            "activations_checkpointed_bytes": self.activations_checkpointed_bytes,
            "activations_full_bytes": self.activations_full_bytes,
            "phases": dict(self.phases),
        }


@dataclass(frozen=True)
class PcieEstimate:
    passes_per_step: int
    h2d_bytes: int
    d2h_bytes: int
    link_gbps: float
    link_source: str
    weight_h2d_bytes: int = 0  # of h2d_bytes: the weights (the rest: gradient sums and token ids)

    @property
    def h2d_s(self) -> float:
        return self.h2d_bytes / (self.link_gbps * 1e9)

    @property
    def d2h_s(self) -> float:
        return self.d2h_bytes / (self.link_gbps * 1e9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes_per_step": self.passes_per_step,
            "h2d_bytes": self.h2d_bytes,
            "d2h_bytes": self.d2h_bytes,
            "link_gbps": self.link_gbps,
            "link_source": self.link_source,
            "weight_h2d_bytes": self.weight_h2d_bytes,
            "h2d_s": round(self.h2d_s, 4),
            "d2h_s": round(self.d2h_s, 4),
            # H2D and D2H use separate copy engines and PCIe is full duplex
            "transfer_s_duplex": round(max(self.h2d_s, self.d2h_s), 4),
            "transfer_s_serial": round(self.h2d_s + self.d2h_s, 4),
        }


@dataclass(frozen=True)
class DiskEstimate:
    model_bytes: int
    optimizer_bytes: int
    small_bytes: int
    keep_last_n: int

    @property
    def per_checkpoint(self) -> int:
        return self.model_bytes + self.optimizer_bytes + self.small_bytes

    @property
    def kept(self) -> int:
        return self.per_checkpoint * self.keep_last_n

    @property
    def worst_case(self) -> int:
        # the best-eval checkpoint is kept too, and a new one is written before the oldest goes
        return self.per_checkpoint * (self.keep_last_n + 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_bytes": self.model_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "small_bytes": self.small_bytes,
            "per_checkpoint_bytes": self.per_checkpoint,
            "keep_last_n": self.keep_last_n,
            "kept_bytes": self.kept,
            "worst_case_bytes": self.worst_case,
        }


# ---------------------------------------------------------------------------------------------
# parameters and chunks


def _block_tensors(cfg: ModelConfig) -> tuple[int, ...]:
    C, b = cfg.n_embd, cfg.bias
    t = [C, 3 * C * C, C * C, C, 4 * C * C, 4 * C * C]  # ln_1.w, c_attn.w, attn.c_proj.w, ln_2.w, c_fc.w, mlp.c_proj.w
    if b:
        t += [C, 3 * C, C, C, 4 * C, C]  # ln_1.b, c_attn.b, attn.c_proj.b, ln_2.b, c_fc.b, mlp.c_proj.b
    return tuple(t)


def chunk_sizes(cfg: ModelConfig) -> list[ChunkSize]:
    """The streamed chunks ``[embed, block_0..block_{L-1}, head]``; the head holds its own copy
    of the (tied) output weight."""
    C, V, P = cfg.n_embd, cfg.vocab_size, cfg.block_size
    blk = _block_tensors(cfg)
    head = (C, V * C) + ((C,) if cfg.bias else ())
    out = [ChunkSize("embed", V * C + P * C, (V * C, P * C))]
    out += [ChunkSize(f"block_{i}", sum(blk), blk) for i in range(cfg.n_layer)]
    out.append(ChunkSize("head", sum(head), head))
    return out


def _linear_params(cfg: ModelConfig) -> int:
    """Weights + biases of the Linear layers in all blocks (what autocast casts and caches)."""
    C = cfg.n_embd
    return cfg.n_layer * (12 * C * C + (9 * C if cfg.bias else 0))


def _block_params(cfg: ModelConfig) -> int:
    return sum(_block_tensors(cfg))


def _param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Same numbers as ``ramgpt.model.count_parameters_by_component`` (checked by a test),
    computed here so that estimating never imports torch."""
    C, V, P = cfg.n_embd, cfg.vocab_size, cfg.block_size
    ln = C * (2 if cfg.bias else 1)
    blocks = cfg.n_layer * _block_params(cfg)
    head = ln + (0 if cfg.tie_embeddings else V * C)
    emb = V * C + P * C
    return {"embeddings": emb, "blocks": blocks, "head": head, "total": emb + blocks + head}


def pinned_bytes(nbytes: int, a: Assumptions = DEFAULT_ASSUMPTIONS) -> int:
    """Host bytes one pinned allocation of ``nbytes`` takes (power-of-two rounding)."""
    if nbytes <= 0:
        return 0
    if a.pinned_rounding == "exact":
        return nbytes
    return 1 << (int(nbytes) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# per-token activation accounting (bytes per token per hidden unit C)


def block_saved_per_token(d: _Dtypes) -> int:
    """Bytes per token per C that one block saves for backward, its input excluded.

    c_attn input (a) + qkv (3a; SDPA saves q, k, v as views of it, plus out and a logsumexp)
    + attention output (a) + c_fc input (a) + GELU input (4a) + c_proj input (4a) = 14a, plus
    the LayerNorms: ln_2 saves its input (the mid-block residual, or an fp32 copy of it under
    autocast) and ln_1 saves the block input itself (counted as the boundary) or a copy of it.
    Korthikanti et al.: 34 sbh + 5 a s^2 b with dropout masks and materialised attention;
    without dropout (-2) and with SDPA (no s^2 terms) it is 32 sbh in bf16, the block input
    (2 sbh) included.
    """
    ln1_copy = 0 if d.ln_in == d.resid else d.ln_in
    return 14 * d.act + d.ln_in + ln1_copy


def block_backward_per_token(d: _Dtypes) -> int:
    """Bytes per token per C live while one block back-propagates (saved tensors of the
    recomputed block, the recompute output, and the MLP's gradients at the GELU backward),
    not counting the incoming gradient. Measured slope on the H100, bf16 without autocast:
    42.3 bytes/token/C including the incoming gradient (this gives 40 + 2)."""
    return block_saved_per_token(d) + 4 * d.act + d.resid


def _dtypes(engine: str, precision_bytes: int, a: Assumptions) -> _Dtypes:
    if precision_bytes == 4:
        return _Dtypes(weight=4, act=4, resid=4, ln_in=4, lnf_out=4)
    if engine == "resident":  # fp32 masters under autocast: residual stream stays fp32
        return _Dtypes(weight=4, act=2, resid=4, ln_in=4, lnf_out=4)
    if a.streamed_autocast:
        return _Dtypes(weight=2, act=2, resid=2, ln_in=4, lnf_out=4)
    return _Dtypes(weight=2, act=2, resid=2, ln_in=2, lnf_out=2)


def _loss_loop_bytes(T: int, C: int, V: int, chunk: int, d: _Dtypes) -> int:
    """Peak of the chunked output layer + cross-entropy loop (ramgpt.loss), with gradients.

    Per chunk of n tokens: fp32 logits (4nV) and logsumexp's temporary (4nV) while the previous
    chunk's softmax grad is still referenced (cast to the compute dtype; in fp32 it *is* the
    previous chunk's logits); then the softmax grad in the compute dtype (a*nV) next to the fp32
    logits, and the V x C weight-grad product (a*VC) with its fp32 copy (4VC)."""
    full, rem = divmod(T, chunk)
    ns = [chunk] * full + ([rem] if rem else [])
    prev_b = 4 if d.act == 4 else d.act
    p_cast = d.act if d.act != 4 else 0
    mm = d.act * V * C + (4 * V * C if d.act != 4 else 0)
    peak = 0
    for i, n in enumerate(ns):
        prev = prev_b * ns[i - 1] * V if i else 0
        peak = max(peak, prev + 8 * n * V, 4 * n * V + p_cast * n * V + mm)
    return peak


def _head_forward_terms(T: int, cfg: ModelConfig, chunk: int, d: _Dtypes) -> list[Term]:
    """Live tensors in the head while the fused loss runs with gradients (its peak)."""
    C, V = cfg.n_embd, cfg.vocab_size
    out = []
    if d.ln_in != d.resid:
        out.append(Term("ln_f saved input (fp32 copy)", T * C * d.ln_in))
    out.append(Term("ln_f output", T * C * d.lnf_out))
    if d.lnf_out != d.act:
        out.append(Term("hidden states in compute dtype", T * C * d.act))
    if d.weight != d.act:
        out.append(Term("output weight in compute dtype", V * C * d.act))
    out.append(Term("grad of hidden states (saved)", T * C * d.act))
    out.append(Term("fp32 grad of the output weight (V x C x 4)", V * C * 4))
    n = min(chunk, T)
    out.append(Term(f"loss chunk: logits + softmax grad ({n} tokens)", _loss_loop_bytes(T, C, V, chunk, d)))
    return out


# ---------------------------------------------------------------------------------------------
# GPU: resident engine


def _precision_bytes(profile: Profile, device: str) -> int:
    p = profile.runtime.precision
    if p == "fp32" or device == "cpu":
        return 4
    return 2


def _resident_phases(
    profile: Profile, mb: int, device: str, a: Assumptions, checkpointing: bool | None = None
) -> tuple[dict[str, list[Term]], int, int]:
    """Live terms at each candidate peak of the resident engine, plus the activation totals
    (checkpointed, full) for the report."""
    cfg = profile.model
    C, L = cfg.n_embd, cfg.n_layer
    pb = _precision_bytes(profile, device)
    d = _dtypes("resident", pb, a)
    ckpt = profile.runtime.gradient_checkpointing and device != "cpu" if checkpointing is None else checkpointing
    T = mb * profile.data.seq_len
    N = _param_counts(cfg)["total"]
    chunk = profile.runtime.loss_chunk_tokens

    static = [
        Term("fp32 weights", 4 * N),
        Term("fp32 gradients", 4 * N),
        Term("AdamW state (exp_avg + exp_avg_sq, fp32)", 8 * N),
    ]
    cache = []
    if d.act == 2 and a.autocast_weight_cache:
        cache = [Term("autocast bf16 weight cache (forward)", _linear_params(cfg) * d.act)]
    ids = Term("token ids + targets", 2 * T * 8)
    per_block_full = block_saved_per_token(d) + (d.resid if d.ln_in == d.resid else 0)
    act_ckpt = (L + 1) * T * C * d.resid
    act_full = L * T * C * per_block_full + T * C * d.resid
    head = _head_forward_terms(T, cfg, chunk, d)
    if ckpt:
        acts = Term(f"block inputs kept for recompute ({L + 1} x tokens x C x {d.resid})", act_ckpt)
    else:
        acts = Term(f"saved activations, all {L} blocks ({per_block_full} B/token/C each)", act_full)
    phases: dict[str, list[Term]] = {}
    phases["forward (loss)"] = [*static, *cache, ids, acts, *head]

    # backward of the last block (checkpointed: recompute + grads of one block)
    blk = _block_params(cfg)
    bwd_acts = Term(
        f"one block recomputed + its backward ({block_backward_per_token(d)} B/token/C)",
        T * C * block_backward_per_token(d)
        if ckpt
        else T * C * (block_backward_per_token(d) - block_saved_per_token(d)),
    )
    phases["backward (last block)"] = [
        *static,
        ids,
        Term("block inputs (boundaries)", L * T * C * d.resid)
        if ckpt
        else Term("saved activations", act_full - T * C * d.resid),
        Term("incoming gradient", T * C * d.resid),
        bwd_acts,
        Term("block weights in compute dtype + grad temporaries", blk * (d.act if d.act != 4 else 0) + 2 * blk * d.act),
    ]
    opt = [*static]
    if not a.fused_adamw:
        opt.append(Term("AdamW foreach temporaries", 4 * N))
    phases["optimizer step"] = opt
    return phases, act_ckpt, act_full


def _finish_gpu(
    engine: str, seqs: int, tokens: int, phases: dict[str, list[Term]], act_ckpt: int, act_full: int, a: Assumptions
) -> GpuEstimate:
    totals = {k: _total(v) for k, v in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k])
    live = totals[peak_phase] + a.workspace_bytes
    share = a.headroom_resident if engine == "resident" else a.headroom_streamed
    fixed = sum(t.bytes for t in phases[peak_phase] if t.fixed)
    headroom = int((live - fixed) * share)
    terms = (
        *phases[peak_phase],
        Term("cuBLAS/cuDNN workspaces", a.workspace_bytes),
        Term(f"allocator headroom (+{share:.0%} of the live peak{' but the fixed buffers' if fixed else ''})", headroom),
    )
    frag = a.frag_resident if engine == "resident" else (0.20 if a.expandable_segments else a.frag_streamed)
    return GpuEstimate(
        engine=engine,
        seqs=seqs,
        tokens=tokens,
        peak_phase=peak_phase,
        terms=terms,
        live_bytes=live,
        need_bytes=live + headroom,
        expected_reserved_bytes=int(live * (1 + frag)),
        context_bytes=a.cuda_context_bytes,
        activations_checkpointed_bytes=act_ckpt,
        activations_full_bytes=act_full,
        phases={k: v + a.workspace_bytes for k, v in totals.items()},
    )


def resident_gpu(
    profile: Profile,
    micro_batch: int | None = None,
    *,
    a: Assumptions = DEFAULT_ASSUMPTIONS,
    checkpointing: bool | None = None,
) -> GpuEstimate:
    """GPU memory of the resident engine (weights, grads and AdamW on the card)."""
    mb = micro_batch or profile.optim.micro_batch_size
    phases, ac, af = _resident_phases(profile, mb, "cuda", a, checkpointing)
    return _finish_gpu("resident", mb, mb * profile.data.seq_len, phases, ac, af, a)


# ---------------------------------------------------------------------------------------------
# GPU: streamed engine


def _host_copies(profile: Profile) -> bool:
    """The streamed engine keeps host bf16 copies (``runtime.host_bf16_copies``, not in fp32)."""
    return profile.runtime.host_bf16_copies and _precision_bytes(profile, "cuda") < 4


def split_chunks(profile: Profile, gpus: int = 1) -> set[int]:
    """The chunks whose fp32 masters the streamed engine keeps as two 16-bit halves, the GPU loading
    the bf16 one (``runtime.split_masters``: bf16 compute -- ``auto`` counted as bf16 --, one process,
    no host copies; true: all; auto: all where a C compiler is found for the CPU's kernel
    (:func:`ramgpt.toolchain.compiler_found`), else the chunks the GPU updates)."""
    from ramgpt.memory.timing import gpu_update_share
    from ramgpt.placement import gpu_update_chunks
    from ramgpt.toolchain import compiler_found

    rt = profile.runtime
    if gpus != 1 or rt.split_masters is False or rt.precision not in ("auto", "bf16") or _host_copies(profile):
        return set()
    chunks = chunk_sizes(profile.model)
    if rt.split_masters is True or compiler_found():
        return set(range(len(chunks)))
    owned = [c.params for c in chunks]
    if profile.model.tie_embeddings:  # the head's copy of the embedding is the embed chunk's to update
        owned[-1] -= profile.model.vocab_size * profile.model.n_embd
    return set(gpu_update_chunks(owned, gpu_update_share(profile, "cuda")))


def _load_bytes(profile: Profile, gpus: int = 1) -> list[int]:
    """Bytes each chunk's load brings over the link: the compute dtype where the host holds it
    (host copies, split masters; the head's tied embedding is split with the embed chunk), else the
    fp32 masters (cast on the GPU)."""
    pb = _precision_bytes(profile, "cuda")
    chunks = chunk_sizes(profile.model)
    if pb == 4 or _host_copies(profile):
        return [c.params * pb for c in chunks]
    split = split_chunks(profile, gpus)
    out = [c.params * (pb if i in split else 4) for i, c in enumerate(chunks)]
    if profile.model.tie_embeddings:
        wte = profile.model.vocab_size * profile.model.n_embd
        head = len(chunks) - 1
        out[-1] = (chunks[-1].params - wte) * (pb if head in split else 4) + wte * (pb if 0 in split else 4)
    return out


def casts_on_gpu(profile: Profile, gpus: int = 1) -> bool:
    """Some chunk arrives as fp32 masters and is cast on the GPU (a compute dtype below fp32, no host
    copies, not every chunk split)."""
    return _load_bytes(profile, gpus) != [c.params * 2 for c in chunk_sizes(profile.model)]


def _evenly_pinned(n: int, k: int) -> set[int]:
    # same choice as ramtorch.offload_simulator.evenly_pinned
    k = min(k, n)
    return {i * n // k for i in range(k)} if k else set()


def _window_bytes(sizes: list[int], streamed: list[int], window: int) -> int:
    """The load slots: ``window`` device buffers, each the size of the largest streamed chunk
    (the engine loads every chunk into one of them, allocated once)."""
    if not streamed:
        return 0
    return min(window, len(streamed)) * max(sizes[i] for i in streamed)


def streamed_gpu(profile: Profile, seqs_per_pass: int, *, a: Assumptions = DEFAULT_ASSUMPTIONS,
                 gpus: int = 1) -> GpuEstimate:
    """GPU memory of the streamed engine for ``seqs_per_pass`` sequences per weight pass (per GPU of ``gpus``)."""
    cfg = profile.model
    rt = profile.runtime
    C, L = cfg.n_embd, cfg.n_layer
    pb = _precision_bytes(profile, "cuda")
    d = _dtypes("streamed", pb, a)
    S = seqs_per_pass
    T = S * profile.data.seq_len
    chunks = chunk_sizes(cfg)
    n = len(chunks)
    sizes = [c.params * d.weight for c in chunks]
    pinned = _evenly_pinned(n, rt.stream_pin)
    streamed = [i for i in range(n) if i not in pinned]
    window = Term(
        f"streamed weight window ({rt.stream_window} load slots of the largest chunk, bf16)",
        _window_bytes(sizes, streamed, rt.stream_window), fixed=True,
    )
    pins = []
    if pinned:
        pb_ = sum(sizes[i] for i in pinned)
        pins.append(Term(f"pinned chunks ({len(pinned)}) + their GPU grad accumulators", 2 * pb_))
    ids = Term("token ids + targets", 2 * T * 8)
    if d.weight < 4 and casts_on_gpu(profile, gpus):  # fp32 masters arrive through fp32 scratch and are cast
        big = max(max(c.tensors) for c in chunks)
        pins.append(Term("fp32 scratch of the loads being cast (3 pieces)", 3 * 4 * min(big, 8 * 2**20), fixed=True))
    bnd = T * C * d.resid
    head_grads = Term("head chunk grads (in flight to the host)", sizes[-1] if (n - 1) not in pinned else 0)
    blk = sizes[1] if L else 0
    phases: dict[str, list[Term]] = {}
    phases["head recompute (loss)"] = [
        window,
        *pins,
        ids,
        Term(f"chunk-boundary activations ({L + 1} x {S} seqs)", (L + 1) * bnd),
        *_head_forward_terms(T, cfg, rt.loss_chunk_tokens, d),
    ]
    phases["backward (last block)"] = [
        window,
        *pins,
        ids,
        Term(f"chunk-boundary activations ({L} x {S} seqs)", L * bnd),
        Term("incoming gradient", bnd),
        Term(
            f"one block recomputed + its backward ({block_backward_per_token(d)} B/token/C)",
            T * C * block_backward_per_token(d),
        ),
        Term("block grads (bf16) + backward temporaries/workspaces (measured)", 5 * blk),
        head_grads,
    ]
    if resolve_grad_accum(rt.grad_accum, "cuda") == "device":
        # runtime.grad_accum=device: the side stream's fp32 scratch (two 64 MiB pieces) and one
        # more chunk's bf16 grads kept alive until the side stream has read them (the largest
        # chunk is the head/embedding).
        largest = max(c.params for c in chunks)
        phases["backward (last block)"].append(
            Term("fp32 accumulation scratch + a chunk's grads in flight (grad_accum=device)",
                 2 * 64 * 2**20 + 2 * largest)
        )
    act_ckpt = (L + 1) * bnd
    act_full = L * T * C * (block_saved_per_token(d) + d.resid) + bnd
    return _finish_gpu("streamed", S, T, phases, act_ckpt, act_full, a)


# ---------------------------------------------------------------------------------------------
# searches the engines call


def _fits(need: int, vram_bytes: int) -> bool:
    return need <= vram_bytes


def _largest(fn, hi: int) -> int:
    """Largest k in [1, hi] with fn(k) True, for a monotone fn; 0 when fn(1) is False."""
    if hi < 1 or not fn(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fn(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_seqs_per_pass(profile: Profile, vram_bytes: int, *, a: Assumptions = DEFAULT_ASSUMPTIONS) -> int:
    """Largest sequences per weight pass (at most ``optim.seqs_per_step``) whose streamed-engine
    peak, with allocator headroom, fits ``vram_bytes``; 0 when not even one fits."""
    return _largest(lambda s: _fits(streamed_gpu(profile, s, a=a).need_bytes, vram_bytes), profile.optim.seqs_per_step)


def largest_micro_batch(profile: Profile, vram_bytes: int, *, a: Assumptions = DEFAULT_ASSUMPTIONS) -> int:
    """Largest resident-engine micro-batch (at most ``optim.seqs_per_step``) that fits
    ``vram_bytes``; 0 when not even one sequence fits."""
    return _largest(lambda b: _fits(resident_gpu(profile, b, a=a).need_bytes, vram_bytes), profile.optim.seqs_per_step)


def choose_engine(profile: Profile, vram_bytes: int | None, *, a: Assumptions = DEFAULT_ASSUMPTIONS) -> Engine:
    """``runtime.engine`` when it is explicit; for ``auto``: resident when the resident estimate
    (at ``optim.micro_batch_size``) fits ``vram_bytes``, else streamed. No GPU (None) -> resident."""
    if profile.runtime.engine != "auto":
        return profile.runtime.engine  # type: ignore[return-value]
    if not vram_bytes or vram_bytes <= 0:
        return "resident"
    if resident_gpu(profile, a=a).need_bytes <= vram_bytes:
        return "resident"
    return "streamed"


# ---------------------------------------------------------------------------------------------
# PCIe


def _belady_loads(sizes: list[int], streamed: list[int], window: int, passes: int) -> int:
    """Bytes loaded host->device in one optimizer step: ``passes`` times the itinerary
    F(0..n-1), B(n-1..0) over the streamed chunks, ``window`` slots (the chunk in use
    included), farthest-next-use eviction (ramtorch's policy), starting empty because the
    engine drops GPU copies after each optimizer step."""
    if not streamed:
        return 0
    itin = (streamed + streamed[::-1]) * passes
    n = len(itin)
    nxt = [n] * n  # position of the next use of itin[pos] after pos
    last: dict[int, int] = {}
    for pos in range(n - 1, -1, -1):
        nxt[pos] = last.get(itin[pos], n)
        last[itin[pos]] = pos
    resident: dict[int, int] = {}  # chunk -> its next use
    loaded = 0
    for pos, c in enumerate(itin):
        if c not in resident:
            loaded += sizes[c]
            if len(resident) >= window:
                victim = max(resident, key=lambda k: resident[k])
                del resident[victim]
        resident[c] = nxt[pos]
    return loaded


def pcie_per_step(
    profile: Profile, seqs_per_pass: int, engine: str, *, a: Assumptions = DEFAULT_ASSUMPTIONS, gpus: int = 1
) -> PcieEstimate:
    """Host<->device bytes of one optimizer step (of each GPU of ``gpus``: several keep the masters whole)."""
    seq = profile.data.seq_len
    per_step = profile.optim.seqs_per_step
    if engine != "streamed":
        tokens = per_step * seq
        return PcieEstimate(
            passes_per_step=math.ceil(per_step / max(1, profile.optim.micro_batch_size)),
            h2d_bytes=2 * tokens * 8,
            d2h_bytes=0,
            link_gbps=a.link_gbps,
            link_source=a.link_source,
        )
    cfg = profile.model
    pb = _precision_bytes(profile, "cuda")
    chunks = chunk_sizes(cfg)
    sizes = [c.params * pb for c in chunks]  # the gradients leave in the compute dtype
    # the fp32 masters arrive (cast to bf16 on the GPU), or their bf16 halves (runtime.split_masters),
    # or runtime.host_bf16_copies' copies
    loads = _load_bytes(profile, gpus)
    pinned = _evenly_pinned(len(chunks), profile.runtime.stream_pin)
    streamed = [i for i in range(len(chunks)) if i not in pinned]
    passes = math.ceil(per_step / max(1, seqs_per_pass))
    weights = _belady_loads(loads, streamed, profile.runtime.stream_window, passes)
    h2d = weights + 2 * per_step * seq * 8
    d2h = passes * sum(sizes[i] for i in streamed)
    if resolve_grad_accum(profile.runtime.grad_accum, "cuda") == "device":
        # each pass's sums come back as fp32, and every pass after the first brings them in first;
        # in the first pass a tied embedding's second contribution (the embed chunk, after the
        # head's) is brought in and added too
        fp32 = sum(c.params for c in chunks) * 4
        d2h = passes * fp32
        h2d += (passes - 1) * fp32 + (cfg.vocab_size * cfg.n_embd * 4 if cfg.tie_embeddings else 0)
    return PcieEstimate(passes, h2d, d2h, a.link_gbps, a.link_source, weights)


# ---------------------------------------------------------------------------------------------
# CPU RAM


def _data_terms(profile: Profile, seqs: int, a: Assumptions) -> list[Term]:
    d = profile.data
    out = [Term("batch buffers (ids + targets, prefetch x2)", 2 * 2 * seqs * d.seq_len * 8)]
    if d.source in ("hub", "json", "parquet"):
        out.append(Term("datasets library", a.datasets_bytes))
        out.append(
            Term(
                f"shuffle buffer ({d.shuffle_buffer} docs x {a.doc_bytes // 1024} KiB assumed)",
                d.shuffle_buffer * a.doc_bytes,
            )
        )
    else:
        out.append(Term("corpus + tokenizer in memory", 4 * MiB))
    if profile.logging.use_wandb:
        out.append(Term("wandb client", a.wandb_bytes))
    return out


def _cpu_terms(profile: Profile, engine: str, device: str, seqs: int, a: Assumptions, gpus: int = 1) -> list[Term]:
    """Host RAM of one node. ``gpus`` > 1: one process per GPU; the streamed engine keeps its
    masters and AdamW state once per node in shared memory and splits the gradient
    accumulators among the processes (each keeps its own chunks'), so only the per-process
    baseline grows with the GPU count."""
    cfg = profile.model
    N = _param_counts(cfg)["total"]
    out: list[Term] = []
    if device == "cpu":
        out.append(Term("Python + torch baseline (CPU build)", a.cpu_baseline_bytes))
        phases, _, _ = _resident_phases(profile, seqs, "cpu", a)
        name = max(phases, key=lambda k: _total(phases[k]))
        static = {"fp32 weights", "fp32 gradients", "AdamW state (exp_avg + exp_avg_sq, fp32)"}
        transient = 0
        for t in phases[name]:
            out.append(Term(t.name, t.bytes, f"peak phase: {name}"))
            transient += 0 if t.name in static else t.bytes
        out.append(Term("C heap fragmentation (freed activations kept; measured)", int(transient * a.cpu_heap_frag)))
        out.append(Term("first-step overhead (oneDNN/autograd scratch; measured)", a.cpu_first_step_bytes))
        if not a.fused_adamw:
            largest = max(max(c.tensors) for c in chunk_sizes(cfg))
            out.append(Term("AdamW per-tensor temporaries", 2 * 4 * largest))
    elif engine == "resident":
        out.append(Term("Python + torch + CUDA libraries baseline" + (f" (x {gpus} processes)" if gpus > 1 else ""),
                        a.cuda_baseline_bytes * gpus))
        out.append(
            Term(
                "checkpoint save: model + AdamW state copied to CPU",
                12 * N,
                "the fp32 model is built on the CPU first (4N)",
            )
        )
    else:
        out.append(Term("Python + torch + CUDA libraries baseline" + (f" (x {gpus} processes)" if gpus > 1 else ""),
                        a.cuda_baseline_bytes * gpus))
        shared = " (once per node, shared by its processes)" if gpus > 1 else ""
        # the GPU loads the masters themselves (cast to bf16 there) or their bf16 halves: they are
        # page-locked in place
        chunks = chunk_sizes(cfg)
        split = split_chunks(profile, gpus)
        part = min(1.0, sum(c.params for i, c in enumerate(chunks) if i in split) / N)
        halves = f" ({part:.0%} as two 16-bit halves: runtime.split_masters)" if split else ""
        out.append(Term("fp32 master weights, page-locked" + halves + shared, int(4 * N * (1 + a.pinned_overhead)),
                        f"{4 * N / GiB:.2f} GiB of tensors in one page-locked arena"))
        out.append(Term("fp32 gradient accumulators" + (" (each process keeps its own chunks')" if gpus > 1 else ""),
                        4 * N))
        if profile.runtime.optimizer_on_disk:
            # low-RAM mode: the moments are a memory-mapped file; one chunk's update pages its moments in
            # (and the next chunk's are read ahead) before they are handed back to the OS
            biggest = sorted((c.params for c in chunks), reverse=True)[:2]
            out.append(Term("AdamW state paged in (2 chunks' exp_avg + exp_avg_sq; the rest on disk)",
                            8 * sum(biggest), f"{8 * N / GiB:.2f} GiB in the moments file"))
        else:
            from ramgpt.memory.timing import gpu_update_share

            share = gpu_update_share(profile, "cuda") if gpus == 1 else 0.0
            out.append(Term("AdamW state (exp_avg + exp_avg_sq, fp32)", int(8 * N * (1 + share * a.pinned_overhead)),
                            f"{share:.0%} of it page-locked (the GPU's share of the update)" if share else ""))
        pb = _precision_bytes(profile, "cuda")
        if _host_copies(profile) and gpus == 1:
            exact = sum(c.params * pb for c in chunks)
            out.append(Term("page-locked bf16 copies of every chunk, wte twice (runtime.host_bf16_copies)",
                            int(exact * (1 + a.pinned_overhead)), f"{exact / GiB:.2f} GiB of tensors in one arena"))
        slot = max(sum(-(-t * pb // 64) * 64 for t in c.tensors) for c in chunks)
        n_slots = max(2, min(a.grad_slots, len(chunks)))
        # grad_accum=device page-locks the fp32 grads in place (counted above): no staging ring
        if resolve_grad_accum(profile.runtime.grad_accum, "cuda") == "host":
            out.append(
                Term(
                    f"pinned gradient staging ({n_slots} slots x largest chunk)",
                    int(n_slots * pinned_bytes(slot, a) * (1 + a.pinned_overhead)),
                )
            )
    out += _data_terms(profile, seqs, a)
    return out


# ---------------------------------------------------------------------------------------------
# disk


def disk_per_checkpoint(profile: Profile) -> DiskEstimate:
    """model.safetensors (fp32, tied weight once) + optimizer.safetensors (2 x fp32) + JSON
    files and the tokenizer."""
    cfg = profile.model
    N = _param_counts(cfg)["total"]
    n_tensors = 4 + 12 * cfg.n_layer + (3 if cfg.bias else 2)
    model = 4 * N + 128 * n_tensors + 8
    opt = 8 * N + 2 * 128 * n_tensors + 8
    tok = 4 * MiB if profile.data.tokenizer != "embedded" else 512 * 1024
    small = tok + 256 * 1024  # optimizer.json, meta.json (config dump, RNG states, hashes)
    return DiskEstimate(model, opt, small, profile.checkpoint.keep_last_n)


