"""What this machine has: the one home of machine probes (CUDA through torch, NVML, psutil).

Everything that asks the machine a question lives here, so ``placement``, ``memory``, ``doctor``,
``generate`` and the training-time ``sysstats`` sampler agree on the answers. Probes never raise:
a probe that cannot answer returns None or an empty tuple.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gpu:
    """One CUDA device as torch sees it (creating no allocations)."""

    index: int
    name: str
    total_b: int
    bf16: bool
    capability: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Machine:
    """The facts placement decisions are made from; build one by hand for "what if" answers
    (``estimate-memory --vram-gib 6``) or with :func:`probe_machine`."""

    gpus: tuple[Gpu, ...] = ()
    ram_total_b: int | None = None
    ram_available_b: int | None = None
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)

    def gpu(self, device: str) -> Gpu | None:
        """The GPU behind ``cuda`` / ``cuda:N`` (None for the CPU or an index it does not have)."""
        if not device.startswith("cuda") or not self.gpus:
            return None
        idx = int(device.split(":", 1)[1]) if ":" in device else 0
        return next((g for g in self.gpus if g.index == idx), None)


def cuda_gpus() -> tuple[Gpu, ...]:
    """The CUDA devices torch can use (an empty tuple on CPU builds or without a driver)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return ()
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bf16 = p.major >= 8  # Ampere and newer; what torch.cuda.is_bf16_supported() checks
            out.append(Gpu(i, str(p.name), int(p.total_memory), bf16, (int(p.major), int(p.minor))))
        return tuple(out)
    except Exception:  # noqa: BLE001 - a probe never raises
        return ()


def ram() -> tuple[int, int] | None:
    """(total, available) bytes of host RAM, or None."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # noqa: BLE001
        return None


def probe_machine() -> Machine:
    r = ram()
    return Machine(gpus=cuda_gpus(), ram_total_b=r[0] if r else None, ram_available_b=r[1] if r else None)
