"""Where and how a run executes: the one decision of device, precision, engine, sequences per
weight pass, VRAM budget and gradient-accumulation path, made by pure functions of the profile's
``runtime`` section and a probed (or described) :class:`~ramgpt.probe.Machine`.

``train``, ``generate``, ``estimate-memory`` and ``doctor`` all ask here, so they never disagree
about what a profile does on a machine. Nothing here touches CUDA: the engine applies the budget.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramgpt.errors import ConfigError
from ramgpt.probe import Machine

if TYPE_CHECKING:  # pragma: no cover
    from ramgpt.config import Profile

GiB = 2**30


@dataclass(frozen=True)
class Placement:
    """The resolved runtime of one process."""

    device: str  # "cpu", "cuda" or "cuda:N"
    precision: str  # "fp32" | "bf16" | "fp16"
    engine: str  # "resident" | "streamed"
    seqs_per_pass: int  # sequences per forward/backward (the resident engine's micro-batch)
    vram_budget_b: int | None  # the allocator cap in bytes (None: no cap)
    grad_accum: str  # "host" | "device" (streamed engine; "host" elsewhere)
    compile_blocks: bool = False  # torch.compile the transformer blocks (streamed engine)
    split_masters: str = "none"  # chunks whose fp32 masters are two 16-bit planes: "none", "auto" or "all" (streamed)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def resolve_device(requested: str, machine: Machine, *, option: str = "runtime.device") -> str:
    """``auto`` takes CUDA when there is a GPU, else the CPU. An explicit ``cuda``/``cuda:N``
    without that GPU is a one-line :class:`ConfigError` naming ``option`` (never a silent CPU run)."""
    if requested == "auto":
        return "cuda" if machine.cuda else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not machine.cuda:
            raise ConfigError(
                f"{option} is {requested!r} but this machine has no usable CUDA GPU (CPU-only torch or no driver); "
                f"use {option}=auto or cpu"
            )
        if machine.gpu(requested) is None:
            have = ", ".join(f"cuda:{g.index}" for g in machine.gpus)
            raise ConfigError(f"{option} is {requested!r} but this machine has only {have}")
        return requested
    raise ConfigError(f"{option} {requested!r} is not a device; use auto, cpu, cuda or cuda:N")


def resolve_precision(requested: str, device: str, machine: Machine) -> str:
    """``auto``: fp32 on the CPU, bf16 on cards that have it, fp16 (with loss scaling) on older
    ones. fp16 on the CPU becomes fp32 (there is no fp16 autocast worth having there)."""
    if device == "cpu":
        return "fp32" if requested in ("auto", "fp16") else requested
    if requested != "auto":
        return requested
    gpu = machine.gpu(device)
    return "bf16" if gpu is not None and gpu.bf16 else "fp16"


def resolve_grad_accum(value: str, device: str) -> str:
    """``runtime.grad_accum``: ``auto`` sums each pass's gradients on the GPU under CUDA, else on the host."""
    if value != "auto":
        return value
    return "device" if device.startswith("cuda") else "host"


def resolve_compile_blocks(value: bool | str, engine: str, device: str, dropout: float) -> bool:
    """``runtime.compile_blocks``: ``auto`` compiles the streamed engine's blocks on CUDA where
    triton is installed and there is no dropout (a recompute must resample exactly what the first
    run drew, which compiled random numbers do not promise); ``true`` asks for it anywhere the
    streamed engine runs (a failure to compile falls back to eager with a warning)."""
    if engine != "streamed":
        return False
    if value is True and dropout > 0:
        raise ConfigError(f"runtime.compile_blocks is true but model.dropout is {dropout:g}: the streamed engine's "
                          "recompute must redraw the first run's dropout masks, which compiled random numbers do not "
                          "promise; set runtime.compile_blocks: false (or auto) or model.dropout: 0")
    if value != "auto":
        return bool(value)
    # inductor's GPU kernels are triton's (a platform where dynamo itself fails is caught by the
    # warm-up, which falls back to eager); found without importing anything (estimate-memory stays light)
    return device.startswith("cuda") and dropout == 0 and importlib.util.find_spec("triton") is not None


