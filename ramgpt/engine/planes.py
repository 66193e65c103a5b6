"""fp32 master weights kept as two 16-bit planes (``runtime.split_masters``).

Each fp32 weight ``x`` is stored as

- ``hi``: ``x`` rounded to bfloat16 (round to nearest, ties away from zero), which is what the GPU
  computes with, so it loads 2 bytes per parameter instead of 4 and casts nothing;
- ``lo``: the signed int16 with ``bits(x) == (bits(hi) << 16) + lo``.

The pair is exact: :func:`join` gives back every bit of ``x`` (zeros, subnormals, infinities
included; a NaN comes back a NaN, its payload not kept), so AdamW updates the same fp32 numbers as before and a checkpoint holds the same fp32
tensors; the host keeps 4 bytes per parameter, as with plain fp32 masters, and no bf16 copy. The
one numerical difference from casting fp32 to bf16 on the GPU (round half to even) is the tie: a
weight whose dropped 16 bits are exactly ``0x8000`` (one in 65,536) rounds away from zero. No
16-bit split can round ties to even and stay exact: with ``lo`` as the 16 dropped bits, the pair
(hi, 0x8000) would stand for two different weights.

The arithmetic is three whole-tensor integer operations each way (:func:`join`, :func:`split`);
:func:`works` checks them once on the device, since the narrowing int32 -> int16 conversion must
wrap (it does on x86, Arm and CUDA builds of torch; a build where it saturates is refused).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn as nn

PIECE = 1 << 20  # elements joined, updated and split at a time on the CPU: a few MiB, cache-sized
CONVERT_WORKERS = 4  # chunks split at once at start-up (threads)
# elements split at a time at start-up: few large operations (thousands of small ones, each taking the
# GIL, ran 3x as long beside the compile warm-up's thread)
CONVERT_PIECE = 16 << 20
ALIGN = 32  # bytes: each plane of a tensor starts 32-byte aligned, so hi + lo fill the fp32 slot exactly


def split(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, tmp: torch.Tensor) -> None:
    """fp32 ``x`` -> int16 planes ``hi`` (the bits of bf16(x), ties away from zero) and ``lo``.
    ``tmp``: int32 scratch of ``x``'s size, on its device. All 1-D, the same length."""
    bits = x.view(torch.int32)
    torch.add(bits, 0x8000, out=tmp)  # round the upper half to nearest, ties away from zero
    tmp.bitwise_right_shift_(16)
    hi.copy_(tmp)  # narrowing: keeps the low 16 bits
    lo.copy_(bits)  # the low 16 bits, read as signed: bits == (hi << 16) + lo
    # a NaN's rounding can carry into the sign or exponent and read as 0 or inf: the GPU must see a
    # NaN (a diverged weight stays visible); only its payload changes
    hi.masked_fill_(x.isnan(), 0x7FC0)


def join(hi: torch.Tensor, lo: torch.Tensor, out: torch.Tensor) -> None:
    """int16 planes -> fp32 ``out`` (exactly the weight :func:`split` was given)."""
    o = out.view(torch.int32)
    o.copy_(hi)  # widening, sign-extended
    o.bitwise_left_shift_(16)
    o.add_(lo)


