"""The C kernel for the CPU's AdamW over split masters (ramgpt/engine/native.py): the bits of
torch's fused AdamW, and a clean fallback where it cannot be built."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

from ramgpt.engine import native
from ramgpt.engine import planes as pl

HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC or os.name == "nt", reason="needs a C compiler (not built on Windows)")


@pytest.fixture
def fresh_loader(monkeypatch: pytest.MonkeyPatch):
    """load() from scratch (its per-process memo emptied), restored afterwards."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = torch.empty(x.numel(), dtype=torch.int16)
    lo = torch.empty(x.numel(), dtype=torch.int16)
    pl.split(x, hi, lo, torch.empty(x.numel(), dtype=torch.int32))
    return hi, lo


def _joined(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    out = torch.empty(hi.numel())
    pl.join(hi, lo, out)
    return out


@needs_cc
@pytest.mark.parametrize(("beta1", "wd", "scale", "threads"), [(0.9, 0.1, 0.7, 3), (0.95, 0.0, None, 1),
                                                               (0.3, 0.01, 2.0, 4)])
def test_kernel_gives_torch_fused_adamw_bits(beta1: float, wd: float, scale: float | None, threads: int) -> None:
    """Fresh random masters of wide range, sizes with and without a tail past the last 16-lane
    vector (and below one vector), several steps: the joined masters and both moments are
    bit-identical to torch's ``_fused_adamw_`` on whole fp32 masters; the gradients are not written."""
    kernel = native.load()
    assert kernel is not None, native.why_not()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    sizes = [int(n) for n in torch.randint(1, 40_000, (5,), generator=gen)] + [16, 5, 32 * 1024 + 9]
    xs = [torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3) for n in sizes]
    ref = [x.clone() for x in xs]
    planes = [_split(x) for x in xs]
    ours = [(torch.zeros(n), torch.zeros(n)) for n in sizes]
    theirs = [(torch.zeros(n), torch.zeros(n)) for n in sizes]
    steps = [torch.zeros((), dtype=torch.float32) for _ in sizes]
    gs = None if scale is None else torch.tensor(scale)
    calls = kernel.calls
    for _ in range(4):
        grads = [torch.randn(n, generator=gen) * 10 ** float(torch.empty(()).uniform_(-4, 0, generator=gen))
                 for n in sizes]
        kept = [g.clone() for g in grads]
        torch._foreach_add_(steps, 1)
        kernel.step([(hi, lo, g, m, v, s) for (hi, lo), g, (m, v), s in zip(planes, grads, ours, steps)],
                    lr=2e-3, beta1=beta1, beta2=0.98, weight_decay=wd, eps=1e-8, grad_scale=gs, threads=threads)
        torch._fused_adamw_(ref, [g.clone() for g in grads], [m for m, _ in theirs], [v for _, v in theirs], [],
                            steps, amsgrad=False, lr=2e-3, beta1=beta1, beta2=0.98, weight_decay=wd, eps=1e-8,
                            maximize=False, grad_scale=gs, found_inf=None)
        for g, k in zip(grads, kept):
            assert torch.equal(g, k)
        for (hi, lo), r, (m, v), (m2, v2), n in zip(planes, ref, ours, theirs, sizes):
            assert torch.equal(_joined(hi, lo).view(torch.int32), r.view(torch.int32)), n
            assert torch.equal(m.view(torch.int32), m2.view(torch.int32)), n
            assert torch.equal(v.view(torch.int32), v2.view(torch.int32)), n
    assert kernel.calls == calls + 4


@needs_cc
def test_kernel_keeps_a_nan_visible() -> None:
    """A NaN gradient makes a NaN master; its bf16 plane, which the GPU computes with, reads NaN."""
    kernel = native.load()
    assert kernel is not None, native.why_not()
    n = 64
    hi, lo = _split(torch.randn(n))
    g = torch.randn(n)
    g[7] = float("nan")
    m, v = torch.zeros(n), torch.zeros(n)
    kernel.step([(hi, lo, g, m, v, torch.ones(()))], lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8,
                grad_scale=None)
    x = _joined(hi, lo)
    assert x.isnan().nonzero().flatten().tolist() == [7]
    assert hi.view(torch.bfloat16).float().isnan().nonzero().flatten().tolist() == [7]


@needs_cc
def test_the_check_fails_a_kernel_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """matches_torch is what keeps a kernel of other arithmetic out: a step with the learning rate
    off by one part in 10^4 fails it."""
    kernel = native.load()
    assert kernel is not None, native.why_not()
    assert native.matches_torch(kernel, seed=int(torch.randint(0, 1000, ()).item()))
    real = native.PlanesAdamW.step

    def off(self, tensors, lr, *a, **kw):
        return real(self, tensors, lr * 1.0001, *a, **kw)

    monkeypatch.setattr(native.PlanesAdamW, "step", off)
    assert not native.matches_torch(kernel)


@needs_cc
def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    so = native.build(0, out_dir=tmp_path)
    assert so.exists() and so.parent == tmp_path
    before = so.stat().st_mtime_ns
    ran: list[list[str]] = []
    real = native.subprocess.run

    def spy(cmd, *a, **kw):
        ran.append(cmd)
        return real(cmd, *a, **kw)

    monkeypatch.setattr(native.subprocess, "run", spy)
    assert native.build(0, out_dir=tmp_path) == so
    assert all("--version" in c for c in ran), "the second build must not compile again"
    assert so.stat().st_mtime_ns == before
    assert native.build(1, out_dir=tmp_path) != so  # another form, another file
    assert not list(tmp_path.glob(".*.tmp"))


def test_no_compiler_falls_back(fresh_loader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/ramgpt-cc")
    assert native.load() is None
    assert "no C compiler" in native.why_not()


def test_turned_off(fresh_loader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAMGPT_NATIVE", "0")
    assert native.load() is None
    assert "RAMGPT_NATIVE=0" in native.why_not()


def test_a_failing_compiler_says_why(fresh_loader, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo badcc 1.0; exit 0; fi\n"
                  "echo 'adamw_planes.c:1: error: no vectors today' >&2\nexit 3\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert native.load(str(cc)) is None
    assert native.why_not(str(cc)) == f"{cc} exited 3: adamw_planes.c:1: error: no vectors today"
    assert not list((tmp_path / "cache").rglob("*.so"))
