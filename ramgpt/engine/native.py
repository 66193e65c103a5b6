"""The CPU's AdamW over split masters in one pass (``csrc/adamw_planes.c``), built on first use.

torch's fused AdamW needs a contiguous fp32 master, so a chunk whose masters are kept as two
16-bit planes (:mod:`.planes`) is joined into scratch, updated and split back: eight whole-tensor
passes around the kernel's one, 3-4x as long as the update of whole fp32 masters (H200 machine,
round 9). The C kernel joins, updates and splits each element in registers, so it moves the same
bytes as the update of whole masters.

It is compiled with the system's C compiler (``$CC`` or ``cc``) into ``~/.cache/ramgpt/native``
(``$XDG_CACHE_HOME``; a build per source, compiler and CPU), loaded with ctypes (which lets go of
the GIL while it runs), and used only after it has given the same bits as torch's kernel on this
CPU (:func:`load`). Without a compiler, or if the check fails, :func:`load` returns None and the
engine keeps torch's path: the same numbers, more time. ``RAMGPT_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ramgpt import toolchain

SOURCE = Path(__file__).with_name("csrc") / "adamw_planes.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
COMPILE_TIMEOUT_S = 60
FORMS = (0, 1, 2)  # RAMGPT_V_FORM: how torch's build may round the second moment (tried in turn)


class Item(ctypes.Structure):
    _fields_ = [("hi", ctypes.c_void_p), ("lo", ctypes.c_void_p), ("grad", ctypes.c_void_p),
                ("avg", ctypes.c_void_p), ("avg_sq", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("neg_step_size", ctypes.c_float), ("bc2_sqrt", ctypes.c_float), ("decay", ctypes.c_float)]


class Group(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_float), ("has_scale", ctypes.c_int), ("has_decay", ctypes.c_int),
                ("base_is_grad", ctypes.c_int), ("lerp_coeff", ctypes.c_float), ("beta2", ctypes.c_float),
                ("c2", ctypes.c_float), ("eps", ctypes.c_float)]


LANES = 16  # the kernel takes each tensor's whole 16-lane vectors (torch's widest fp32 vector on x86)


class PlanesAdamW:
    """The loaded kernel: :meth:`step` updates split masters of one parameter group."""

    def __init__(self, lib: ctypes.CDLL, path: Path, form: int):
        self.lib, self.path, self.form = lib, path, form
        self.fn = lib.ramgpt_adamw_planes
        self.fn.argtypes = [ctypes.POINTER(Group), ctypes.POINTER(Item), ctypes.c_int, ctypes.c_int]
        self.fn.restype = ctypes.c_int
        self.calls = 0

    def step(self, tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]],
             lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
             grad_scale: torch.Tensor | None, threads: int | None = None) -> None:
        """``tensors``: (hi, lo, grad, exp_avg, exp_avg_sq, step) per master, 1-D and contiguous
        on the CPU (hi, lo int16; the rest float32; ``step`` the float32 counter, already
        advanced, as torch's ``_fused_adamw_`` takes it). ``grad_scale``: a float32 scalar the
        gradients are divided by (or None)."""
        from ramgpt.engine import planes as pl

        items = (Item * len(tensors))()
        tails = []
        for k, (hi, lo, grad, avg, avg_sq, step) in enumerate(tensors):
            n = hi.numel()
            for t, dt in ((hi, torch.int16), (lo, torch.int16), (grad, torch.float32), (avg, torch.float32),
                          (avg_sq, torch.float32)):
                if t.dtype != dt or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
                    raise ValueError("the planes kernel takes contiguous CPU tensors of one size "
                                     "(int16 planes, float32 gradient and moments)")
            s = float(step)
            bc1, bc2 = 1 - beta1 ** s, 1 - beta2 ** s  # in double, as torch's kernel
            body = n - n % LANES
            items[k] = Item(hi.data_ptr(), lo.data_ptr(), grad.data_ptr(), avg.data_ptr(), avg_sq.data_ptr(), body,
                            -(lr / bc1), math.sqrt(bc2), 1 - lr * weight_decay)
            if body < n:
                tails.append((hi[body:], lo[body:], grad[body:], avg[body:], avg_sq[body:], step))
        w = float(torch.tensor(1 - beta1, dtype=torch.float32))
        small = abs(w) < 0.5  # torch's lerp: m + w (g - m), or g + (w - 1)(g - m) for a large weight
        coeff = w if small else float(torch.tensor(w, dtype=torch.float32) - 1)
        scale = 1.0 if grad_scale is None else float(grad_scale)
        group = Group(scale, grad_scale is not None, weight_decay != 0, not small, coeff, beta2, 1 - beta2, eps)
        self.fn(ctypes.byref(group), items, len(tensors), threads or torch.get_num_threads())
        self.calls += 1
        if tails:  # the few elements past the last whole vector: torch's kernel, on a joined copy
            xs = []
            for hi, lo, *_ in tails:
                xs.append(torch.empty(hi.numel(), dtype=torch.float32))
                pl.join(hi, lo, xs[-1])
            torch._fused_adamw_(xs, [t[2].clone() for t in tails], [t[3] for t in tails], [t[4] for t in tails], [],
                                [t[5] for t in tails], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=grad_scale,
                                found_inf=None)
            for x, (hi, lo, *_) in zip(xs, tails):
                pl.split(x, hi, lo, torch.empty(x.numel(), dtype=torch.int32))


_lock = threading.Lock()
_loaded: dict[str, PlanesAdamW | None] = {}
_why: dict[str, str] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ramgpt" / "native"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(form: int = 0, compiler: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile the kernel's ``form`` (RAMGPT_V_FORM), or find the build of this source, form,
    compiler and CPU. Raises RuntimeError saying why it could not."""
    cc = toolchain.compiler(compiler)
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc}) on PATH")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    src = SOURCE.read_bytes()
    flags = [*FLAGS, f"-DRAMGPT_V_FORM={form}"]
    key = hashlib.sha256(src + version.encode() + _cpu_id().encode() + " ".join(flags).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    so = out_dir / f"adamw_planes-{key}.so"
    if so.exists():
        return so
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        out_dir = Path(tempfile.gettempdir()) / f"ramgpt-native-{os.getuid() if hasattr(os, 'getuid') else 0}"
        out_dir.mkdir(parents=True, exist_ok=True)
        so = out_dir / so.name
        if so.exists():
            return so
    tmp = so.with_name(f".{so.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        r = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True,
                           timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} failed: {e}") from e
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        msg = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{cc} exited {r.returncode}: {msg}")
    os.replace(tmp, so)  # another process may have built the same one meanwhile: the same bytes
    return so


def _open(so: Path, form: int) -> PlanesAdamW:
    lib = ctypes.CDLL(str(so))
    sizes = (ctypes.c_int64 * 2)()
    lib.ramgpt_abi(sizes)
    if (sizes[0], sizes[1]) != (ctypes.sizeof(Item), ctypes.sizeof(Group)):
        raise RuntimeError(f"the built kernel's structures differ from the loader's ({list(sizes)})")
    return PlanesAdamW(lib, so, form)


def matches_torch(kernel: PlanesAdamW, seed: int = 0) -> bool:
    """The kernel gives torch's ``_fused_adamw_`` bits (masters, both moments) over three steps
    of random values of wide range, sizes with and without a scalar tail, with and without a
    grad scale and weight decay, and with beta1 <= 0.5 (the other side of torch's lerp)."""
    from ramgpt.engine import planes as pl

    gen = torch.Generator().manual_seed(seed)
    for sizes, beta1, wd, scale in (([4096, 1000, 17, 3], 0.9, 0.1, 0.5), ([777, 64], 0.3, 0.0, None),
                                    ([50_000, 33], 0.95, 0.01, 3.0)):
        xs = [torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 2) for n in sizes]
        ref = [x.clone() for x in xs]
        his = [torch.empty(n, dtype=torch.int16) for n in sizes]
        los = [torch.empty(n, dtype=torch.int16) for n in sizes]
        for x, hi, lo in zip(xs, his, los):
            pl.split(x, hi, lo, torch.empty(x.numel(), dtype=torch.int32))
        m1 = [torch.zeros(n) for n in sizes]
        v1 = [torch.zeros(n) for n in sizes]
        m2 = [torch.zeros(n) for n in sizes]
        v2 = [torch.zeros(n) for n in sizes]
        steps = [torch.zeros((), dtype=torch.float32) for _ in sizes]
        gs = None if scale is None else torch.tensor(scale)
        for _ in range(3):
            gr = [torch.randn(n, generator=gen) * 1e-2 for n in sizes]
            torch._foreach_add_(steps, 1)
            kernel.step(list(zip(his, los, gr, m1, v1, steps)), lr=3e-3, beta1=beta1, beta2=0.999,
                        weight_decay=wd, eps=1e-8, grad_scale=gs, threads=2)
            torch._fused_adamw_(ref, [g.clone() for g in gr], m2, v2, [], steps, amsgrad=False, lr=3e-3,
                                beta1=beta1, beta2=0.999, weight_decay=wd, eps=1e-8, maximize=False,
                                grad_scale=gs, found_inf=None)
        for hi, lo, r, a, b, c, d in zip(his, los, ref, m1, m2, v1, v2):
            joined = torch.empty(r.numel())
            pl.join(hi, lo, joined)
            if not (torch.equal(joined.view(torch.int32), r.view(torch.int32))
                    and torch.equal(a.view(torch.int32), b.view(torch.int32))
                    and torch.equal(c.view(torch.int32), d.view(torch.int32))):
                return False
    return True


def load(compiler: str | None = None) -> PlanesAdamW | None:
    """The kernel, built and checked once per process; None where it cannot be used
    (:func:`why_not` says why)."""
    cc = toolchain.compiler(compiler)
    with _lock:
        if cc in _loaded:
            return _loaded[cc]
        kernel = None
        why = toolchain.disabled_why(cc)
        if why is None:
            try:
                for form in FORMS:
                    candidate = _open(build(form, cc), form)
                    if matches_torch(candidate):
                        kernel = candidate
                        break
                else:
                    why = "none of its forms gives the bits of torch's fused AdamW on this CPU"
            except (RuntimeError, OSError) as e:
                why, kernel = str(e), None
        if why is not None:
            _why[cc] = why
        _loaded[cc] = kernel
        return kernel


def why_not(compiler: str | None = None) -> str | None:
    return _why.get(toolchain.compiler(compiler))
