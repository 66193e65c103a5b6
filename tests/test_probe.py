"""ramgpt.probe: the machine probes answer without raising (NVML through a fake driver, the Hub
through local sockets) and the speed measurements time real work."""

from __future__ import annotations

import http.server
import socket
import sys
import threading
import time
import types
from types import SimpleNamespace

import pytest

from ramgpt import probe

GiB = 2**30


class _FakeNvml(types.ModuleType):
    """Three cards in PCI order: an RTX 3050 (sm_86), a GTX 1080 (sm_61), an H100 (sm_90)."""

    CARDS = [
        ("GPU-aaaa-1111", "NVIDIA GeForce RTX 3050", 6 * GiB, 5 * GiB, (8, 6)),
        ("GPU-bbbb-2222", "NVIDIA GeForce GTX 1080", 8 * GiB, 8 * GiB, (6, 1)),
        ("GPU-cccc-3333", b"NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, (9, 0)),
    ]

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.CARDS)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.CARDS[h][0]

    def nvmlDeviceGetName(self, h: int):
        return self.CARDS[h][1]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.CARDS[h][2], free=self.CARDS[h][3])

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self.CARDS[h][4]

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"580.95.05"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> _FakeNvml:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


# ---------------------------------------------------------------------------------------------
# NVML


def test_nvml_gpus_lists_cards_with_free_memory(nvml: _FakeNvml) -> None:
    gpus = probe.nvml_gpus()
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 3050", "NVIDIA GeForce GTX 1080", "NVIDIA H100 80GB HBM3"]
    assert gpus[0] == probe.Gpu(0, "NVIDIA GeForce RTX 3050", 6 * GiB, True, (8, 6), 5 * GiB)
    assert gpus[1].bf16 is False and gpus[2].bf16 is True  # Pascal has none
    assert nvml.shutdowns == 1  # released after the question


@pytest.mark.parametrize(
    "visible,names",
    [
        ("2,0", ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 3050"]),
        ("GPU-bbbb-2222", ["NVIDIA GeForce GTX 1080"]),
        ("bbbb", ["NVIDIA GeForce GTX 1080"]),  # CUDA accepts a UUID prefix without "GPU-"
        ("1,7,0", ["NVIDIA GeForce GTX 1080"]),  # like CUDA: the list ends at the first bad entry
        ("", []),
        ("-1", []),
    ],
)
def test_nvml_gpus_follow_cuda_visible_devices(nvml, monkeypatch, visible, names) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpus = probe.nvml_gpus()
    assert [g.name for g in gpus] == names
    assert [g.index for g in gpus] == list(range(len(names)))  # renumbered as CUDA numbers them


def test_nvml_driver(nvml: _FakeNvml) -> None:
    assert probe.nvml_driver() == {"driver": "580.95.05", "cuda": "13.0"}


def test_nvml_absent_answers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(fail_init=True))
    assert probe.nvml_gpus() == () and probe.nvml_driver() is None
    dev = probe.NvmlDevice(0)
    assert not dev.ok and "Library Not Found" in (dev.error or "") and dev.utilization_pct() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import raises
    assert probe.nvml_gpus() == ()


def test_probe_machine_through_nvml(nvml: _FakeNvml) -> None:
    m = probe.probe_machine(gpus="nvml")
    assert m.cuda and m.gpu("cuda:2").name == "NVIDIA H100 80GB HBM3" and m.gpu("cuda:3") is None
    assert m.ram_total_b and m.ram_available_b and m.cpu_count == probe.usable_cores() >= 1


def test_ram_and_cores() -> None:
    total, avail = probe.ram()
    assert 0 < avail <= total
    assert 1 <= probe.usable_cores()


# ---------------------------------------------------------------------------------------------
# the Hub


def test_hub_offline_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not probe.hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert probe.hub_offline()


def test_hub_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert probe.hub_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080/")
    assert probe.hub_endpoint() == "http://mirror.local:8080"


def test_hub_refused_is_unreachable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    ans = probe.hub_ping(2.0, endpoint="http://127.0.0.1:9")  # the discard port: refused at once
    assert not ans.ok and "Connection refused" in ans.detail and "\n" not in ans.detail
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert probe.hub_reachable(2.0) is False


def test_hub_silent_server_times_out() -> None:
    # a listening socket that never accepts: connections complete, no HTTP answer ever comes
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        t0 = time.monotonic()
        ans = probe.hub_ping(1.0, endpoint=f"http://127.0.0.1:{server.getsockname()[1]}")
        assert not ans.ok and time.monotonic() - t0 < 3


def test_hub_any_http_answer_counts() -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            assert self.headers.get("Authorization") is None  # no credentials, ever
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), NotFound) as server:
        threading.Thread(target=server.handle_request, daemon=True).start()
        ping = probe.HubPing(2.0, endpoint=f"http://127.0.0.1:{server.server_address[1]}")
        ans = ping.result()
        assert ans.ok and ans.detail.startswith("HTTP 404 in ")


# ---------------------------------------------------------------------------------------------
# speed


def test_measure_matmul_on_the_cpu() -> None:
    r = probe.measure_matmul("cpu", (64, 128, 256), min_s=0.05)
    assert r.device == "cpu" and r.dtype == "fp32" and r.shape == (64, 128, 256)
    assert r.tflops > 0 and r.seconds > 0  # min_s or max_reps, whichever comes first
    assert set(r.to_dict()) == {"device", "device_name", "dtype", "shape", "tflops", "seconds"}


def test_measure_adamw() -> None:
    import torch

    r = probe.measure_adamw(2**16, min_s=0.02)
    assert r.params == 2**16 and r.threads == torch.get_num_threads() and r.params_per_s > 0 and r.seconds > 0


def test_measure_speed_without_cuda_is_none() -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - the GPU machine
        pytest.skip("this machine has CUDA")
    assert probe.measure_speed("cuda", (64, 64, 64)) is None
    cpu = probe.measure_speed("cpu", (32, 64, 64))
    assert cpu is not None and cpu.pinned is None and cpu.matmul.tflops > 0 and cpu.adamw.params_per_s > 0


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_measure_on_the_gpu() -> None:  # pragma: no cover - the GPU machine
    s = probe.measure_speed("cuda", (4096, 1536, 6144))
    assert s is not None and s.matmul.dtype in ("bf16", "fp16") and s.matmul.tflops > 1
    assert s.pinned is not None and s.pinned.h2d_gbps > 1 and s.pinned.d2h_gbps > 1