@lru_cache(maxsize=8)
def works(device: str) -> bool:
    """The split/join pair is exact on ``device`` (edge values and random ones)."""
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3.3e38, -3.3e38,
                            1.00390625, 1.01171875, -2.0078125, 65504.0, 2.0**-126])
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(4096, generator=gen) * torch.exp(torch.randn(4096, generator=gen) * 8)
    tie = (torch.randint(-2**15, 2**15, (64,), generator=gen, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FFF8000, 0x7F800001, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    x = torch.cat([special, rand, tie.nan_to_num(0.0), nans]).to(device)
    n = x.numel()
    hi = torch.empty(n, dtype=torch.int16, device=device)
    lo = torch.empty(n, dtype=torch.int16, device=device)
    back = torch.empty(n, dtype=torch.float32, device=device)
    split(x, hi, lo, torch.empty(n, dtype=torch.int32, device=device))
    join(hi, lo, back)
    rounded = hi.view(torch.bfloat16).float()
    near = ((rounded - x).abs() <= (x.to(torch.bfloat16).float() - x).abs()) | ~x.isfinite()
    num = ~x.isnan()
    return bool(torch.equal(back.view(torch.int32)[num], x.view(torch.int32)[num]) and near.all()
                and back[~num].isnan().all() and rounded[~num].isnan().all())


class MasterPlanes:
    """The planes of every master, by parameter: ``hi`` and ``lo`` int16 views of a host arena,
    laid out chunk by chunk as [hi of each tensor][lo of each tensor], so a chunk's ``hi`` planes
    lie back to back and load as one run."""

    def __init__(self) -> None:
        self._of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __contains__(self, p: torch.Tensor) -> bool:
        return id(p) in self._of

    def hi(self, p: torch.Tensor) -> torch.Tensor:
        return self._of[id(p)][0]

    def lo(self, p: torch.Tensor) -> torch.Tensor:
        return self._of[id(p)][1]

    def compute_view(self, p: torch.Tensor) -> torch.Tensor:
        """The bf16 weight the GPU computes with (a view of the ``hi`` plane, shaped like ``p``)."""
        return self.hi(p).view(torch.bfloat16).view(p.shape)

    def convert_chunks(self, chunks: list[list[nn.Parameter]], flat: torch.Tensor, workers: int | None = None) -> None:
        """:meth:`convert_chunk` for each chunk, ``workers`` chunks at a time (threads; torch releases
        the GIL), each thread with its own scratch, reused chunk to chunk."""
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(len(chunks), workers or CONVERT_WORKERS))

        local = threading.local()

        def one(c: list[nn.Parameter]) -> None:
            if not hasattr(local, "scratch"):
                local.scratch = [torch.empty(0, dtype=torch.uint8)]
            self.convert_chunk(c, flat, local.scratch)

        with ThreadPoolExecutor(workers, thread_name_prefix="ramgpt-split") as pool:
            list(pool.map(one, chunks))

    @torch.no_grad()
    def convert_chunk(self, params: list[nn.Parameter], flat: torch.Tensor,
                      scratch: list[torch.Tensor] | None = None) -> None:
        """Turn the fp32 masters ``params``, which must lie back to back in the 1-D uint8 ``flat``
        (each at a 64-byte aligned slot of ``aligned(4 n, 64)`` bytes, in this order), into planes
        in the same bytes; each parameter's own storage becomes a placeholder (:func:`placeholder`).
        ``scratch``: a one-element list holding a uint8 buffer to reuse (grown and put back)."""
        scratch = scratch if scratch is not None else [torch.empty(0, dtype=torch.uint8)]
        base = flat.data_ptr()
        start = params[0].data_ptr() - base
        off = start
        for p in params:
            if p.dtype != torch.float32 or not p.is_contiguous() or p.data_ptr() - base != off:
                raise ValueError("the masters of a chunk must be contiguous fp32 views laid out back to back")
            off += _slot(p.numel())
        # the chunk's fp32 bytes move to scratch (one copy; reused, so its pages are touched once
        # for the whole model) with room behind for the split's int32 temporary, a piece at a time
        size = off - start
        piece = CONVERT_PIECE
        if scratch[0].numel() < size + 4 * piece:
            scratch[0] = torch.empty(size + 4 * piece, dtype=torch.uint8)
        buf = scratch[0]
        buf[:size].copy_(flat[start:off])
        tmp = buf[size : size + 4 * piece].view(torch.int32)
        copies, o = [], 0
        for p in params:
            copies.append(buf[o : o + 4 * p.numel()].view(torch.float32))
            o += _slot(p.numel())
        hi_off = start
        lo_off = start + sum(_plane(p.numel()) for p in params)
        for p, x in zip(params, copies):
            n = p.numel()
            hi = flat[hi_off : hi_off + 2 * n].view(torch.int16)
            lo = flat[lo_off : lo_off + 2 * n].view(torch.int16)
            hi_off += _plane(n)
            lo_off += _plane(n)
            for a in range(0, n, piece):
                b = min(a + piece, n)
                split(x[a:b], hi[a:b], lo[a:b], tmp[: b - a])
            self._of[id(p)] = (hi, lo)
            p.data = placeholder(p.shape)

    # -- reading and writing whole tensors (checkpoints, tests) ---------------------------------
    def read(self, p: torch.Tensor) -> torch.Tensor:
        """A new fp32 tensor with ``p``'s value."""
        out = torch.empty(p.shape, dtype=torch.float32)
        join(self.hi(p), self.lo(p), out.view(-1))
        return out

    @torch.no_grad()
    def write(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Set ``p`` to ``value`` (any dtype and device; shape as ``p``'s)."""
        x = value.detach().to(device="cpu", dtype=torch.float32).contiguous().view(-1)
        n = x.numel()
        for a in range(0, n, PIECE):
            b = min(a + PIECE, n)
            split(x[a:b], self.hi(p)[a:b], self.lo(p)[a:b], torch.empty(b - a, dtype=torch.int32))

    def source(self, p: torch.Tensor) -> JoinedTensor:
        return JoinedTensor(self, p)


def _plane(n: int) -> int:
    return -(-2 * n // ALIGN) * ALIGN


def _slot(n: int) -> int:
    """Bytes of an fp32 master's slot in the arena (``hostmem.aligned(4 n)``): the two planes fill it."""
    return -(-4 * n // 64) * 64


def placeholder(shape: torch.Size) -> torch.Tensor:
    """What a master Parameter holds once its value lives in planes: a NaN expanded to its shape
    (shape, dtype and device for ``.grad`` and the optimizer's state; no storage: a stray read
    gives NaN and ``copy_`` into it fails, but a kernel handed its raw pointer, as fused AdamW is,
    would write past its one element: only the planes may ever be updated)."""
    return torch.full((), float("nan"), dtype=torch.float32).expand(shape)


class JoinedTensor:
    """A master's fp32 value, joined piece by piece when read: what a checkpoint writes for a
    split master (no second copy of the weights in RAM while a background save runs)."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, planes: MasterPlanes, p: torch.Tensor):
        self.planes, self.p = planes, p
        self.shape = p.shape

    def numel(self) -> int:
        return self.p.numel()

    def element_size(self) -> int:
        return 4

    def data_ptr(self) -> int:
        """The ``hi`` plane's address: what the update gate and the checkpointer key the tensor by."""
        return self.planes.hi(self.p).data_ptr()

    def load(self) -> torch.Tensor:
        return self.planes.read(self.p)

    def byte_pieces(self, nbytes: int) -> Iterator[memoryview]:
        """The value's little-endian bytes, in pieces of at most ``nbytes``, each a fresh buffer."""
        hi, lo = self.planes.hi(self.p), self.planes.lo(self.p)
        step = max(1, nbytes // 4)
        for a in range(0, self.numel(), step):
            b = min(a + step, self.numel())
            out = torch.empty(b - a, dtype=torch.float32)
            join(hi[a:b], lo[a:b], out)
            yield memoryview(out.view(torch.uint8).numpy())
