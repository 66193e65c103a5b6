"""System stats: CPU keys only on CPU, CUDA/NVML keys when available, and never an exception
from a failing probe."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import psutil
import pytest
import torch

from ramgpt.sysstats import SystemStats

CPU_KEYS = {"rss_b", "ram_available_b", "ram_total_b"}
GPU_KEYS = {"vram_allocated_b", "vram_reserved_b", "vram_peak_reserved_b", "vram_total_b", "gpu_util_pct"}


def test_cpu_sample_has_only_cpu_keys() -> None:
    s = SystemStats("cpu").sample()
    assert set(s) == CPU_KEYS
    assert 0 < s["rss_b"] < s["ram_total_b"] and 0 < s["ram_available_b"] <= s["ram_total_b"]
    assert all(isinstance(v, int) for v in s.values())


def test_pinned_bytes_from_the_engine_and_failing_probes_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SystemStats("cpu", pinned_bytes_fn=lambda: 123).sample()["pinned_b"] == 123

    def boom() -> int:
        raise RuntimeError("engine gone")

    stats = SystemStats("cpu", pinned_bytes_fn=boom)
    monkeypatch.setattr(stats._process, "memory_info", lambda: (_ for _ in ()).throw(psutil.Error("denied")))
    s = stats.sample()
    assert "pinned_b" not in s and "rss_b" not in s and "ram_total_b" in s


def test_cuda_device_without_cuda_never_raises() -> None:
    # This machine's torch has no CUDA and no NVML driver: the GPU probes fail quietly.
    stats = SystemStats("cuda", vram_budget_b=5 << 30)
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present")
    s = stats.sample()
    assert CPU_KEYS <= set(s) and s["vram_budget_b"] == 5 << 30
    assert not (GPU_KEYS & set(s))
    assert set(stats.sample()) == set(s)  # the failed NVML probe is not retried, nor fatal
    stats.close()


class _FakeNvml(types.ModuleType):
    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.inits = 0
        self.lookups: list[str] = []

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.lookups.append(uuid)
        if not uuid.startswith("GPU-"):
            raise RuntimeError("not found")
        return "handle"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        assert handle == "handle"
        return SimpleNamespace(gpu=55, memory=20)

    def nvmlShutdown(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(total_memory=8 << 30, uuid="1234-abcd")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 1 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 2 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda i: 3 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cuda_sample_with_nvml(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    stats = SystemStats("cuda:0", vram_budget_b=6 << 30)
    for _ in range(3):
        s = stats.sample()
    assert s["vram_allocated_b"] == 1 << 30 and s["vram_reserved_b"] == 2 << 30
    assert s["vram_peak_reserved_b"] == 3 << 30 and s["vram_total_b"] == 8 << 30
    assert s["vram_budget_b"] == 6 << 30 and s["gpu_util_pct"] == 55.0
    assert nvml.inits == 1 and nvml.lookups == ["1234-abcd", "GPU-1234-abcd"]  # handle cached
    assert stats.nvml_available
    stats.close()


class _SamplingNvml(_FakeNvml):
    """A driver that keeps utilisation samples: (timestamp µs, percent)."""

    NVML_GPU_UTILIZATION_SAMPLES = 1

    def __init__(self) -> None:
        super().__init__()
        self.buffer: list[tuple[int, int]] = []
        self.asked: list[int] = []

    def nvmlDeviceGetSamples(self, handle, kind, since):
        assert handle == "handle" and kind == 1
        self.asked.append(since)
        new = [(t, v) for t, v in self.buffer if t > since]
        if not new:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return 1, [SimpleNamespace(timeStamp=t, sampleValue=SimpleNamespace(uiVal=v)) for t, v in new]


def test_gpu_util_is_the_mean_since_the_last_sample(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = _SamplingNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    stats = SystemStats("cuda:0")
    nvml.buffer = [(100, 90), (200, 80), (300, 0)]  # busy during the step, idle at its end
    assert stats.sample()["gpu_util_pct"] == pytest.approx(170 / 3)
    nvml.buffer += [(400, 40), (500, 60)]
    assert stats.sample()["gpu_util_pct"] == pytest.approx(50.0)  # only the two new samples
    assert nvml.asked == [0, 300]
    # no new samples since: the instantaneous rate
    assert stats.sample()["gpu_util_pct"] == 55.0
    stats.close()


def test_cuda_sample_when_nvml_fails(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(fail_init=True))
    stats = SystemStats("cuda")
    s = stats.sample()
    assert "vram_reserved_b" in s and "gpu_util_pct" not in s and "vram_budget_b" not in s
    assert not stats.nvml_available and "Library Not Found" in (stats.nvml_error or "")
    assert "gpu_util_pct" not in SystemStats("cuda", use_nvml=False).sample()
