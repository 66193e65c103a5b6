"""Machine checks for ``ramgpt doctor``: one :class:`CheckResult` per check, never printing.

Every probe runs inside try/except, so one broken probe becomes a failed check with its
one-line error instead of a crash. The expensive parts run concurrently and bounded: torch,
CUDA and the package imports in one child process (a crashing CUDA driver or a broken package
cannot take the command down), the Hub reachability check in a thread with a ~2 s limit.
Secrets are only ever reported as "present" or "absent".
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ramgpt import probe
from ramgpt.fmt import error_line, fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ramgpt.config import Profile
    from ramgpt.memory import MemoryEstimate

Status = Literal["ok", "warn", "fail"]

GiB = 2**30
MiB = 2**20

PACKAGES = ("torch", "ramtorch", "transformers", "datasets", "huggingface_hub", "wandb", "triton")
DEFAULT_PIN_BYTES = 256 * MiB
MAX_PIN_BYTES = 8 * GiB
CHILD_TIMEOUT_S = 60.0  # a hang guard: a cold `import torch` on a busy 2-core machine took 25 s
HUB_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor table."""

    name: str
    status: Status
    message: str
    remedy: str = ""
    blocking: bool = False  # a failure here means training cannot start
    group: str = "system"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def blocking_failures(results: list[CheckResult]) -> bool:
    """True when a check that blocks training failed (the CLI exits non-zero)."""
    return any(r.status == "fail" and r.blocking for r in results)


# ---------------------------------------------------------------------------------------------
# the child processes: torch, CUDA, pinned memory, a matmul, package imports (ramgpt.doctor_child)


class _Child:
    """The torch/CUDA/imports probe, started early and collected late: one child process for
    torch, CUDA, pinned memory, the matmul rate and ramtorch, a second one (in parallel) for the
    other packages. Both run :mod:`ramgpt.doctor_child` from the ramgpt this process imported."""

    GROUPS = (("torch", "ramtorch"), ("transformers", "datasets", "huggingface_hub", "wandb"))

    def __init__(self, pin_bytes: int, matmul: tuple[int, int, int] | None = None):
        import ramgpt

        root = str(Path(ramgpt.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": root + (os.pathsep + path if path else ""),
        }
        self.procs = []
        for i, group in enumerate(self.GROUPS):
            args = [sys.executable, "-m", "ramgpt.doctor_child", str(int(pin_bytes) if i == 0 else -1), ",".join(group)]
            if i == 0 and matmul is not None:
                args += ["--matmul", ",".join(str(int(x)) for x in matmul)]
            self.procs.append(
                subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            )
        self._result: dict[str, Any] | None = None
        self._error: Exception | None = None

    def _collect(self, proc: subprocess.Popen, deadline: float) -> dict[str, Any]:
        from ramgpt.doctor_child import MARKER

        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"the torch/CUDA/import probe did not finish in {CHILD_TIMEOUT_S:.0f} s") from None
        for line in reversed(out.splitlines()):
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER) :])
        tail = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"the torch/CUDA/import probe crashed: {tail[:200]}")

    def result(self) -> dict[str, Any]:
        if self._result is not None:
            return self._result
        if self._error is not None:  # every check that asks again gets the first answer
            raise self._error
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        try:
            first = self._collect(self.procs[0], deadline)
        except Exception as e:
            self._error = e
            raise
        try:
            second = self._collect(self.procs[1], deadline)
        except Exception as e:
            second = {"packages": {n: {"ok": False, "error": error_line(e)} for n in self.GROUPS[1]}}
        first["packages"].update(second["packages"])
        self._result = first
        return first

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


# ---------------------------------------------------------------------------------------------
# context shared by the probes


@dataclass
class _Ctx:
    profile: Profile | None
    child: _Child | None
    hub: probe.HubPing | None
    estimate: MemoryEstimate | None = None
    estimate_error: str | None = None

    def torch_info(self) -> dict[str, Any]:
        if self.child is None:
            raise RuntimeError("torch probe not started")
        info = self.child.result()
        return info


# ---------------------------------------------------------------------------------------------
# probes: each returns one CheckResult or a list of them


