"""Process, host-RAM and GPU memory numbers for the metric sinks.

Training calls :meth:`SystemStats.sample` once per log step, so every probe here is cheap
(psutil reads /proc, torch reads its allocator counters, NVML answers from the driver) and
the NVML handle is looked up once. A probe that fails leaves its key out instead of raising:
a missing number on the dashboard is better than a training run stopped by a stats call.
Keys follow ``docs/interfaces.md``; on a CPU run only the CPU keys appear (never zeros for a
GPU that is not there).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import psutil


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
        self._nvml: Any = None
        self._nvml_handle: Any = None
        # None: not tried yet; False: unavailable (import failed, no driver, no matching card).
        self._nvml_ok: bool | None = None if (use_nvml and self.is_cuda) else False
        self.nvml_error: str | None = None
        self._util_ts = 0  # driver timestamp (µs) of the newest utilisation sample already averaged

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
        try:
            vm = psutil.virtual_memory()
            out["ram_available_b"] = int(vm.available)
            out["ram_total_b"] = int(vm.total)
        except Exception:
            pass
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

    def _init_nvml(self) -> bool:
        """Find this process's card in NVML. CUDA indices and NVML indices differ when
        CUDA_VISIBLE_DEVICES reorders cards, so match by UUID (then PCI bus id) first."""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # no package, no driver, or no GPU
            self.nvml_error = f"{type(e).__name__}: {e}"
            return False
        handle = None
        try:
            import torch

            props = torch.cuda.get_device_properties(self._device_index())
            uuid = getattr(props, "uuid", None)
            if uuid is not None:
                text = str(uuid)
                for cand in (text, f"GPU-{text}", f"MIG-{text}"):
                    try:
                        handle = pynvml.nvmlDeviceGetHandleByUUID(cand)
                        break
                    except Exception:
                        continue
            if handle is None and getattr(props, "pci_bus_id", None) is not None:
                bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
                try:
                    handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
                except Exception:
                    handle = None
        except Exception:
            handle = None
        if handle is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            try:  # indices agree when nothing remaps the cards
                handle = pynvml.nvmlDeviceGetHandleByIndex(self._device_index())
            except Exception as e:
                self.nvml_error = f"{type(e).__name__}: {e}"
        if handle is None:
            self.nvml_error = self.nvml_error or "could not match the CUDA device to an NVML device"
            return False
        self._nvml_handle = handle
        return True

    def _gpu_util_pct(self) -> float | None:
        if self._nvml_ok is False:
            return None
        if self._nvml_ok is None:
            self._nvml_ok = self._init_nvml()
            if not self._nvml_ok:
                return None
        try:
            avg = self._util_since_last()
            if avg is not None:
                return avg
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu)
        except Exception as e:
            # A driver hiccup: stop asking, utilisation just disappears from the panel.
            self.nvml_error = f"{type(e).__name__}: {e}"
            self._nvml_ok = False
            return None

    def _util_since_last(self) -> float | None:
        """Mean of the driver's utilisation samples taken since the previous call, so a sample
        read at the end of a training step (after the CPU optimizer, the GPU idle) still says how
        busy the GPU was during the step. None where the driver keeps no samples; the caller
        then reads the instantaneous rate."""
        nv = self._nvml
        try:
            vtype, samples = nv.nvmlDeviceGetSamples(self._nvml_handle, nv.NVML_GPU_UTILIZATION_SAMPLES, self._util_ts)
        except Exception:  # NVMLError_NotFound (no new samples), NotSupported, an old pynvml
            return None
        fresh = [x for x in samples if x.timeStamp > self._util_ts]
        if not fresh:
            return None
        self._util_ts = max(x.timeStamp for x in fresh)
        field = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal"}.get(vtype, "uiVal")
        return sum(float(getattr(x.sampleValue, field)) for x in fresh) / len(fresh)

    @property
    def nvml_available(self) -> bool:
        """True once NVML answered for this card (False before the first CUDA sample)."""
        return bool(self._nvml_ok)

    def close(self) -> None:
        """Release NVML (safe to call twice)."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
            self._nvml_handle = None
            self._nvml_ok = False
