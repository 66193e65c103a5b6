"""The memory estimate as users read it: one :class:`MemoryEstimate` assembled from the per-term
arithmetic (:mod:`ramgpt.memory.terms`), the placement the profile gets on a machine
(:func:`ramgpt.placement.decide`, the same decision ``train`` makes), the advice when it does not
fit, the assumptions in words, and (when asked) the projected step and run time
(:mod:`ramgpt.memory.timing`).

The machine is real (:func:`ramgpt.probe.probe_machine` through NVML: no torch import, no CUDA
context) or described: ``--vram-gib`` / ``--card`` stand for a card, ``--ram-gib`` for the RAM, and a
profile's ``runtime.vram_budget_gib`` for a card that holds the budget when no card is known.
``estimate(..., detect=False)`` never looks at the machine (tests, the engines' OOM advice).
Only ``speed="auto"`` measures anything (a short matmul, through :mod:`ramgpt.probe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from ramgpt import placement, probe
from ramgpt.errors import ConfigError
from ramgpt.fmt import gib
from ramgpt.memory.terms import (
    DEFAULT_ASSUMPTIONS,
    Assumptions,
    DiskEstimate,
    GpuEstimate,
    MiB,
    PcieEstimate,
    Term,
    _cpu_terms,
    _largest,
    _param_counts,
    _precision_bytes,
    _total,
    disk_per_checkpoint,
    largest_micro_batch,
    max_seqs_per_pass,
    pcie_per_step,
    resident_gpu,
    streamed_gpu,
)
from ramgpt.memory.timing import CARDS, CardClass, Rates, TimeEstimate, project_time
from ramgpt.placement import resolve_grad_accum

if TYPE_CHECKING:  # pragma: no cover
    from ramgpt.config import Profile

GiB = 2**30


def gib1(b: float) -> str:
    """Sizes in advice sentences: ``16.0 GiB``."""
    return gib(b, 1)


# ---------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class MemoryEstimate:
    profile: str
    engine: str
    engine_requested: str
    engine_reason: str
    device: str  # "cuda" or "cpu"
    precision: str
    seq_len: int
    micro_batch_size: int
    seqs_per_step: int
    seqs_per_pass: int | None
    params: dict[str, int]
    gpu: GpuEstimate | None
    cpu_terms: tuple[Term, ...]
    cpu_bytes: int
    disk: DiskEstimate
    pcie: PcieEstimate
    vram_bytes: int | None  # the budget the allocator may use
    vram_source: str
    card_bytes: int | None  # the card's memory (free), when known
    ram_bytes: int | None
    ram_source: str
    fits_vram: bool | None
    fits_ram: bool | None
    largest_micro_batch: int | None
    max_seqs_per_pass: int | None
    advice: tuple[str, ...]
    assumptions: tuple[str, ...]
    notes: tuple[str, ...]
    assumption_values: Assumptions = field(default_factory=Assumptions)
    time: TimeEstimate | None = None  # projected step and run time (``speed``); None when not asked

    @property
    def fits(self) -> bool:
        return self.fits_vram is not False and self.fits_ram is not False

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "engine": self.engine,
            "engine_requested": self.engine_requested,
            "engine_reason": self.engine_reason,
            "device": self.device,
            "precision": self.precision,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "seqs_per_step": self.seqs_per_step,
            "seqs_per_pass": self.seqs_per_pass,
            "params": dict(self.params),
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "cpu": {"terms": [t.to_dict() for t in self.cpu_terms], "total_bytes": self.cpu_bytes},
            "disk": self.disk.to_dict(),
            "pcie": self.pcie.to_dict(),
            "vram_bytes": self.vram_bytes,
            "vram_source": self.vram_source,
            "card_bytes": self.card_bytes,
            "ram_bytes": self.ram_bytes,
            "ram_source": self.ram_source,
            "fits_vram": self.fits_vram,
            "fits_ram": self.fits_ram,
            "fits": self.fits,
            "largest_micro_batch": self.largest_micro_batch,
            "max_seqs_per_pass": self.max_seqs_per_pass,
            "advice": list(self.advice),
            "assumptions": list(self.assumptions),
            "notes": list(self.notes),
            "assumption_values": self.assumption_values.to_dict(),
            "time": self.time.to_dict() if self.time else None,
        }


# ---------------------------------------------------------------------------------------------
# advice


def _with(profile: Profile, section: str, **kw: Any) -> Profile:
    sec = getattr(profile, section).model_copy(update=kw)
    return profile.model_copy(update={section: sec})


def _advice(
    profile: Profile,
    engine: str,
    device: str,
    gpu: GpuEstimate | None,
    vram: int | None,
    fits_vram: bool | None,
    cpu_bytes: int,
    ram: int | None,
    fits_ram: bool | None,
    disk: DiskEstimate,
    disk_free: int | None,
    a: Assumptions,
) -> list[str]:
    out: list[str] = []
    rt, opt = profile.runtime, profile.optim
    if fits_vram is False and gpu is not None and vram is not None:
        if engine == "resident":
            mb = largest_micro_batch(profile, vram, a=a)
            if mb >= 1:
                accum = math.ceil(opt.seqs_per_step / mb)
                out.append(
                    f"lower optim.micro_batch_size to {mb} (and raise optim.grad_accum_steps to {accum} to keep "
                    f"{opt.seqs_per_step} sequences per step)"
                )
            elif not rt.gradient_checkpointing and resident_gpu(profile, 1, a=a, checkpointing=True).need_bytes <= vram:
                out.append("set runtime.gradient_checkpointing=true")
            s = max_seqs_per_pass(profile, vram, a=a)
            if s >= 1:
                out.append(f"set runtime.engine=streamed (fits with up to {s} sequences per pass)")
        else:
            s = max_seqs_per_pass(profile, vram, a=a)
            on_gpu_sum = resolve_grad_accum(rt.grad_accum, "cuda") == "device"
            if s >= 1 and rt.seqs_per_pass:
                tip = f"lower runtime.seqs_per_pass to {s} (or unset it to let the engine choose)"
                if on_gpu_sum and max_seqs_per_pass(_with(profile, "runtime", grad_accum="host"), vram, a=a) >= rt.seqs_per_pass:
                    tip += (f", or keep {rt.seqs_per_pass} with runtime.grad_accum=host (gradients summed on the CPU: "
                            "less VRAM, slower on fast cards)")
                out.append(tip)
            elif s < 1:
                # cheaper settings, cumulatively, until one sequence per pass fits
                steps: list[tuple[str, str, dict[str, Any]]] = []
                if on_gpu_sum:
                    steps.append(("runtime.grad_accum=host", "runtime", {"grad_accum": "host"}))
                if rt.stream_pin:
                    steps.append(("runtime.stream_pin=0", "runtime", {"stream_pin": 0}))
                if rt.stream_window > 2:
                    steps.append(("runtime.stream_window=2", "runtime", {"stream_window": 2}))
                for c in (1024, 512, 256):
                    if c < rt.loss_chunk_tokens:
                        steps.append((f"runtime.loss_chunk_tokens={c}", "runtime", {"loss_chunk_tokens": c}))
                for q in (768, 512, 256):
                    if q < profile.data.seq_len:
                        steps.append((f"data.seq_len={q}", "data", {"seq_len": q}))
                p2, changes, found = profile, [], False
                for label, section, kw in steps:
                    p2 = _with(p2, section, **kw)
                    changes = [c for c in changes if c.split("=")[0] != label.split("=")[0]] + [label]
                    k = max_seqs_per_pass(p2, vram, a=a)
                    if k >= 1:
                        out.append(f"set {', '.join(changes)} (then up to {k} sequences per pass fit)")
                        found = True
                        break
                if not found:
                    need = streamed_gpu(p2, 1, a=a).need_bytes
                    out.append(
                        f"needs {gib1(need)} of VRAM even with one sequence per pass and {', '.join(changes) or 'these settings'}; "
                        f"have {gib1(vram)}: use a smaller model or a larger card"
                    )
        if not out:
            out.append(f"this model needs more than {gib1(vram)} of VRAM even with one sequence: use a smaller model")
    if fits_ram is False and ram is not None:
        msg = f"need {gib1(cpu_bytes)} RAM, have {gib1(ram)}"
        if device != "cpu" and engine == "streamed" and not rt.optimizer_on_disk:
            # the low-RAM mode keeps the AdamW state (8 bytes per parameter) in a file instead
            seqs = gpu.seqs if gpu is not None else 1
            low = _total(_cpu_terms(_with(profile, "runtime", optimizer_on_disk=True), engine, device, seqs, a))
            if low <= ram:
                msg += (f": set runtime.optimizer_on_disk=true (the desktop-16gb profile) to keep AdamW's state on disk "
                        f"({gib1(low)} of RAM); or")
        if device != "cpu" and engine == "streamed":
            seqs = gpu.seqs if gpu is not None else 1
            layers = _largest(
                lambda L: _total(_cpu_terms(_with(profile, "model", n_layer=L), engine, device, seqs, a)) <= ram,
                profile.model.n_layer,
            )
            sep = " " if msg.endswith("; or") else ": "
            if layers >= 1:
                msg += f"{sep}lower model.n_layer to {layers}, or close other programs"
            else:
                msg += f"{sep}use a smaller model"
        elif device != "cpu" and engine == "resident":
            msg += ": most of it is the checkpoint copy of the model + AdamW state; free RAM before saving"
        else:
            msg += ": use a smaller model or a smaller micro-batch"
        out.append(msg)
    if disk_free is not None and disk.worst_case > disk_free:
        keep = max(1, disk_free // max(1, disk.per_checkpoint) - 2)
        out.append(
            f"checkpoints need up to {gib1(disk.worst_case)} on disk, have {gib1(disk_free)}: "
            f"lower checkpoint.keep_last_n to {keep}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# the machine to plan for


@dataclass(frozen=True)
class _Plan:
    machine: probe.Machine
    card_free: int | None  # the planned card's free memory (before the CUDA context), when known
    vram_source: str
    ram: int | None
    ram_source: str
    budget_card: bool  # no card known: planned for one that holds runtime.vram_budget_gib
    notes: tuple[str, ...] = ()


def _card_class(card: str | CardClass | None) -> CardClass | None:
    if card is None or isinstance(card, CardClass):
        return card
    key = card.strip().lower()
    if key not in CARDS:
        raise ConfigError(f"--card {card!r} is not a known card class; use one of {', '.join(CARDS)}")
    return CARDS[key]


def _plan_machine(
    profile: Profile, vram_gib: float | None, ram_gib: float | None, detect: bool, card: CardClass | None,
    a: Assumptions,
) -> _Plan:
    rt = profile.runtime
    # a described card takes the index the profile asks for, so "cuda:1" plans for it too
    idx = int(rt.device.split(":", 1)[1]) if rt.device.startswith("cuda:") else 0
    gpus: tuple[probe.Gpu, ...] = ()
    card_free: int | None = None
    vram_source = "none"
    notes: list[str] = []
    if vram_gib is not None:
        total = int(vram_gib * GiB)
        gpus = (probe.Gpu(idx, f"a {vram_gib:g} GiB card", total, True, (8, 0), total),)
        card_free, vram_source = total, "given (--vram-gib)"
    elif card is not None:
        total = int(card.vram_gib * GiB)
        gpus = (probe.Gpu(idx, card.name, total, True, card.capability, total),)
        card_free, vram_source = total, f"--card {card.key} ({card.vram_gib:g} GiB)"
    elif detect and rt.device != "cpu":
        gpus = probe.nvml_gpus()
        g = next((x for x in gpus if x.index == idx), None)
        if g is not None:
            card_free = g.free_b if g.free_b is not None else g.total_b
            vram_source = f"detected free on {g.name}"
    budget_card = False
    if not gpus and rt.device != "cpu" and rt.vram_budget_gib is not None:
        # no card known: plan for one that holds the budget and the CUDA context
        total = int(rt.vram_budget_gib * GiB) + a.cuda_context_bytes
        gpus = (probe.Gpu(idx, "a card holding runtime.vram_budget_gib", total, True, (8, 0), total),)
        budget_card = True
        if detect:
            notes.append(
                "no GPU found: planned for a card that holds runtime.vram_budget_gib; `ramgpt train` on this "
                "machine would fail or run on the CPU"
            )
    ram: int | None = None
    ram_source = "none"
    r = None
    if ram_gib is not None:
        ram, ram_source = int(ram_gib * GiB), "given (--ram-gib)"
    elif detect:
        r = probe.ram()
        if r is not None:
            ram, ram_source = r[1], "detected available"
    machine = probe.Machine(
        gpus=gpus,
        ram_total_b=ram if ram_gib is not None else (r[0] if r else None),
        ram_available_b=ram,
        cpu_count=probe.usable_cores(),
    )
    return _Plan(machine, card_free, vram_source, ram, ram_source, budget_card, tuple(notes))


# ---------------------------------------------------------------------------------------------
# the estimate


def estimate(
    profile: Profile,
    vram_gib: float | None = None,
    ram_gib: float | None = None,
    link_gbps: float | None = None,
    *,
    detect: bool = True,
    assumptions: Assumptions | None = None,
    disk_free_bytes: int | None = None,
    card: str | CardClass | None = None,
    speed: Rates | Literal["auto"] | None = None,
    gpus: int = 1,
) -> MemoryEstimate:
    """Estimate what ``profile`` needs on a machine and whether it fits.

    The machine: ``vram_gib`` (a card with that much free memory) or ``card`` (a card class of
    :data:`~ramgpt.memory.timing.CARDS`), else the GPU NVML reports (``detect``), else, when the
    profile sets ``runtime.vram_budget_gib``, a card that holds the budget; ``ram_gib`` or the
    detected available RAM. Device, precision, engine and sequences per pass then come from
    :func:`ramgpt.placement.decide`, as in ``train``; the allocator may use the budget, or the
    card's free memory minus the CUDA context. ``link_gbps`` overrides the link rate.

    ``speed`` adds the projected step and run time: a :class:`~ramgpt.memory.timing.Rates`, or
    ``"auto"``: the card class's figures with ``card``, else a short measurement on this machine's
    device for the placement (imports torch; about a second).

    ``gpus``: train on that many GPUs of this machine (torchrun): VRAM is per GPU, RAM per node."""
    a = assumptions or DEFAULT_ASSUMPTIONS
    card_cls = _card_class(card)
    rt = profile.runtime
    plan = _plan_machine(profile, vram_gib, ram_gib, detect, card_cls, a)
    notes: list[str] = list(plan.notes)
    free_vram = None if plan.card_free is None else max(0, plan.card_free - a.cuda_context_bytes)
    try:
        pl = placement.decide(profile, plan.machine, free_vram_b=free_vram)
    except ConfigError as e:
        raise ConfigError(f"{e}; to plan for a card anyway, pass --vram-gib or --card") from None
    device = "cuda" if pl.cuda else "cpu"
    card_bytes = plan.card_free
    vram: int | None = None
    vram_source = plan.vram_source
    if pl.cuda:
        if pl.vram_budget_b is not None:
            vram = pl.vram_budget_b
            vram_source = "runtime.vram_budget_gib" + (f"; card: {vram_source}" if not plan.budget_card else "")
            if plan.budget_card:
                card_bytes = None
            elif card_bytes is not None and int(rt.vram_budget_gib * GiB) + a.cuda_context_bytes > card_bytes:
                notes.append(
                    f"the budget ({gib1(int(rt.vram_budget_gib * GiB))}) plus the CUDA context "
                    f"({gib1(a.cuda_context_bytes)}) is more than the card's {gib1(card_bytes)}"
                )
        else:
            vram = free_vram
    elif rt.device != "cpu":
        notes.append("no GPU found (and no --vram-gib or --card): training would run on the CPU, resident engine")

    # --- engine (the placement's); on the CPU every engine keeps everything in RAM
    requested = rt.engine
    engine = pl.engine
    if device == "cpu":
        reason = "CPU: everything in RAM"
        if engine == "streamed":
            notes.append("the streamed engine on the CPU keeps everything in RAM: estimated as the resident engine")
    elif requested != "auto":
        reason = "runtime.engine"
    else:
        reason = (
            "auto: the resident estimate fits the VRAM"
            if engine == "resident"
            else "auto: the resident estimate does not fit the VRAM"
        )

    # --- rates for the time projection (may measure; the link rate they bring feeds the PCIe table)
    rates: Rates | None = None
    if isinstance(speed, Rates):
        rates = speed
    elif speed == "auto":
        rates, why = _rates_for(profile, pl, engine, card_cls, plan)
        if why:
            notes.append(why)
    if link_gbps is not None:
        a = replace(a, link_gbps=float(link_gbps), link_source="given (--link-gbps)")
    elif rates is not None and rates.link_gbps and rates.device == device == "cuda":
        a = replace(a, link_gbps=round(rates.link_gbps, 1), link_source=rates.link_source)

    # --- GPU
    gpu: GpuEstimate | None = None
    spp: int | None = None
    largest_mb: int | None = None
    max_spp: int | None = None
    fits_vram: bool | None = None
    if device == "cuda":
        if engine == "streamed":
            if vram is not None:
                max_spp = max_seqs_per_pass(profile, vram, a=a)
            spp = pl.seqs_per_pass
            gpu = streamed_gpu(profile, spp, a=a, gpus=gpus)
        else:
            gpu = resident_gpu(profile, a=a)
            if vram is not None:
                largest_mb = largest_micro_batch(profile, vram, a=a)
        if vram is not None:
            fits_vram = gpu.need_bytes <= vram

    seqs = spp if spp else profile.optim.micro_batch_size
    mem_engine = engine if device == "cuda" else "resident"
    cpu_terms = _cpu_terms(profile, mem_engine, device, seqs, a, gpus)
    if rt.optimizer_on_disk and mem_engine == "streamed":
        n_params = _param_counts(profile.model)["total"]
        notes.append(
            f"low-RAM mode: AdamW's state is a {gib1(8 * n_params)} file ({rt.optimizer_dir or 'the run directory'}); "
            f"each step reads and writes it once: {16 * n_params / 1e9:.1f} GB of disk traffic per step when it is not "
            f"in the page cache ({16 * n_params / 2e9:.0f} s at 2 GB/s)"
        )
    if gpus > 1:
        notes.append(f"{gpus} GPUs: the VRAM figures are per GPU, the RAM is the node's; each GPU trains "
                     f"{profile.optim.seqs_per_step // gpus} of the {profile.optim.seqs_per_step} sequences of a step "
                     "and sends its gradients (4 bytes per parameter per pass) to each chunk's owner over NCCL")
    cpu_bytes = _total(cpu_terms)
    ram = plan.ram
    fits_ram = None if ram is None else cpu_bytes <= ram
    disk = disk_per_checkpoint(profile)
    pcie = pcie_per_step(profile, seqs, mem_engine, a=a, gpus=gpus)

    params = _param_counts(profile.model)
    pb = _precision_bytes(profile, device)
    precision = pl.precision
    if device == "cpu" and pl.precision != "fp32":
        notes.append(f"{pl.precision} autocast on the CPU: activations estimated in fp32 (an upper bound)")
    ckpt_mode = (
        "per-chunk recompute (every block)"
        if engine == "streamed" and device == "cuda"
        else (
            "per-block checkpointing" if rt.gradient_checkpointing and device != "cpu" else "off (all activations kept)"
        )
    )
    assumptions_text = [
        f"device {device}, engine {engine}, precision {precision}"
        + (" (autocast over fp32 masters)" if engine == "resident" and pb == 2 else ""),
        f"activation checkpointing: {ckpt_mode}",
        f"seq_len {profile.data.seq_len}, micro-batch {profile.optim.micro_batch_size}, "
        f"{profile.optim.seqs_per_step} sequences per optimizer step",
        f"loss chunk {rt.loss_chunk_tokens} tokens (full logits never exist)",
        "AdamW fused (no step temporaries)"
        if a.fused_adamw
        else "AdamW foreach (one fp32 temporary the size of the model)",
    ]
    if engine == "streamed" and device == "cuda":
        assumptions_text.append(
            f"stream window {rt.stream_window} chunks, {rt.stream_pin} pinned, {spp} sequences per pass"
            + (
                " (runtime.seqs_per_pass)"
                if rt.seqs_per_pass is not None
                else (" (chosen: largest that fits)" if max_spp else " (none fits; shown for 1)")
            )
        )
        from ramgpt.memory.terms import chunk_sizes, split_chunks

        split = split_chunks(profile, gpus)
        how = ("loaded by the GPU and cast to bf16 there" if not split else
               "each loaded as its bf16 half (runtime.split_masters: every chunk)" if len(split) == len(
                   chunk_sizes(profile.model)) else
               f"{len(split)} chunks (those the GPU updates) loaded as their bf16 halves "
               "(runtime.split_masters), the rest cast to bf16 on the GPU")
        assumptions_text.append(
            f"fp32 masters page-locked in one arena, {how} (exact; "
            f"+{a.pinned_overhead:.0%} driver overhead); the host-path "
            "gradient staging slots round up to powers of two"
        )
    if device == "cuda":
        share = a.headroom_streamed if engine == "streamed" else a.headroom_resident
        assumptions_text.append(
            f"allocator headroom +{share:.0%} of the live peak; CUDA context {gib1(a.cuda_context_bytes)} "
            "(outside the budget, on the card)"
        )
        assumptions_text.append(f"link {a.link_gbps:g} GB/s ({a.link_source})")
    baseline = a.cpu_baseline_bytes if device == "cpu" else a.cuda_baseline_bytes
    assumptions_text.append(
        f"process baseline {baseline / MiB:.0f} MiB RSS "
        + (
            "(torch CPU build, measured)"
            if device == "cpu"
            else "(torch + CUDA libraries, measured on torch 2.11/CUDA 13)"
        )
    )

    advice = _advice(profile, engine, device, gpu, vram, fits_vram, cpu_bytes, ram, fits_ram, disk, disk_free_bytes, a)
    if engine == "streamed" and device == "cuda" and gpu is not None and max_spp == 0:
        notes.append("not even one sequence per pass fits the VRAM")

    time_est: TimeEstimate | None = None
    if rates is not None:
        if rates.device != device:
            notes.append(f"no time projection: the rates are for {rates.device}, the profile runs on {device}")
        else:
            time_est = project_time(profile, engine=engine, device=device, pcie=pcie, rates=rates)
    return MemoryEstimate(
        profile=profile.name,
        engine=engine,
        engine_requested=requested,
        engine_reason=reason,
        device=device,
        precision=precision,
        seq_len=profile.data.seq_len,
        micro_batch_size=profile.optim.micro_batch_size,
        seqs_per_step=profile.optim.seqs_per_step,
        seqs_per_pass=spp,
        params=params,
        gpu=gpu,
        cpu_terms=tuple(cpu_terms),
        cpu_bytes=cpu_bytes,
        disk=disk,
        pcie=pcie,
        vram_bytes=vram,
        vram_source=vram_source,
        card_bytes=card_bytes,
        ram_bytes=ram,
        ram_source=plan.ram_source,
        fits_vram=fits_vram,
        fits_ram=fits_ram,
        largest_micro_batch=largest_mb,
        max_seqs_per_pass=max_spp,
        advice=tuple(advice),
        assumptions=tuple(assumptions_text),
        notes=tuple(notes),
        assumption_values=a,
        time=time_est,
    )


def matmul_shape(profile: Profile, cuda: bool, seqs: int) -> tuple[int, int, int]:
    """What to time for the rate: the model's MLP up-projection, (tokens x C) @ (C x 4C), the
    shape most of a step's FLOPs run at. Tokens are one pass's (``seqs`` sequences), at most 8192
    on a GPU (the rate has saturated there). On the CPU every side is capped at :data:`CPU_MATMUL_CAP`
    so one product takes a fraction of a second (a 256-row product ran at half the rate of 1024
    rows on the 2-core test machine; 1024 x 1024 x 4096 is within 10% of the larger ones)."""
    C = profile.model.n_embd
    tokens = seqs * profile.data.seq_len
    if cuda:
        return (min(tokens, 8192), C, 4 * C)
    return cpu_matmul_shape((tokens, C, 4 * C))


CPU_MATMUL_CAP = (1024, 1024, 4096)


def cpu_matmul_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """``shape`` capped at :data:`CPU_MATMUL_CAP`, side by side."""
    return (min(shape[0], CPU_MATMUL_CAP[0]), min(shape[1], CPU_MATMUL_CAP[1]), min(shape[2], CPU_MATMUL_CAP[2]))


def _rates_for(
    profile: Profile, pl: placement.Placement, engine: str, card: CardClass | None, plan: _Plan
) -> tuple[Rates | None, str]:
    """Rates for ``speed="auto"``, or None and why not."""
    threads = profile.runtime.threads or plan.machine.cpu_count
    if card is not None:
        if not pl.cuda:
            return None, f"no time projection for --card {card.key}: the profile runs on the CPU"
        return Rates.from_card(card, threads), ""
    seqs = pl.seqs_per_pass if engine == "streamed" else profile.optim.micro_batch_size
    measured = probe.measure_speed(pl.device, matmul_shape(profile, pl.cuda, seqs))
    if measured is None:
        if pl.cuda:
            return None, f"no time projection: no usable GPU here to measure; pass --card ({', '.join(CARDS)})"
        return None, "no time projection: the CPU matmul measurement failed"
    return Rates.from_speed(measured, threads), ""


__all__ = ["MemoryEstimate", "estimate", "matmul_shape"]
