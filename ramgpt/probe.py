"""What this machine has: the one home of machine probes (CUDA through torch, NVML, psutil, the
Hugging Face Hub's reachability, and short speed measurements).

Everything that asks the machine a question lives here, so ``placement``, ``memory``, ``doctor``,
``generate`` and the training-time ``sysstats`` sampler agree on the answers. Probes never raise:
a probe that cannot answer returns None, an empty tuple, or a result that says what failed. The
measurements (:func:`measure_matmul`, :func:`measure_pinned`) are the exception: they allocate and
time real work, take a second or less, and raise when the device cannot do it.

Nothing here is imported at module level beyond the standard library: torch, pynvml and psutil
are imported by the probe that needs them, so ``import ramgpt.probe`` is free.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Gpu:
    """One CUDA device as torch (or NVML) sees it (creating no allocations)."""

    index: int
    name: str
    total_b: int
    bf16: bool
    capability: tuple[int, int] = (0, 0)
    free_b: int | None = None  # free memory when asked through NVML (None from torch: no context made)


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


# ---------------------------------------------------------------------------------------------
# CUDA through torch


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


# ---------------------------------------------------------------------------------------------
# NVML: driver facts without torch and without a CUDA context


@contextlib.contextmanager
def _nvml() -> Iterator[Any]:
    """The initialised ``pynvml`` module, or None without the package or a driver; shut down after."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no package, no driver, no GPU
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_driver() -> dict[str, str] | None:
    """``{"driver": "580.95.05", "cuda": "13.0"}`` (the CUDA version the driver supports), or None."""
    with _nvml() as nv:
        if nv is None:
            return None
        try:
            cv = int(nv.nvmlSystemGetCudaDriverVersion())
            return {"driver": _text(nv.nvmlSystemGetDriverVersion()), "cuda": f"{cv // 1000}.{(cv % 1000) // 10}"}
        except Exception:  # noqa: BLE001
            return None


def _visible_handles(nv: Any) -> list[Any]:
    """NVML handles in CUDA's numbering under ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs; like CUDA,
    the list ends at the first entry that names no device). NVML counts in PCI bus order, CUDA by
    default fastest first: on a machine with different cards the two may disagree unless
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``."""
    count = int(nv.nvmlDeviceGetCount())
    allh = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is None:
        return allh
    uuids = []
    for h in allh:
        try:
            uuids.append(_text(nv.nvmlDeviceGetUUID(h)))
        except Exception:  # noqa: BLE001
            uuids.append("")
    out = []
    for tok in (t.strip() for t in vis.split(",")):
        if tok.lstrip("-").isdigit():
            i = int(tok)
            if not 0 <= i < count:
                break
            out.append(allh[i])
            continue
        match = [h for h, u in zip(allh, uuids) if tok and u.startswith(tok if tok[:4] in ("GPU-", "MIG-") else "GPU-" + tok)]
        if len(match) != 1:
            break
        out.append(match[0])
    return out


def nvml_gpus() -> tuple[Gpu, ...]:
    """The GPUs the driver reports, with their free memory, without importing torch or creating a
    CUDA context (what ``estimate-memory`` plans with). An empty tuple without NVML."""
    with _nvml() as nv:
        if nv is None:
            return ()
        try:
            out = []
            for i, h in enumerate(_visible_handles(nv)):
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    cap = tuple(int(x) for x in nv.nvmlDeviceGetCudaComputeCapability(h))
                except Exception:  # noqa: BLE001 - an old driver: assume a recent card
                    cap = (8, 0)
                out.append(Gpu(i, _text(nv.nvmlDeviceGetName(h)), int(mem.total), cap[0] >= 8, (cap[0], cap[1]), int(mem.free)))
            return tuple(out)
        except Exception:  # noqa: BLE001
            return ()


