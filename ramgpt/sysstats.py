"""Process, host-RAM and GPU memory numbers for the metric sinks.

Training calls :meth:`SystemStats.sample` once per log step, so every probe here is cheap
(psutil reads /proc, torch reads its allocator counters, NVML answers from the driver) and
the NVML handle is looked up once (:class:`ramgpt.probe.NvmlDevice`; host RAM from
:func:`ramgpt.probe.ram`). A probe that fails leaves its key out instead of raising:
a missing number on the dashboard is better than a training run stopped by a stats call.
Keys follow ``docs/interfaces.md``; on a CPU run only the CPU keys appear (never zeros for a
GPU that is not there).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import psutil

from ramgpt.probe import NvmlDevice, ram


class SystemStats:
    """Samples memory (and GPU utilisation) of this process and host.

    ``device`` is the resolved training device (``cpu``, ``cuda`` or ``cuda:N``).
    ``vram_budget_b`` is the engine's planned GPU budget, reported as ``vram_budget_b``.
    ``pinned_bytes_fn`` lets the engine report its pinned host buffers (psutil cannot see
    which pages are pinned). ``use_nvml=False`` skips NVML (utilisation is then absent).
    """

    def __init__(
        self,
        device: str = "cpu",
        *,
        vram_budget_b: int | None = None,
        pinned_bytes_fn: Callable[[], int] | None = None,
        use_nvml: bool = True,
    ) -> None:
        self.device = str(device)
        self.vram_budget_b = vram_budget_b
        self.pinned_bytes_fn = pinned_bytes_fn
        self.is_cuda = self.device.startswith("cuda")
        self._process = psutil.Process(os.getpid())
        self._cuda_index: int | None = None
        self._vram_total_b: int | None = None
        self._nvml: NvmlDevice | None = None
        # None: not tried yet; False: unavailable (import failed, no driver, no matching card).
        self._nvml_ok: bool | None = None if (use_nvml and self.is_cuda) else False
        self.nvml_error: str | None = None

    # -- probes ------------------------------------------------------------------------------

    def sample(self) -> dict[str, int | float]:
        """One snapshot. Never raises; keys whose probe failed are left out."""
        out: dict[str, int | float] = {}
        self._sample_cpu(out)
        if self.is_cuda:
            self._sample_cuda(out)
            util = self._gpu_util_pct()
            if util is not None:
                out["gpu_util_pct"] = util
        return out

    def _sample_cpu(self, out: dict[str, int | float]) -> None:
        try:
            out["rss_b"] = int(self._process.memory_info().rss)
        except Exception:
            pass
        r = ram()
        if r is not None:
            out["ram_total_b"], out["ram_available_b"] = r
        if self.pinned_bytes_fn is not None:
            try:
                out["pinned_b"] = int(self.pinned_bytes_fn())
            except Exception:
                pass

    def _device_index(self) -> int:
        if self._cuda_index is None:
            import torch

            self._cuda_index = torch.device(self.device).index
            if self._cuda_index is None:
                self._cuda_index = torch.cuda.current_device()
        return self._cuda_index

    def _sample_cuda(self, out: dict[str, int | float]) -> None:
        try:
            import torch

            idx = self._device_index()
            out["vram_allocated_b"] = int(torch.cuda.memory_allocated(idx))
            out["vram_reserved_b"] = int(torch.cuda.memory_reserved(idx))
            out["vram_peak_reserved_b"] = int(torch.cuda.max_memory_reserved(idx))
            if self._vram_total_b is None:
                self._vram_total_b = int(torch.cuda.get_device_properties(idx).total_memory)
            out["vram_total_b"] = self._vram_total_b
        except Exception:
            pass
        if self.vram_budget_b is not None:
            out["vram_budget_b"] = int(self.vram_budget_b)

    def _gpu_util_pct(self) -> float | None:
        if self._nvml_ok is False:
            return None
        if self._nvml is None:
            # found once (NVML's handle lookup matches the CUDA device by UUID / PCI bus id)
            props = None
            try:
                import torch

                props = torch.cuda.get_device_properties(self._device_index())
                idx = self._device_index()
            except Exception:  # noqa: BLE001
                idx = 0
            self._nvml = NvmlDevice(idx, props)
            self._nvml_ok = self._nvml.ok
            self.nvml_error = self._nvml.error
            if not self._nvml_ok:
                return None
        util = self._nvml.utilization_pct()
        if util is None:  # a driver hiccup: stop asking, utilisation just disappears from the panel
            self.nvml_error = self._nvml.error
            self._nvml_ok = False
        return util

    @property
    def nvml_available(self) -> bool:
        """True once NVML answered for this card (False before the first CUDA sample)."""
        return bool(self._nvml_ok)

    def close(self) -> None:
        """Release NVML (safe to call twice)."""
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
            self._nvml_ok = False
