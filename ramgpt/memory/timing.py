"""How long a step, and the whole run, will take: a pure projection from FLOPs, bytes and rates.

Per optimizer step::

    compute  = FLOPs per token x tokens per step / (matmul rate x efficiency)
    transfer = the larger of the step's H2D and D2H bytes over the link     (streamed engine)
    host_acc = each pass's bf16 gradients added into the fp32 accumulators on the CPU
               (streamed engine with runtime.grad_accum=host only)
    step     = max(compute, transfer, host_acc) + CPU optimizer

The three terms inside ``max`` overlap (copy engines and the CPU worker run beside the compute
stream); the CPU optimizer does not (the next step's first pass needs its weights).

FLOPs per token are ``6N + 12·L·C·T`` (PaLM, appendix B: forward 2N + 4LCT for the matmuls with
the weights and QK^T/AV over the whole context, backward twice that), with ``N`` every parameter
but the position table (the tied ``wte`` counts once, as the output layer), plus what is computed
twice: the streamed engine recomputes every chunk's forward in backward (+2N + 4LCT), the resident
engine with per-block checkpointing every block's forward (+2N_blocks + 4LCT), the CPU keeps all
activations (nothing). Causal attention kernels skip half of the context, but the convention (and
the measured efficiencies below) count all of it.

The rates come from a short measurement on this machine (:func:`ramgpt.probe.measure_speed`:
a bf16 GEMM of the model's MLP shape and pinned copies) or from a named card class
(:data:`CARDS`, figures stated). Nothing here imports torch or looks at the machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ramgpt import toolchain
from ramgpt.memory.terms import (
    PcieEstimate,
    _host_copies,
    _param_counts,
    casts_on_gpu,
    chunk_sizes,
    split_chunks,
)
from ramgpt.placement import resolve_grad_accum

if TYPE_CHECKING:  # pragma: no cover
    from ramgpt.config import ModelConfig, Profile
    from ramgpt.probe import Speed

Recompute = Literal["none", "blocks", "all"]

DAY_S = 86400.0


# ---------------------------------------------------------------------------------------------
# what is assumed


@dataclass(frozen=True)
class CardClass:
    """A GPU one can plan for without owning it. ``bf16_tflops`` is the peak dense bf16 tensor
    rate with fp32 accumulation (GeForce cards run it at half their fp16-accumulate rate);
    ``link_gbps`` what pinned copies reach over the card's PCIe link. ``host_threads``: the CPU
    threads of the machine such a card comes in (data-centre cards are rented with their host);
    None for a desktop card, planned with this machine's CPU."""

    key: str
    name: str
    vram_gib: float
    bf16_tflops: float
    link_gbps: float
    link: str
    source: str
    capability: tuple[int, int] = (8, 6)
    host_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_GEFORCE = "NVIDIA spec sheet: tensor cores x boost clock x 128 dense bf16 FLOP/clock/core (fp32 accumulate)"

CARDS: dict[str, CardClass] = {
    c.key: c
    for c in (
        CardClass("rtx3050-6gb", "NVIDIA GeForce RTX 3050 6GB", 6.0, 13.5, 12.0, "PCIe 4.0 x8",
                  f"{_GEFORCE}: 72 x 1.47 GHz"),
        CardClass("rtx3060-12gb", "NVIDIA GeForce RTX 3060 12GB", 12.0, 25.5, 24.0, "PCIe 4.0 x16",
                  f"{_GEFORCE}: 112 x 1.78 GHz"),
        CardClass("rtx4060-8gb", "NVIDIA GeForce RTX 4060 8GB", 8.0, 30.2, 12.0, "PCIe 4.0 x8",
                  f"{_GEFORCE}: 96 x 2.46 GHz", (8, 9)),
        CardClass("h100", "NVIDIA H100 80GB HBM3 (SXM)", 79.6, 989.0, 54.0, "PCIe 5.0 x16",
                  "NVIDIA H100 datasheet, dense bf16; link measured on the H100 machine (docs/benchmarks.md)", (9, 0), 16),
        CardClass("h200", "NVIDIA H200 141GB", 140.0, 989.0, 55.0, "PCIe 5.0 x16",
                  "NVIDIA H200 datasheet, dense bf16; link measured on the H200 machine (docs/benchmarks.md)", (9, 0), 16),
        CardClass("a100", "NVIDIA A100 80GB", 80.0, 312.0, 25.0, "PCIe 4.0 x16", "NVIDIA A100 datasheet, dense bf16",
                  (8, 0), 16),
        CardClass("l4", "NVIDIA L4 24GB", 24.0, 121.0, 25.0, "PCIe 4.0 x16", "NVIDIA L4 datasheet, dense bf16", (8, 9), 8),
        CardClass("a10", "NVIDIA A10 24GB", 24.0, 125.0, 25.0, "PCIe 4.0 x16", "NVIDIA A10 datasheet, dense bf16",
                  (8, 6), 8),
    )
}