def _probe_python(ctx: _Ctx) -> CheckResult:
    v = sys.version_info
    text = f"Python {platform.python_version()} ({sys.executable})"
    if (v.major, v.minor) < (3, 10):
        return CheckResult("python", "fail", text, "install Python 3.10 or newer", blocking=True)
    return CheckResult("python", "ok", text)


def _probe_torch(ctx: _Ctx) -> list[CheckResult]:
    info = ctx.torch_info()
    pkg = info["packages"].get("torch", {})
    if not pkg.get("ok"):
        return [
            CheckResult(
                "torch",
                "fail",
                f"torch does not import: {pkg.get('error', 'unknown error')}",
                "pip install 'torch>=2.5' (see pytorch.org for the CUDA build matching your driver)",
                blocking=True,
                group="gpu",
            )
        ]
    t = info["torch"] or {}
    out = [CheckResult("torch", "ok", f"torch {t.get('version')}", group="gpu")]
    build = t.get("cuda_build")
    driver = _driver_cuda_version()
    if build is None:
        msg = "CPU-only torch build"
        if driver:
            return out + [
                CheckResult(
                    "torch CUDA build",
                    "warn",
                    f"{msg}, but an NVIDIA driver (CUDA {driver}) is present",
                    "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu126)",
                    group="gpu",
                )
            ]
        return out + [CheckResult("torch CUDA build", "ok", f"{msg} (no NVIDIA driver found)", group="gpu")]
    if driver is None:
        return out + [
            CheckResult(
                "torch CUDA build",
                "warn",
                f"torch built for CUDA {build}; no NVIDIA driver found",
                "install the NVIDIA driver to train on the GPU",
                group="gpu",
            )
        ]
    if _ver_tuple(driver) < _ver_tuple(build)[:2]:
        return out + [
            CheckResult(
                "torch CUDA build",
                "fail",
                f"torch built for CUDA {build}, but the driver supports CUDA {driver} only",
                f"update the NVIDIA driver (to one supporting CUDA {build}) or install a torch build for CUDA <= {driver}",
                group="gpu",
            )
        ]
    return out + [
        CheckResult(
            "torch CUDA build", "ok", f"torch built for CUDA {build}; driver supports CUDA {driver}", group="gpu"
        )
    ]


def _ver_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in str(v).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _driver_cuda_version() -> str | None:
    info = probe.nvml_driver()
    if info:
        return info["cuda"]
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=5).stdout
    except Exception:
        return None
    marker = "CUDA Version:"
    if marker in out:
        return out.split(marker, 1)[1].split()[0].strip(" |")
    return None


def _probe_gpu(ctx: _Ctx) -> list[CheckResult]:
    info = ctx.torch_info()
    t = info.get("torch") or {}
    if not t.get("cuda"):
        why = t.get("cuda_error") or (
            "CPU-only torch build" if t.get("cuda_build") is None else "torch sees no CUDA device"
        )
        return [
            CheckResult(
                "GPU",
                "warn",
                f"no CUDA GPU ({why}): training will use the CPU",
                "fine for --micro-test; for real runs use a machine with an NVIDIA GPU and a CUDA build of torch",
                group="gpu",
            )
        ]
    cap = t.get("capability") or [0, 0]
    nv = probe.nvml_driver() or {}
    msg = (
        f"{t.get('name')} (sm_{cap[0]}{cap[1]}), {fmt_bytes(t.get('total', 0))} total, {fmt_bytes(t.get('free', 0))} free, "
        f"driver {nv.get('driver', '?')}"
    )
    out = [CheckResult("GPU", "ok", msg, group="gpu")]
    if t.get("bf16"):
        out.append(CheckResult("bf16", "ok", "bf16 supported: precision auto -> bf16", group="gpu"))
    else:
        out.append(
            CheckResult(
                "bf16",
                "warn",
                "no bf16 on this GPU: precision auto -> fp16 with loss scaling",
                "expected on pre-Ampere cards; fp16 works but overflows are possible",
                group="gpu",
            )
        )
    if cap[0] < 7:
        out.append(
            CheckResult(
                "compute capability",
                "warn",
                f"sm_{cap[0]}{cap[1]} is old; recent torch builds may not ship kernels for it",
                "use a Volta (sm_70) or newer GPU",
                group="gpu",
            )
        )
    return out