def gpu_update_chunks(sizes: list[int], share: float) -> list[int]:
    """The chunks the GPU updates, given each chunk's parameter count: walking them in forward order
    (the order the next forward needs them), each goes to the side that would finish it first, the
    GPU updating ``share`` of the parameters per second and the CPU the rest. Fixed for a model, so
    a run's arithmetic does not depend on timing."""
    if share <= 0:
        return []
    if share >= 1:
        return list(range(len(sizes)))
    t_cpu = t_gpu = 0.0
    out = []
    for i, n in enumerate(sizes):
        if t_gpu + n / share <= t_cpu + n / (1 - share):
            out.append(i)
            t_gpu += n / share
        else:
            t_cpu += n / (1 - share)
    return out


def resolve_split_masters(value: bool | str, engine: str, precision: str, host_copies: bool) -> str:
    """``runtime.split_masters`` -> which chunks the streamed engine splits: ``"auto"`` (every chunk
    where the CPU's one-pass kernel loads, :mod:`ramgpt.engine.native`; else those whose update the
    GPU does, which joins and splits them itself), ``"all"`` (true) or ``"none"``.
    Only with bf16 compute and no host bf16 copies (the engine also keeps them whole with several
    processes); ``true`` where that cannot hold is a configuration error."""
    if engine != "streamed" or value is False:
        return "none"
    possible = precision == "bf16" and not host_copies
    if value is True and not possible:
        why = "runtime.host_bf16_copies is true" if host_copies else f"the compute precision is {precision}"
        raise ConfigError(f"runtime.split_masters is true but {why}: the GPU would not load the bf16 halves; set "
                          "runtime.split_masters: auto (or false)")
    if not possible:
        return "none"
    return "all" if value is True else "auto"


def vram_budget_bytes(budget_gib: float | None, device: str, machine: Machine) -> int | None:
    """The cap the engine applies: the profile's budget, at most the card (None: no budget or no GPU)."""
    gpu = machine.gpu(device)
    if budget_gib is None or gpu is None:
        return None
    return min(int(budget_gib * GiB), gpu.total_b)


def decide(
    profile: Profile,
    machine: Machine,
    *,
    free_vram_b: int | None = None,
    engine: str | None = None,
    seqs_per_pass: int | None = None,
) -> Placement:
    """The placement of ``profile`` on ``machine``. ``free_vram_b`` is what the allocator may use
    without a budget (``torch.cuda.mem_get_info`` once the context exists; the card's total when
    planning ahead). ``engine`` / ``seqs_per_pass`` override the profile (benchmarks, generate)."""
    from ramgpt import memory

    rt = profile.runtime
    device = resolve_device(rt.device, machine)
    precision = resolve_precision(rt.precision, device, machine)
    budget = vram_budget_bytes(rt.vram_budget_gib, device, machine)
    room = budget
    if room is None and device != "cpu":
        gpu = machine.gpu(device)
        room = free_vram_b if free_vram_b is not None else (gpu.total_b if gpu else None)
    kind = engine or rt.engine
    if kind == "auto":
        kind = memory.choose_engine(profile, room) if device != "cpu" else "resident"
    if kind == "streamed":
        spp = seqs_per_pass or rt.seqs_per_pass
        if spp is None:
            spp = max(1, memory.max_seqs_per_pass(profile, room)) if (device != "cpu" and room) else profile.optim.micro_batch_size
        spp = min(spp, profile.optim.seqs_per_step)
        grad_accum = resolve_grad_accum(rt.grad_accum, device)
    else:
        spp = seqs_per_pass or profile.optim.micro_batch_size
        grad_accum = "host"
    compiled = resolve_compile_blocks(rt.compile_blocks, kind, device, profile.model.dropout)
    split = resolve_split_masters(rt.split_masters, kind, precision, rt.host_bf16_copies)
    return Placement(device, precision, kind, int(spp), budget, grad_accum, compiled, split)