def card_for_gpu(gpu_name: str) -> CardClass | None:
    """The card class a device name (as torch or NVML report it) belongs to, e.g. "NVIDIA H200"
    -> h200, "NVIDIA GeForce RTX 3050 6GB Laptop GPU" -> rtx3050-6gb; None when unknown."""
    name = gpu_name.upper().replace(" ", "")
    for card in CARDS.values():
        model = card.key.split("-")[0].upper()  # "RTX3050", "H100", "A10"
        if model in name and not (model == "A10" and "A100" in name):
            return card
    return None


@dataclass(frozen=True)
class SpeedAssumptions:
    """The rates the projection assumes where it does not measure, each with its source."""

    card_efficiency: float = 0.40
    """Share of a card class's peak dense bf16 rate a whole training step sustains (matmuls,
    attention, LayerNorm/GELU, the loss, launch gaps). H100, 1b: streamed 35.5k tokens/s and
    resident 40.6k tokens/s both did 0.40-0.41 x 989 TFLOP/s counting the recompute."""
    measured_efficiency_gpu: float = 0.60
    """Share of the measured bf16 GEMM rate (the model's MLP shape) a whole step sustains on a GPU."""
    measured_efficiency_cpu: float = 0.60
    """Share of the measured fp32 GEMM rate a whole step sustains on the CPU (a 4-layer, 512-wide
    model at seq 256 on a loaded 2-core machine: 0.6-0.7)."""
    adamw_params_per_thread_s: float = 1.1e9 / 0.26 / 16
    """Fused CPU AdamW over fp32 masters where it is not measured (``--card``): 1.1 B parameters
    took 0.26 s on 16 threads (H200 machine; 0.28 s re-measured)."""
    optimizer_rest_ratio: float = 0.5
    """The streamed engine's chunk-by-chunk update (fused AdamW with the clip folded in, in a
    worker thread beside the loads of the next forward) per second of a standalone fused AdamW,
    minus one."""
    bf16_refresh_ratio: float = 0.11 / 0.26
    """``runtime.host_bf16_copies``: refreshing the copies after each chunk's update, per second of
    AdamW (H200 machine: 0.11 s for the 1b against 0.26 s of AdamW)."""
    split_masters_ratio: float = 1.7
    """``runtime.split_masters`` without the CPU's kernel (no C compiler): joining each piece of the
    CPU's share into fp32 before torch's update and splitting it after, per second of AdamW (2-core
    CPU machine: 1M-element pieces, join + split 1.7 times the fused AdamW between them; 2.3 on the
    H200 machine's 16 threads, round 10)."""
    split_native_ratio: float = 0.05
    """The same with the CPU's kernel (:mod:`ramgpt.engine.native`, join, update and split in one
    pass), per second of AdamW over whole masters: 1/0.957 - 1 on 16 threads of the H200 machine,
    none on 8 (0.44 G parameters; round 10)."""
    host_accum_params_per_thread_s: float = 1.1e9 / 0.69 / 16
    """``runtime.grad_accum=host``: the CPU worker's bf16 -> fp32 add, 0.69 s per pass of the 1b on
    16 cores (H100 machine, round 1)."""
    link_efficiency: float = 0.65
    """Share of the measured pinned-copy rate the streamed engine's loads reach while training,
    beside the gradient path's copies: fitted to round 4's final call on the H200 machine (the
    loads' own copies timed at 41 of 53.7 GB/s; with 0.65 the projected step of the default,
    fp32-loading engine is within 7% of the measured one, of the host-copies one within 3%)."""
    max_threads: int = 16
    """The CPU rates were measured on 16 threads; more threads are counted as 16 (memory
    bandwidth, not cores, bounds these loops)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_SPEED = SpeedAssumptions()


@dataclass(frozen=True)
class Rates:
    """What the projection runs on: a dense matmul rate and the share of it a whole step sustains,
    the CPU threads for the optimizer, and where the numbers come from."""

    device: Literal["cuda", "cpu"]
    matmul_tflops: float
    efficiency: float
    threads: int
    source: str
    link_gbps: float | None = None  # the pinned link, when measured or assumed with a card
    link_source: str = ""
    adamw_params_per_s: float | None = None  # this CPU's fused AdamW, all threads, when measured

    @property
    def sustained_tflops(self) -> float:
        return self.matmul_tflops * self.efficiency

    @classmethod
    def from_card(cls, card: CardClass, threads: int, a: SpeedAssumptions = DEFAULT_SPEED) -> Rates:
        """The card's stated figures; the CPU is this machine's (``threads``) unless the card
        class comes with its host."""
        host = f", its host's {card.host_threads} CPU threads" if card.host_threads else ""
        return cls(
            "cuda", card.bf16_tflops, a.card_efficiency, card.host_threads or threads,
            f"card class {card.key} (assumed: {card.bf16_tflops:g} TFLOP/s peak dense bf16 x {a.card_efficiency:g}{host})",
            card.link_gbps, f"--card {card.key}: {card.link}, {card.link_gbps:g} GB/s assumed",
        )

    @classmethod
    def from_speed(cls, speed: Speed, threads: int, a: SpeedAssumptions = DEFAULT_SPEED) -> Rates:
        m = speed.matmul
        cuda = m.device.startswith("cuda")
        eff = a.measured_efficiency_gpu if cuda else a.measured_efficiency_cpu
        shape = "x".join(str(x) for x in m.shape)
        link = link_source = None
        adamw = speed.adamw.params_per_s if speed.adamw is not None else None
        if speed.pinned is not None:
            p = speed.pinned
            link = min(p.h2d_gbps, p.d2h_gbps)
            link_source = f"measured pinned copies on {m.device_name}: H2D {p.h2d_gbps:.1f}, D2H {p.d2h_gbps:.1f} GB/s"
        return cls(
            "cuda" if cuda else "cpu", m.tflops, eff, threads,
            f"measured: {m.dtype} matmul {shape} on {m.device_name}, {m.tflops:.3g} TFLOP/s x {eff:g}",
            link, link_source or "", adamw,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sustained_tflops"] = self.sustained_tflops
        return d


# ---------------------------------------------------------------------------------------------
# FLOPs


def recompute_kind(engine: str, device: str, checkpointing: bool) -> Recompute:
    """What a step computes twice: ``all`` (streamed: every chunk's forward again in backward),
    ``blocks`` (resident with per-block checkpointing on a GPU), ``none`` (the CPU keeps everything)."""
    if not device.startswith("cuda"):
        return "none"
    if engine == "streamed":
        return "all"
    return "blocks" if checkpointing else "none"


def flops_per_token(cfg: ModelConfig, seq_len: int, recompute: Recompute = "none") -> float:
    """Training FLOPs per token: ``6N + 12·L·C·T`` plus the recomputed forward (module docstring)."""
    counts = _param_counts(cfg)
    n_mm = counts["total"] - cfg.block_size * cfg.n_embd  # the position table is a lookup, not a matmul
    attn = 4.0 * cfg.n_layer * cfg.n_embd * seq_len  # QK^T and AV, forward, per token
    extra = {"none": 0.0, "blocks": 2.0 * counts["blocks"] + attn, "all": 2.0 * n_mm + attn}[recompute]
    return 6.0 * n_mm + 3.0 * attn + extra


_RECOMPUTE_TEXT = {
    "none": "6N + 12LCT (no recompute)",
    "blocks": "6N + 12LCT + every block's forward again (per-block checkpointing): 2N_blocks + 4LCT",
    "all": "6N + 12LCT + every chunk's forward again (streamed recompute): 2N + 4LCT",
}


# ---------------------------------------------------------------------------------------------
# the projection


@dataclass(frozen=True)
class TimeEstimate:
    """Projected seconds of one optimizer step and of the whole run (``optim.max_steps``)."""

    flops_per_token: float
    flops_counted: str
    tokens_per_step: int
    compute_s: float
    transfer_s: float
    host_accum_s: float
    optimizer_s: float
    step_s: float
    bound: str  # "compute" | "transfer" | "CPU gradient sum"
    max_steps: int
    rates: Rates
    assumptions: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else math.inf

    @property
    def run_s(self) -> float:
        return self.step_s * self.max_steps

    @property
    def run_days(self) -> float:
        return self.run_s / DAY_S

    def lines(self) -> tuple[str, ...]:
        """The projection in sentences, as ``estimate-memory`` and ``doctor`` print it."""
        parts = [f"compute {self.compute_s:.2f} s"]
        if self.transfer_s:
            parts.append(f"transfer {self.transfer_s:.2f} s")
        if self.host_accum_s:
            parts.append(f"CPU gradient sums {self.host_accum_s:.2f} s")
        if self.optimizer_s:
            parts.append(f"+ CPU optimizer {self.optimizer_s:.2f} s")
        return (
            f"step {_secs(self.step_s)} ({self.bound}-bound: {', '.join(parts)}), "
            f"{self.tokens_per_s:,.0f} tokens/s",
            f"{self.max_steps:,} steps (optim.max_steps): {_span(self.run_s)}",
            f"rates: {self.rates.source}",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops_per_token": self.flops_per_token,
            "flops_counted": self.flops_counted,
            "tokens_per_step": self.tokens_per_step,
            "compute_s": self.compute_s,
            "transfer_s": self.transfer_s,
            "host_accum_s": self.host_accum_s,
            "optimizer_s": self.optimizer_s,
            "step_s": self.step_s,
            "bound": self.bound,
            "tokens_per_s": self.tokens_per_s,
            "max_steps": self.max_steps,
            "run_s": self.run_s,
            "run_days": self.run_days,
            "rates": self.rates.to_dict(),
            "assumptions": list(self.assumptions),
        }


def gpu_update_share(profile: Profile, device: str) -> float:
    """The share of the parameters the streamed engine's GPU updates (``runtime.optimizer_gpu_share``
    where the engine allows it: CUDA, ``grad_accum=device``, moments in RAM)."""
    rt = profile.runtime
    if not device.startswith("cuda") or rt.optimizer_on_disk or resolve_grad_accum(rt.grad_accum, device) != "device":
        return 0.0
    return rt.optimizer_gpu_share


def _secs(s: float) -> str:
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min"


def _span(s: float) -> str:
    """``3.4 days`` / ``5.2 hours`` / ``12 minutes``: a run's length as people plan it."""
    if s >= 2 * DAY_S:
        return f"{s / DAY_S:,.1f} days"
    if s >= 2 * 3600:
        return f"{s / 3600:.1f} hours"
    return f"{s / 60:.0f} minutes"