def _probe_cpu(ctx: _Ctx) -> CheckResult:
    n = os.cpu_count() or 1
    usable = probe.usable_cores()
    msg = f"{usable} usable CPU cores" + (f" (of {n})" if usable != n else "")
    if usable < 4:
        return CheckResult(
            "CPU cores", "warn", msg, "the CPU AdamW step of the streamed engine will be slow; 6+ cores help"
        )
    return CheckResult("CPU cores", "ok", msg)


def _ram() -> tuple[int, int]:
    r = probe.ram()
    if r is None:
        raise RuntimeError("psutil cannot read the RAM (is psutil installed?)")
    return r


def _probe_ram(ctx: _Ctx) -> CheckResult:
    total, avail = _ram()
    msg = f"{fmt_bytes(total)} total, {fmt_bytes(avail)} available"
    if avail < 4 * GiB:
        return CheckResult("RAM", "warn", msg, "close other programs: the 1b profile needs ~23 GiB")
    return CheckResult("RAM", "ok", msg)


def _pin_size(profile: Profile | None) -> int:
    if profile is None:
        return DEFAULT_PIN_BYTES
    from ramgpt.memory import chunk_sizes

    bf16 = sum(c.params for c in chunk_sizes(profile.model)) * 2
    try:
        avail = _ram()[1]
    except Exception:
        avail = 2 * MAX_PIN_BYTES
    return int(max(MiB, min(bf16, MAX_PIN_BYTES, avail // 2)))


def _probe_pinned(ctx: _Ctx) -> CheckResult:
    info = ctx.torch_info()
    t = info.get("torch") or {}
    size = _pin_size(ctx.profile)
    if not t.get("cuda"):
        return CheckResult("pinned memory", "ok", "no CUDA: skipped", group="gpu")
    if not t.get("pin_ok"):
        return CheckResult(
            "pinned memory",
            "fail",
            f"could not pin {fmt_bytes(size)}: {t.get('pin_error', 'unknown error')}",
            "free RAM or raise the container's locked-memory limit (ulimit -l / --ulimit memlock=-1)",
            blocking=ctx.profile is not None and ctx.profile.runtime.engine == "streamed",
            group="gpu",
        )
    h2d, d2h = t.get("h2d_gbps", 0.0), t.get("d2h_gbps", 0.0)
    msg = f"pinned {fmt_bytes(size)} in {t.get('pin_s', 0):.1f} s; H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s"
    if min(h2d, d2h) < 6:
        return CheckResult(
            "pinned memory",
            "warn",
            msg,
            "slow link: check the GPU sits in a x16 (or x8 PCIe 4.0) slot; streaming will be transfer-bound",
            group="gpu",
        )
    return CheckResult("pinned memory", "ok", msg, group="gpu")


def _checkpoint_dir(profile: Profile | None) -> Path:
    p = profile.run_dir if profile is not None else Path.cwd()
    p = Path(p).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_disk(ctx: _Ctx) -> CheckResult:
    where = _checkpoint_dir(ctx.profile)
    free = shutil.disk_usage(where).free
    msg = f"{fmt_bytes(free)} free at {where}"
    est = ctx.estimate
    if est is not None:
        per, worst = est.disk.per_checkpoint, est.disk.worst_case
        msg += f"; a checkpoint is {fmt_bytes(per)}, up to {fmt_bytes(worst)} with keep_last_n={est.disk.keep_last_n}"
        if per > free:
            return CheckResult(
                "disk (checkpoints)",
                "fail",
                msg,
                "free disk space or set checkpoint.out_dir to a larger disk",
                blocking=True,
            )
        if worst > free:
            keep = max(1, int(free // max(1, per)) - 2)
            return CheckResult(
                "disk (checkpoints)", "warn", msg, f"lower checkpoint.keep_last_n to {keep} or free disk space"
            )
    elif free < 10 * GiB:
        return CheckResult("disk (checkpoints)", "warn", msg, "a 1b checkpoint is ~13 GiB; free disk space")
    return CheckResult("disk (checkpoints)", "ok", msg)


def _probe_hf_cache(ctx: _Ctx) -> CheckResult:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    where = cache
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    msg = f"{fmt_bytes(free)} free for the HF cache ({cache})"
    if free < 20 * GiB and ctx.profile is not None and ctx.profile.data.source == "hub":
        return CheckResult(
            "disk (HF cache)",
            "warn",
            msg,
            "streamed datasets still cache shards; set HF_HOME to a larger disk",
            group="hub",
        )
    return CheckResult("disk (HF cache)", "ok", msg, group="hub")


_REQUIRED_FOR = {
    "torch": "training",
    "ramtorch": "the streamed engine",
    "transformers": "export to transformers",
    "datasets": "hub/json/parquet data",
    "huggingface_hub": "Hub downloads and pushes",
    "wandb": "W&B logging",
}


def _package_blocks(name: str, profile: Profile | None) -> bool:
    if name == "torch":
        return True
    if profile is None:
        return False
    if name == "ramtorch":
        return profile.runtime.engine == "streamed"
    if name == "datasets":
        return profile.data.source in ("hub", "json", "parquet")
    if name == "wandb":
        return profile.logging.use_wandb
    return False


def _probe_packages(ctx: _Ctx) -> list[CheckResult]:
    pk = ctx.torch_info()["packages"]
    out = []
    for name in PACKAGES:
        if name in ("torch", "triton"):
            continue  # reported by the torch and compiled-blocks checks
        r = pk.get(name) or {"ok": False, "error": "not checked"}
        if r.get("ok"):
            out.append(CheckResult(name, "ok", f"{name} {r.get('version')}", group="packages"))
        else:
            blocks = _package_blocks(name, ctx.profile)
            out.append(
                CheckResult(
                    name,
                    "fail" if blocks else "warn",
                    f"{name} does not import: {r.get('error', '')}"[:300],
                    f"pip install {name.replace('_', '-')} (needed for {_REQUIRED_FOR[name]})",
                    blocking=blocks,
                    group="packages",
                )
            )
    return out


def _hf_token_present() -> bool:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:
        return False


def _wandb_key_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    except Exception:
        return False


def _probe_tokens(ctx: _Ctx) -> list[CheckResult]:
    # presence only: never the value, never its length
    out = []
    hf = _hf_token_present()
    needs_hf = ctx.profile is not None and bool(ctx.profile.checkpoint.hf_repo_id)
    if hf:
        out.append(CheckResult("HF token", "ok", "present", group="hub"))
    else:
        out.append(
            CheckResult(
                "HF token",
                "fail" if needs_hf else "warn",
                "absent",
                "set HF_TOKEN or run `hf auth login` (needed to push and for gated data)",
                group="hub",
            )
        )
    wb = _wandb_key_present()
    needs_wb = ctx.profile is not None and ctx.profile.logging.use_wandb and os.environ.get("WANDB_MODE") != "offline"
    if wb:
        out.append(CheckResult("W&B key", "ok", "present", group="hub"))
    else:
        out.append(
            CheckResult(
                "W&B key",
                "warn" if needs_wb else "ok",
                "absent" + ("" if needs_wb else " (not needed: W&B logging is off)"),
                "set WANDB_API_KEY, or WANDB_MODE=offline" if needs_wb else "",
                group="hub",
            )
        )
    return out


def _probe_hub(ctx: _Ctx) -> CheckResult:
    if probe.hub_offline():
        return CheckResult(
            "Hub reachable",
            "warn",
            "offline mode set (HF_HUB_OFFLINE): only cached data and tokenizers work",
            "unset HF_HUB_OFFLINE to download",
            group="hub",
        )
    if ctx.hub is None:
        raise RuntimeError("hub check not started")
    ans = ctx.hub.result()
    host = ctx.hub.url.split("://", 1)[-1]
    if ans.ok:
        return CheckResult("Hub reachable", "ok", f"{host} answered ({ans.detail})", group="hub")
    return CheckResult(
        "Hub reachable",
        "warn",
        f"{host} unreachable ({ans.detail})",
        "work offline: the embedded tokenizer and corpus need no network; set HF_HUB_OFFLINE=1 to use cached data",
        group="hub",
    )


def _probe_limits(ctx: _Ctx) -> list[CheckResult]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def fmt(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else (fmt_bytes(v) if v >= GiB else f"{v / MiB:.0f} MiB")

    out = [
        CheckResult(
            "ulimit -l (memlock)",
            "ok",
            f"soft {fmt(soft)}, hard {fmt(hard)} (CUDA's pinned allocations are not bound by it)",
        )
    ]
    shm = Path("/dev/shm")
    if shm.exists():
        total = shutil.disk_usage(shm).total
        if total < GiB:
            out.append(
                CheckResult(
                    "/dev/shm",
                    "warn",
                    f"{fmt_bytes(total)}",
                    "docker: --shm-size=2g (data loader workers share memory there)",
                )
            )
        else:
            out.append(CheckResult("/dev/shm", "ok", f"{fmt_bytes(total)}"))
    else:
        out.append(CheckResult("/dev/shm", "warn", "missing", "mount a tmpfs at /dev/shm"))
    return out


def _probe_device(ctx: _Ctx) -> CheckResult:
    t = ctx.torch_info().get("torch") or {}
    if t.get("cuda"):
        return CheckResult("training device", "ok", f"CUDA: {t.get('name')}", group="gpu")
    return CheckResult(
        "training device",
        "warn",
        "the CPU (no usable CUDA GPU)",
        "expect ~100x slower steps than on a GPU; --micro-test runs in minutes",
        group="gpu",
    )


def _probe_compile(ctx: _Ctx) -> list[CheckResult]:
    """On a GPU: can the streamed engine compile its blocks (``runtime.compile_blocks: auto``)?"""
    t = ctx.torch_info().get("torch") or {}
    if not t.get("cuda"):
        return []  # auto compiles only on CUDA
    r = ctx.torch_info()["packages"].get("triton") or {"ok": False, "error": "not checked"}
    if r.get("ok"):
        off = ctx.profile is not None and ctx.profile.runtime.compile_blocks is False
        what = "the profile sets runtime.compile_blocks: false" if off else \
            "the streamed engine compiles its blocks (runtime.compile_blocks: auto)"
        return [CheckResult("compiled blocks", "ok", f"triton {r.get('version')}: {what}", group="packages")]
    return [CheckResult("compiled blocks", "warn",
                        f"triton does not import ({r.get('error', '')}"[:200] + "): the blocks run uncompiled",
                        "pip install triton (Linux; triton-windows on Windows): compiled blocks measured 4-5% faster "
                        "on an H200 (docs/benchmarks.md)", group="packages")]


def _probe_bytecode(ctx: _Ctx) -> list[CheckResult]:
    """Does torch load from cached bytecode? Without it every start compiles torch's sources (and
    torch.compile's, sympy's) again: on an H200 machine whose image wrote none, the set-up took 5-8 s
    longer before the first pass (docs/benchmarks.md, round 9)."""
    b = (ctx.torch_info().get("torch") or {}).get("bytecode")
    if not b:  # torch does not import (its own row says so), or an older child
        return []
    if b.get("cached"):
        where = f" (under {b['prefix']})" if b.get("prefix") else ""
        return [CheckResult("bytecode", "ok", f"torch loads from cached bytecode{where}", group="packages")]
    why = ("Python writes no bytecode here (PYTHONDONTWRITEBYTECODE or -B)" if not b.get("writes")
           else "torch's directory takes no bytecode (read-only?)")
    return [CheckResult("bytecode", "warn",
                        f"torch has no cached bytecode and {why}: every start compiles torch's sources again "
                        "(5-8 s more before the first pass, measured on an H200 machine)",
                        "unset PYTHONDONTWRITEBYTECODE, or set PYTHONPYCACHEPREFIX to a writable directory "
                        "(e.g. ~/.cache/pycache)", group="packages")]


def _probe_cpu_kernel(ctx: _Ctx) -> list[CheckResult]:
    """Does the CPU's one-pass AdamW over split masters build here (ramgpt/engine/native.py)? With it
    ``runtime.split_masters: auto`` splits every master, so every chunk loads as bf16 halves: 46,621
    tokens/s against 44,478 for the 1b on an H200 machine (docs/benchmarks.md, round 10)."""
    k = (ctx.torch_info().get("torch") or {}).get("cpu_kernel")
    if not k:  # torch does not import (its own row says so), or an older child
        return []
    if k.get("ok"):
        return [CheckResult("CPU AdamW kernel", "ok", "built and checked against torch's AdamW: split masters "
                            "update in one pass (runtime.split_masters: auto splits every chunk)", group="packages")]
    return [CheckResult("CPU AdamW kernel", "warn",
                        f"not used: {k.get('why')}"[:240] + "; auto splits only the masters the GPU updates "
                        "(the 1b on an H200 machine: 44,478 tokens/s against 46,621 with it)",
                        "install a C compiler (Debian/Ubuntu: apt install gcc) or point $CC at one; without it, "
                        "runtime.optimizer_gpu_share: 0.6 was the faster share", group="packages")]


def _probe_profile(ctx: _Ctx) -> list[CheckResult]:
    if ctx.profile is None:
        return []
    if ctx.estimate is None:
        raise RuntimeError(ctx.estimate_error or "memory estimate failed")
    est = ctx.estimate
    total, avail = _ram()
    out = []
    need = est.cpu_bytes
    msg = f"needs {fmt_bytes(need)} RAM ({est.engine} engine on {est.device}); {fmt_bytes(total)} total, {fmt_bytes(avail)} available"
    if need > total:
        out.append(
            CheckResult(
                "profile RAM",
                "fail",
                msg,
                "use a smaller profile or a machine with more RAM",
                blocking=True,
                group="profile",
            )
        )
    elif need > avail:
        out.append(CheckResult("profile RAM", "warn", msg, "close other programs before training", group="profile"))
    else:
        out.append(CheckResult("profile RAM", "ok", msg, group="profile"))
    try:
        has_cuda = bool((ctx.torch_info().get("torch") or {}).get("cuda"))
    except Exception:
        has_cuda = False
    if est.gpu is not None:
        gpu = est.gpu
        budget = est.vram_bytes
        what = f"seqs_per_pass {gpu.seqs}" if gpu.engine == "streamed" else f"micro-batch {gpu.seqs}"
        msg = f"needs {fmt_bytes(gpu.need_bytes)} VRAM at {what}" + (
            f"; budget {fmt_bytes(budget)} ({est.vram_source})" if budget else ""
        )
        if est.fits_vram is False:
            remedy = est.advice[0] if est.advice else "use the streamed engine or a smaller model"
            out.append(CheckResult("profile VRAM", "fail", msg, remedy, blocking=False, group="profile"))
        elif not has_cuda:
            out.append(
                CheckResult(
                    "profile VRAM",
                    "warn",
                    msg + "; but no CUDA GPU here: it would train on the CPU",
                    "run it on the machine with the GPU",
                    group="profile",
                )
            )
        else:
            out.append(CheckResult("profile VRAM", "ok", msg, group="profile"))
    else:
        out.append(CheckResult("profile VRAM", "ok", "no GPU: the profile would train on the CPU", group="profile"))
    return out


# A run projected to last longer than this is worth a second look before it starts.
LONG_RUN_DAYS = 30.0


def _measured_speed(t: dict[str, Any], pin_bytes: int) -> probe.Speed | None:
    """The child's matmul and pinned-copy figures as a :class:`ramgpt.probe.Speed`."""
    mm = t.get("matmul")
    if not mm:
        return None
    matmul = probe.MatmulRate(**{**mm, "shape": tuple(mm["shape"])})
    pinned = None
    if t.get("pin_ok"):
        pinned = probe.PinnedRate(pin_bytes, t.get("pin_s", 0.0), min(pin_bytes, 256 * MiB), t["h2d_gbps"], t["d2h_gbps"])
    adamw = probe.AdamwRate(**t["adamw"]) if t.get("adamw") else None
    return probe.Speed(matmul, pinned, adamw)


def _probe_time(ctx: _Ctx) -> list[CheckResult]:
    """The profile's step time and run length, projected from the child's measured matmul rate
    and pinned link (ramgpt.memory.timing)."""
    if ctx.profile is None:
        return []
    if ctx.estimate is None:
        raise RuntimeError(ctx.estimate_error or "memory estimate failed")
    from dataclasses import replace

    from ramgpt.memory import CARDS, Rates, project_time

    est, prof = ctx.estimate, ctx.profile
    t = ctx.torch_info().get("torch") or {}
    speed = _measured_speed(t, _pin_size(prof))
    cards = f"`ramgpt estimate-memory --profile {prof.name} --card NAME` ({', '.join(CARDS)})"
    if speed is None:
        why = t.get("matmul_error") or "torch did not run"
        return [CheckResult("profile time", "warn", f"no matmul rate measured ({why})", f"for a card class: {cards}",
                            group="profile")]
    rates = Rates.from_speed(speed, prof.runtime.threads or probe.usable_cores())
    if rates.device != est.device:
        return [CheckResult("profile time", "warn",
                            f"the profile runs on {est.device} but this machine measured {rates.device} only",
                            f"project for a card class: {cards}", group="profile")]
    pcie = est.pcie
    if rates.link_gbps and est.device == "cuda":
        pcie = replace(pcie, link_gbps=rates.link_gbps, link_source=rates.link_source)
    proj = project_time(prof, engine=est.engine, device=est.device, pcie=pcie, rates=rates)
    msg = "; ".join(proj.lines()[:2])
    if proj.run_days > LONG_RUN_DAYS:
        return [CheckResult("profile time", "warn", msg,
                            "lower optim.max_steps, train a smaller model, or plan for a faster card (--card)",
                            group="profile")]
    return [CheckResult("profile time", "ok", msg, group="profile")]


def _probes() -> list[tuple[str, Callable[[_Ctx], CheckResult | list[CheckResult]]]]:
    """(name, probe) in display order; looked up at call time so tests can swap one."""
    g = globals()
    names = [
        ("python", "_probe_python"),
        ("torch", "_probe_torch"),
        ("GPU", "_probe_gpu"),
        ("training device", "_probe_device"),
        ("pinned memory", "_probe_pinned"),
        ("CPU cores", "_probe_cpu"),
        ("RAM", "_probe_ram"),
        ("disk (checkpoints)", "_probe_disk"),
        ("disk (HF cache)", "_probe_hf_cache"),
        ("limits", "_probe_limits"),
        ("packages", "_probe_packages"),
        ("compiled blocks", "_probe_compile"),
        ("bytecode", "_probe_bytecode"),
        ("CPU AdamW kernel", "_probe_cpu_kernel"),
        ("tokens", "_probe_tokens"),
        ("Hub reachable", "_probe_hub"),
        ("profile", "_probe_profile"),
        ("profile time", "_probe_time"),
    ]
    return [(label, g[fn]) for label, fn in names]


_BLOCKING_PROBES = {"python", "torch"}


def run_doctor(profile: Profile | None = None) -> list[CheckResult]:
    """Run every check (with ``profile``: also its RAM/VRAM/disk needs and projected run time)
    and return the rows."""
    estimate_ = estimate_error = None
    matmul = None
    if profile is not None:
        try:
            from ramgpt.memory import estimate, matmul_shape

            free = shutil.disk_usage(_checkpoint_dir(profile)).free
            estimate_ = estimate(profile, disk_free_bytes=free)
            matmul = matmul_shape(profile, estimate_.device == "cuda", estimate_.seqs_per_pass or profile.optim.micro_batch_size)
        except Exception as e:
            estimate_error = error_line(e)
    child = hub = None
    errors: list[CheckResult] = []
    try:
        child = _Child(_pin_size(profile), matmul)
    except Exception as e:
        errors.append(
            CheckResult("torch probe", "fail", f"could not start: {error_line(e)}", "check the Python environment")
        )
    if not probe.hub_offline():
        try:
            hub = probe.HubPing(HUB_TIMEOUT_S)
        except Exception:
            hub = None
    ctx = _Ctx(profile, child, hub, estimate_, estimate_error)
    results: list[CheckResult] = list(errors)
    for label, check in _probes():
        try:
            r = check(ctx)
            results.extend(r if isinstance(r, list) else [r])
        except Exception as e:
            results.append(
                CheckResult(
                    label,
                    "fail",
                    f"check failed: {error_line(e)}"[:300],
                    "run with RAMGPT_DEBUG=1 and report it",
                    blocking=label in _BLOCKING_PROBES,
                )
            )
    if child is not None:
        child.kill()
    return results


__all__ = ["CheckResult", "blocking_failures", "run_doctor"]
