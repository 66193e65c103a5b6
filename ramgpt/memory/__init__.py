"""Predict what a profile needs (GPU memory, CPU RAM, disk, PCIe traffic) and how long it takes.

- :mod:`ramgpt.memory.terms`: the per-term byte arithmetic (pure; what the engines size themselves with)
- :mod:`ramgpt.memory.timing`: the step and run time projection (pure) and the card classes
- :mod:`ramgpt.memory.report`: :func:`estimate`, the assembled :class:`MemoryEstimate` with advice

``import ramgpt.memory`` imports no torch; ``estimate`` answers in milliseconds unless asked to
measure (``speed="auto"``). docs/memory-model.md derives every term.
"""

from __future__ import annotations

from ramgpt.memory.report import MemoryEstimate, estimate, matmul_shape
from ramgpt.memory.terms import (
    DEFAULT_ASSUMPTIONS,
    Assumptions,
    ChunkSize,
    DiskEstimate,
    Engine,
    GpuEstimate,
    PcieEstimate,
    Term,
    block_backward_per_token,
    block_saved_per_token,
    choose_engine,
    chunk_sizes,
    disk_per_checkpoint,
    largest_micro_batch,
    max_seqs_per_pass,
    pcie_per_step,
    pinned_bytes,
    resident_gpu,
    streamed_gpu,
)
from ramgpt.memory.timing import (
    CARDS,
    DEFAULT_SPEED,
    CardClass,
    Rates,
    SpeedAssumptions,
    TimeEstimate,
    flops_per_token,
    project_time,
)

__all__ = [
    "CARDS",
    "DEFAULT_ASSUMPTIONS",
    "DEFAULT_SPEED",
    "Assumptions",
    "CardClass",
    "ChunkSize",
    "DiskEstimate",
    "Engine",
    "GpuEstimate",
    "MemoryEstimate",
    "PcieEstimate",
    "Rates",
    "SpeedAssumptions",
    "Term",
    "TimeEstimate",
    "block_backward_per_token",
    "block_saved_per_token",
    "choose_engine",
    "chunk_sizes",
    "disk_per_checkpoint",
    "estimate",
    "flops_per_token",
    "largest_micro_batch",
    "matmul_shape",
    "max_seqs_per_pass",
    "pcie_per_step",
    "pinned_bytes",
    "project_time",
    "resident_gpu",
    "streamed_gpu",
]