def project_time(
    profile: Profile,
    *,
    engine: str,
    device: str,
    pcie: PcieEstimate | None,
    rates: Rates,
    a: SpeedAssumptions = DEFAULT_SPEED,
) -> TimeEstimate:
    """Step and run time of ``profile`` placed as (``engine``, ``device``) at ``rates``. ``pcie`` is
    the step's host<->device traffic (:func:`ramgpt.memory.pcie_per_step`, its link rate included)."""
    cfg, rt = profile.model, profile.runtime
    cuda = device.startswith("cuda")
    rec = recompute_kind(engine, device, rt.gradient_checkpointing)
    fpt = flops_per_token(cfg, profile.data.seq_len, rec)
    tokens = profile.tokens_per_step
    compute_s = fpt * tokens / (rates.sustained_tflops * 1e12)
    streamed = cuda and engine == "streamed"
    # H2D and D2H use separate copy engines on a full-duplex link: the larger of the two bounds it
    transfer_s = max(pcie.h2d_s, pcie.d2h_s) if (cuda and pcie is not None) else 0.0
    threads = max(1, min(rates.threads, a.max_threads))
    n = _param_counts(cfg)["total"]
    host_accum_s = 0.0
    if streamed and pcie is not None and resolve_grad_accum(rt.grad_accum, device) == "host":
        chunk_params = sum(c.params for c in chunk_sizes(cfg))
        host_accum_s = pcie.passes_per_step * chunk_params / (a.host_accum_params_per_thread_s * threads)
    optimizer_s = 0.0
    adamw_rate = rates.adamw_params_per_s or a.adamw_params_per_thread_s * threads
    if not cuda or streamed:  # the resident engine's fused AdamW on the GPU takes milliseconds
        optimizer_s = n / adamw_rate
        if streamed:
            # the update runs chunk by chunk while the next step's first forward loads each chunk as
            # soon as it is updated: only what outlasts that forward (a quarter of a pass's compute:
            # forward, recomputed forward, backward) is exposed
            passes = pcie.passes_per_step if pcie is not None else 1
            # host copies are refreshed after each update; split masters that the CPU updates (split_masters:
            # true) are joined before and split after it (those the GPU updates cost the CPU nothing)
            split = split_chunks(profile)
            every = bool(split) and len(split) == len(chunk_sizes(cfg))
            extra = (a.bf16_refresh_ratio if _host_copies(profile)
                     else (a.split_native_ratio if toolchain.compiler_found() else a.split_masters_ratio) if every else 0)
            update_s = optimizer_s * (1.0 + a.optimizer_rest_ratio + extra)
            share = gpu_update_share(profile, device)
            if share and pcie is not None:  # the GPU's share streams 16 bytes per parameter in
                update_s = max((1 - share) * update_s, share * n * 16 / (pcie.link_gbps * 1e9))
            optimizer_s = max(0.0, update_s - compute_s / max(passes, 1) / 4)
    overlapped = {"compute": compute_s, "transfer": transfer_s, "CPU gradient sum": host_accum_s}
    if streamed and pcie is not None and pcie.weight_h2d_bytes:
        # a pass is a forward (a quarter of its compute), which loads half the weights, then a
        # backward, which loads the other half and the gradient sums: each phase takes the longer of
        # its compute and its copies, at the share of the link the loads reach while training
        passes = max(pcie.passes_per_step, 1)
        link = pcie.link_gbps * 1e9 * a.link_efficiency
        fwd_c, w = compute_s / passes / 4, pcie.weight_h2d_bytes / passes / 2
        fwd = max(fwd_c, w / link)
        bwd = max(3 * fwd_c, (pcie.h2d_bytes / passes - w) / link, pcie.d2h_bytes / passes / link)
        phased = passes * (fwd + bwd)
        if phased > compute_s * 1.0001:  # the copies outlast the compute in some phase: the passes' time
            overlapped["transfer"] = transfer_s = phased
    bound = max(overlapped, key=lambda k: overlapped[k])
    step_s = overlapped[bound] + optimizer_s
    notes = [
        f"FLOPs per token {fpt / 1e9:.2f} G: {_RECOMPUTE_TEXT[rec]} (N = parameters but the position table)",
        f"sustained {rates.sustained_tflops:.3g} TFLOP/s; {rates.source}",
    ]
    if cuda:
        notes.append(
            f"transfer over {pcie.link_gbps:g} GB/s ({pcie.link_source}), overlapped with compute"
            if pcie is not None and streamed
            else "resident engine: weights stay on the GPU, only token ids cross the link"
        )
    if streamed and bound == "transfer" and casts_on_gpu(profile) and profile.runtime.precision in ("auto", "bf16"):
        notes.append(f"the link bounds the passes here: runtime.host_bf16_copies=true halves the weights' traffic "
                     f"for {2 * n / 2**30:.1f} GiB more RAM; runtime.split_masters=true does it with no more RAM, "
                     "for more CPU work per update")
    if optimizer_s or streamed:
        notes.append(
            (
                f"CPU optimizer: fused AdamW measured here at {adamw_rate / 1e6:,.0f} M params/s"
                if rates.adamw_params_per_s
                else f"CPU optimizer on {threads} threads: fused AdamW at {a.adamw_params_per_thread_s / 1e6:.0f} M "
                "params/s per thread (assumed: 1.1 B params in 0.26 s on 16 threads, H200 machine)"
            )
            + (f", x {1 + a.optimizer_rest_ratio:.2f} chunk by chunk beside the loads"
               + (f"; the GPU updates {gpu_update_share(profile, device):.0%} of the parameters through the link"
                  if gpu_update_share(profile, device) else "")
               + "; less the first forward it overlaps" if streamed else "")
        )
    else:
        notes.append("optimizer: fused AdamW on the GPU (milliseconds; not counted)")
    return TimeEstimate(
        flops_per_token=fpt,
        flops_counted=_RECOMPUTE_TEXT[rec],
        tokens_per_step=tokens,
        compute_s=compute_s,
        transfer_s=transfer_s,
        host_accum_s=host_accum_s,
        optimizer_s=optimizer_s,
        step_s=step_s,
        bound=bound,
        max_steps=profile.optim.max_steps,
        rates=rates,
        assumptions=tuple(notes),
    )


__all__ = [
    "CARDS",
    "DEFAULT_SPEED",
    "CardClass",
    "Rates",
    "SpeedAssumptions",
    "TimeEstimate",
    "flops_per_token",
    "project_time",
    "recompute_kind",
]
