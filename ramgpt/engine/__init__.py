"""Execution engines. Both own the fp32 master weights (``engine.model``, a ``ramgpt.model.GPT``)
and an AdamW over them, and give the training loop the same calls:

- ``train_step(x, y, lr) -> StepReport``: the passes of one optimizer step, then the update.
- ``eval_loss_sum(x, y) -> float``.
- ``state_dict()``, ``optimizer_state()``, ``scaler_state()``, ``load_state(...)`` for checkpoints.
- ``counters() -> dict`` for the live panel (transfer bytes, GB/s, stalls, VRAM).

:mod:`.resident` keeps everything on one device; :mod:`.streamed` keeps fp32 masters and the
optimizer in CPU RAM and streams the chunks through the GPU with ramtorch (cast to bf16 there)
(:mod:`.offload` is the only module that imports ramtorch); :mod:`.infer` streams weights for
generation. Engines take resolved values (a :class:`~ramgpt.placement.Placement`), never a Profile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ramgpt.engine.base import Engine, StepReport, apply_vram_budget
from ramgpt.engine.infer import StreamedInferenceModel
from ramgpt.engine.resident import ResidentEngine
from ramgpt.engine.streamed import StreamedEngine
from ramgpt.model import GPT
from ramgpt.placement import Placement


def build_engine(model: GPT, placement: Placement, optim: Any, runtime: Any, scratch_dir: Path | None = None,
                 comm: Any = None, on_phase: Callable[[str], None] | None = None) -> Engine:
    """The engine ``placement`` names, with the VRAM budget applied to the allocator first.
    ``optim`` is the profile's OptimConfig; ``runtime`` its RuntimeConfig (window, pin, checkpointing,
    the low-RAM mode, whose moments file goes to ``runtime.optimizer_dir`` or ``scratch_dir``).
    ``on_phase``: told each long step of the streamed engine's set-up as it begins."""
    apply_vram_budget(placement.device, placement.vram_budget_b)
    if placement.engine == "streamed":
        return StreamedEngine(model, device=placement.device, precision=placement.precision, optim_cfg=optim,
                              seqs_per_pass=placement.seqs_per_pass, window=runtime.stream_window,
                              pin=runtime.stream_pin, vram_budget_b=placement.vram_budget_b,
                              grad_accum=placement.grad_accum, moments_file=_moments_file(runtime, scratch_dir),
                              comm=comm, optimizer_gpu_share=runtime.optimizer_gpu_share,
                              host_bf16_copies=runtime.host_bf16_copies, compile_blocks=placement.compile_blocks,
                              split_masters=placement.split_masters, on_phase=on_phase)
    return ResidentEngine(model, device=placement.device, precision=placement.precision, optim_cfg=optim,
                          micro_batch_size=placement.seqs_per_pass,
                          gradient_checkpointing=runtime.gradient_checkpointing and placement.device != "cpu",
                          vram_budget_b=placement.vram_budget_b, comm=comm)


def _moments_file(runtime: Any, scratch_dir: Path | None) -> Path | None:
    if not runtime.optimizer_on_disk:
        return None
    where = Path(runtime.optimizer_dir) if runtime.optimizer_dir else (scratch_dir or Path("."))
    return where / f".adam-moments-{os.getpid()}.bin"


__all__ = ["Engine", "ResidentEngine", "StepReport", "StreamedEngine", "StreamedInferenceModel", "apply_vram_budget",
           "build_engine"]
