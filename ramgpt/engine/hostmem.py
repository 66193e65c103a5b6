"""Host memory the GPU copies from and to: page-locked once, in one piece.

torch's pinned allocator rounds every allocation up to a power of two, so pinning the 1b's bf16
chunk copies one tensor at a time took 3.7 GiB for 2.2 GB of tensors (H200 probe: 3.69 GB of RSS
for 2.20 GB, 1.73 s). :class:`HostArena` allocates one plain buffer, page-locks it with a single
``cudaHostRegister`` (0.79 s, RSS = the bytes) and hands out aligned views; torch and ramtorch see
the views as pinned (``is_pinned()``), so nothing pins them again.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import torch

ALIGN = 64  # bytes: covers every dtype's element size and the CPU's vector loads
PAGE = mmap.PAGESIZE  # memory-mapped tensors start on a page, so releasing one never drops a neighbour


def aligned(nbytes: int, align: int = ALIGN) -> int:
    return -(-nbytes // align) * align


def consume_cuda_error(device: str) -> None:
    """A failed CUDA runtime call (cudaHostRegister) stays the runtime's "last error", which the
    launch check of the next kernel would raise as its own. torch exposes no cudaGetLastError, so
    launch a tiny kernel and let its check consume the stale error."""
    for _ in range(2):
        try:
            torch.ones(1, device=device).add_(1)
            return
        except RuntimeError:
            continue


def register(t: torch.Tensor, device: str) -> bool:
    """Page-lock ``t``'s memory in place for DMA. False (with the error consumed) where the
    driver refuses, e.g. a locked-memory limit in a container or WSL2."""
    rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(rc) != 0:
        consume_cuda_error(device)
        return False
    return True


def unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class HostArena:
    """One host buffer carved into aligned tensor views; page-locked when ``device`` is CUDA."""

    def __init__(self, nbytes: int, device: str, what: str, lock: bool = True):
        """``lock=False``: page-lock later, with :meth:`lock` (after the caller has written every page:
        its threads fault the pages in in parallel, where the driver's page-lock of fresh memory
        faults and zeroes them one after another)."""
        self.device, self.what = device, what
        self.buf = torch.empty(max(nbytes, ALIGN), dtype=torch.uint8)
        self.registered = False
        self.off = 0
        if lock:
            self.lock()

    def lock(self) -> None:
        if self.device.startswith("cuda") and not self.registered:
            self.registered = register(self.buf, self.device)
            if not self.registered:
                warnings.warn(f"could not page-lock {self.buf.numel() / 2**30:.1f} GiB for {self.what}; host-device "
                              "copies of it will be slower (pageable memory)", RuntimeWarning, stacklevel=3)

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if self.off + n > self.buf.numel():
            raise ValueError(f"arena of {self.buf.numel()} bytes is full ({self.off} used, {n} more asked)")
        view = self.buf[self.off : self.off + n].view(dtype).view(shape)
        self.off += aligned(n)
        return view

    def contains(self, t: torch.Tensor) -> bool:
        start = self.buf.data_ptr()
        return start <= t.data_ptr() < start + self.buf.numel()

    def close(self) -> None:
        if self.registered:
            torch.cuda.synchronize(torch.device(self.device))
            unregister(self.buf)
            self.registered = False


class FileArena:
    """Tensors in a memory-mapped file (the low-RAM mode's AdamW moments): the OS pages them in
    when they are touched, :meth:`release` hands a tensor's pages back (``MADV_DONTNEED``: they stay
    in the page cache, or go to disk, and leave this process's RSS), :meth:`prefetch` asks for them
    ahead (``MADV_WILLNEED``). The file is created sparse (all zeros), so fresh moments cost nothing."""

    def __init__(self, path: str | os.PathLike[str], nbytes: int, create: bool = True, release_pages: bool = True):
        """``create``: a fresh (zero) file; else map the one another process of the node created.
        ``release_pages``: hand pages back after use (a file on disk; not for /dev/shm, whose pages
        are RAM either way: dropping them from the mapping only costs page faults, 0.4 s per 1b step)."""
        self.release_pages = release_pages
        self.path = Path(path)
        self.nbytes = max(aligned(nbytes, PAGE), PAGE)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w+b" if create else "r+b") as f:
            if create:
                f.truncate(self.nbytes)
            self.mm = mmap.mmap(f.fileno(), self.nbytes, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.off = 0
        self._page = PAGE

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if self.off + n > self.nbytes:
            raise ValueError(f"file arena {self.path} is full")
        view = self.buf[self.off : self.off + n].view(dtype).view(shape)
        self.off += aligned(n, self._page)  # page-aligned: release() never drops a neighbour's page
        return view

    def contains(self, t: torch.Tensor) -> bool:
        start = self.buf.data_ptr()
        return start <= t.data_ptr() < start + self.nbytes

    def _range(self, t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr() - self.buf.data_ptr()
        length = aligned(t.numel() * t.element_size(), self._page)
        return start - start % self._page, length

    def release(self, t: torch.Tensor) -> None:
        if self.release_pages and self.contains(t):
            self.mm.madvise(mmap.MADV_DONTNEED, *self._range(t))

    def prefetch(self, t: torch.Tensor) -> None:
        if self.contains(t):
            self.mm.madvise(mmap.MADV_WILLNEED, *self._range(t))

    def register(self, device: str) -> bool:
        """Page-lock the mapping for DMA (the node-shared fp32 masters): each process registers its own
        mapping of the same pages."""
        self.registered = device.startswith("cuda") and register(self.buf, device)
        self.device = device
        return self.registered

    def close(self) -> None:
        if getattr(self, "registered", False):
            torch.cuda.synchronize(torch.device(self.device))
            unregister(self.buf)
            self.registered = False
        del self.buf
        try:
            self.mm.close()
        except BufferError:  # a tensor view still references the mapping; the OS unmaps at exit
            pass