class NvmlDevice:
    """A long-lived NVML handle for one CUDA device (the training-time sampler's utilisation).

    CUDA indices and NVML indices differ when ``CUDA_VISIBLE_DEVICES`` reorders cards, so the card
    is matched by UUID, then PCI bus id (from torch's device properties ``props``), and by index
    only when nothing remaps the cards. ``ok`` is False (and ``error`` says why) when that fails."""

    def __init__(self, cuda_index: int, props: Any = None) -> None:
        self.error: str | None = None
        self._nv: Any = None
        self._handle: Any = None
        self._util_ts = 0  # driver timestamp (µs) of the newest utilisation sample already averaged
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
        except Exception as e:  # noqa: BLE001 - no package, no driver, or no GPU
            self.error = f"{type(e).__name__}: {e}"
            return
        nv = self._nv
        handle = None
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            text = str(uuid)
            for cand in (text, f"GPU-{text}", f"MIG-{text}"):
                try:
                    handle = nv.nvmlDeviceGetHandleByUUID(cand)
                    break
                except Exception:  # noqa: BLE001
                    continue
        if handle is None and getattr(props, "pci_bus_id", None) is not None:
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            try:
                handle = nv.nvmlDeviceGetHandleByPciBusId(bus)
            except Exception:  # noqa: BLE001
                handle = None
        if handle is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            try:  # indices agree when nothing remaps the cards
                handle = nv.nvmlDeviceGetHandleByIndex(cuda_index)
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"
        if handle is None:
            self.error = self.error or "could not match the CUDA device to an NVML device"
            self.close()
            return
        self._handle = handle

    @property
    def ok(self) -> bool:
        return self._handle is not None

    def utilization_pct(self) -> float | None:
        """GPU utilisation: the mean of the driver's samples since the previous call (so a sample
        read at the end of a training step, after the CPU optimizer with the GPU idle, still says
        how busy the GPU was during the step), else the instantaneous rate. None after a failure,
        and the handle is not asked again."""
        if self._handle is None:
            return None
        try:
            avg = self._util_since_last()
            if avg is not None:
                return avg
            return float(self._nv.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except Exception as e:  # noqa: BLE001 - a driver hiccup: utilisation just disappears
            self.error = f"{type(e).__name__}: {e}"
            self._handle = None
            return None

    def _util_since_last(self) -> float | None:
        nv = self._nv
        try:
            vtype, samples = nv.nvmlDeviceGetSamples(self._handle, nv.NVML_GPU_UTILIZATION_SAMPLES, self._util_ts)
        except Exception:  # noqa: BLE001 - NVMLError_NotFound (no new samples), NotSupported, an old pynvml
            return None
        fresh = [x for x in samples if x.timeStamp > self._util_ts]
        if not fresh:
            return None
        self._util_ts = max(x.timeStamp for x in fresh)
        name = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal"}.get(vtype, "uiVal")
        return sum(float(getattr(x.sampleValue, name)) for x in fresh) / len(fresh)

    def close(self) -> None:
        """Release NVML (safe to call twice)."""
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
        self._nv = None
        self._handle = None


# ---------------------------------------------------------------------------------------------
# host RAM and cores


def ram() -> tuple[int, int] | None:
    """(total, available) bytes of host RAM, or None."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # noqa: BLE001
        return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_machine(*, gpus: str = "torch") -> Machine:
    """This machine. ``gpus="torch"`` lists what torch can use (what training runs on);
    ``gpus="nvml"`` asks the driver instead: no torch import, no CUDA context, free memory included
    (what ``estimate-memory`` plans with)."""
    r = ram()
    found = nvml_gpus() if gpus == "nvml" else cuda_gpus()
    return Machine(gpus=found, ram_total_b=r[0] if r else None, ram_available_b=r[1] if r else None,
                   cpu_count=usable_cores())


# ---------------------------------------------------------------------------------------------
# the Hugging Face Hub


def hub_endpoint() -> str:
    """The Hub's base URL (``HF_ENDPOINT``, as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


_TRUE = ("1", "true", "yes", "on")


def hub_offline(variables: tuple[str, ...] = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) -> bool:
    """Offline mode is set: one of ``variables`` is true (the datasets library has its own,
    ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in variables)


@dataclass(frozen=True)
class HubAnswer:
    ok: bool
    detail: str  # "HTTP 200 in 0.3 s", or why not


class HubPing:
    """One HEAD request to the Hub in a daemon thread, started now and read later.

    A real request, not a TCP connect, because some sandboxes accept every connection and never
    answer; a thread, because name resolution ignores socket timeouts and an unanswered DNS query
    must not hold the caller longer than ``timeout``. Any HTTP status counts as an answer; so does a
    TLS failure (something answered: say, a proxy with its own CA that the hub client is set up for).
    No credentials are sent. Proxies come from the environment, as urllib reads them."""

    def __init__(self, timeout: float = 3.0, endpoint: str | None = None) -> None:
        self.timeout = float(timeout)
        self.url = endpoint.rstrip("/") if endpoint else hub_endpoint()
        self._answer: HubAnswer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="ramgpt-hub-probe")
        self._thread.start()

    def _run(self) -> None:
        import ssl
        import urllib.error
        import urllib.request

        from ramgpt.fmt import error_line

        t0 = time.perf_counter()
        try:
            req = urllib.request.Request(self.url, method="HEAD", headers={"User-Agent": "ramgpt"})
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                self._answer = HubAnswer(True, f"HTTP {r.status} in {time.perf_counter() - t0:.1f} s")
        except urllib.error.HTTPError as e:  # the server answered, just not with 2xx
            self._answer = HubAnswer(True, f"HTTP {e.code} in {time.perf_counter() - t0:.1f} s")
        except urllib.error.URLError as e:
            ok = isinstance(e.reason, ssl.SSLError)
            self._answer = HubAnswer(ok, ("TLS error, but something answered: " if ok else "") + error_line(e)[:160])
        except Exception as e:  # noqa: BLE001
            self._answer = HubAnswer(False, error_line(e)[:160])

    def result(self) -> HubAnswer:
        self._thread.join(self.timeout + 0.5)
        if self._answer is None:
            return HubAnswer(False, f"no answer within {self.timeout + 0.5:.1f} s")
        return self._answer


def hub_ping(timeout: float = 3.0, endpoint: str | None = None) -> HubAnswer:
    """Ask the Hub (``endpoint``, default ``HF_ENDPOINT``) and wait at most ``timeout`` + 0.5 s."""
    return HubPing(timeout, endpoint).result()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers an HTTP request within ``timeout`` seconds (see :class:`HubPing`)."""
    return hub_ping(timeout).ok


# ---------------------------------------------------------------------------------------------
# speed: a short timed matmul and pinned-memory copies (torch; a second or less each)


@dataclass(frozen=True)
class MatmulRate:
    """Dense matmul throughput measured on one device."""

    device: str  # "cpu" or "cuda:N"
    device_name: str
    dtype: str  # "bf16" on GPUs, "fp32" on the CPU
    shape: tuple[int, int, int]  # (m, k, n): (m x k) @ (k x n)
    tflops: float
    seconds: float  # time spent timing (after the warm-up)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PinnedRate:
    """Host<->device copy rates from page-locked host memory."""

    pinned_b: int  # bytes page-locked
    pin_s: float  # time to page-lock them
    copy_b: int  # bytes per timed copy
    h2d_gbps: float
    d2h_gbps: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def measure_matmul(device: str, shape: tuple[int, int, int], *, min_s: float = 0.25, max_reps: int = 200) -> MatmulRate:
    """Time ``(m x k) @ (k x n)`` on ``device``: bf16 on a GPU (fp16 where the card has no bf16),
    fp32 on the CPU. One warm-up, then repetitions until ``min_s`` has passed. Raises when the
    device cannot run it (no CUDA, out of memory)."""
    import torch

    m, k, n = (max(1, int(x)) for x in shape)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        name = torch.cuda.get_device_name(dev)
        label = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    else:
        dtype = torch.float32
        name = "CPU"
        label = "cpu"
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(k, n, device=dev, dtype=dtype)
    out = torch.empty(m, n, device=dev, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, cuBLAS workspace
    _sync(device)
    reps = 0
    t0 = time.perf_counter()
    elapsed = 0.0
    while elapsed < min_s and reps < max_reps:
        torch.mm(a, b, out=out)
        reps += 1
        if dev.type != "cuda" or reps % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - t0
    _sync(device)
    elapsed = time.perf_counter() - t0
    del a, b, out
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return MatmulRate(label, name, dt, (m, k, n), 2.0 * m * k * n * reps / elapsed / 1e12, elapsed)


def measure_pinned(pin_bytes: int, device: str = "cuda", *, copy_bytes: int = 256 * MiB, reps: int = 4) -> PinnedRate:
    """Page-lock ``pin_bytes`` of host memory (can it be done, and how long does it take), then
    time ``reps`` copies of ``min(pin_bytes, copy_bytes)`` each way. Raises when pinning fails."""
    import torch

    t0 = time.perf_counter()
    host = torch.empty(int(pin_bytes), dtype=torch.uint8, pin_memory=True)
    pin_s = time.perf_counter() - t0
    n = int(min(pin_bytes, copy_bytes))
    src = host[:n]
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    dev.copy_(src, non_blocking=True)
    src.copy_(dev, non_blocking=True)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dev.copy_(src, non_blocking=True)
    _sync(device)
    h2d = reps * n / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    for _ in range(reps):
        src.copy_(dev, non_blocking=True)
    _sync(device)
    d2h = reps * n / (time.perf_counter() - t0) / 1e9
    del host, src, dev
    torch.cuda.empty_cache()
    return PinnedRate(int(pin_bytes), pin_s, n, h2d, d2h)


@dataclass(frozen=True)
class AdamwRate:
    """The CPU's fused AdamW step over fp32 parameters (the streamed engine's optimizer)."""

    params: int
    threads: int
    params_per_s: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_adamw(params: int = 2**23, *, min_s: float = 0.1, max_reps: int = 50) -> AdamwRate:
    """Time ``torch.optim.AdamW(fused=True)`` steps over ``params`` fp32 parameters on the CPU
    (8 Mi by default: 128 MiB of weights, grads and moments, past any cache, as the real 1.1 B are)."""
    import torch

    p = torch.nn.Parameter(torch.zeros(int(params)))
    p.grad = torch.full_like(p, 1e-3)
    try:
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
        opt.step()  # allocates the moments
    except (RuntimeError, TypeError):  # an old torch without the fused CPU kernel
        opt = torch.optim.AdamW([p], lr=1e-4, foreach=True)
        opt.step()
    reps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min_s and reps < max_reps:
        opt.step()
        reps += 1
    elapsed = time.perf_counter() - t0
    return AdamwRate(int(params), torch.get_num_threads(), params * reps / elapsed, elapsed)


@dataclass(frozen=True)
class Speed:
    """What :func:`measure_speed` found: the matmul rate, the pinned link on a GPU, and the CPU's
    AdamW rate."""

    matmul: MatmulRate
    pinned: PinnedRate | None = None
    adamw: AdamwRate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "matmul": self.matmul.to_dict(),
            "pinned": self.pinned.to_dict() if self.pinned else None,
            "adamw": self.adamw.to_dict() if self.adamw else None,
        }


def measure_speed(device: str, shape: tuple[int, int, int], *, pin_bytes: int = 256 * MiB) -> Speed | None:
    """The matmul rate of ``device`` at ``shape``, on a GPU the pinned copy rates, and the CPU's
    AdamW rate; about a second in all, plus torch's import and CUDA's start. None when ``device``
    is a GPU that torch cannot use, or the matmul cannot be timed."""
    try:
        matmul = measure_matmul(device, shape)
    except Exception:  # noqa: BLE001 - no rate, no projection; never a crash
        return None
    pinned = None
    if device.startswith("cuda"):
        try:
            pinned = measure_pinned(pin_bytes, device)
        except Exception:  # noqa: BLE001
            pinned = None
    try:
        adamw = measure_adamw()
    except Exception:  # noqa: BLE001 - the assumed rate stands in
        adamw = None
    return Speed(matmul, pinned, adamw)


__all__ = [
    "AdamwRate",
    "Gpu",
    "HubAnswer",
    "HubPing",
    "Machine",
    "MatmulRate",
    "NvmlDevice",
    "PinnedRate",
    "Speed",
    "cuda_gpus",
    "hub_endpoint",
    "hub_offline",
    "hub_ping",
    "hub_reachable",
    "measure_adamw",
    "measure_matmul",
    "measure_pinned",
    "measure_speed",
    "nvml_driver",
    "nvml_gpus",
    "probe_machine",
    "ram",
    "usable_cores",
]


def private_rss() -> int:
    """This process's resident memory without the shared-memory pages it maps (``RssAnon +
    RssFile`` of /proc/self/status): the node's ranks map one copy of the training state, which a
    plain sum of their RSS would count once per rank. Falls back to the RSS."""
    try:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    name, value = line.split(":", 1)
                    fields[name] = int(value.split()[0]) * 1024
        if len(fields) == 2:
            return sum(fields.values())
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - a probe never raises
        return 0
