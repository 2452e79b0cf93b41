"""Page mapping: file regions and anonymous regions reserved as virtual memory, whose pages are made resident
(`populate`) and dropped (`drop`) explicitly.

This is how the CPU execution device reads an NVMe store without copying: a unit's ranges are mapped once, a fetch
populates their pages from the page cache and freeing the slot drops them again. It needs Linux's `madvise(2)`
(called through libc, without the GIL: `mmap.madvise` holds it for the whole call, so populating a unit's pages on an
I/O thread would stop the computing thread). libc is loaded on first use; where it cannot be (Windows), `supported()`
is False and the runtime reads into buffers instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch


# Linux values where the mmap module does not name them (MADV_POPULATE_READ needs Python 3.13's mmap to be named).
MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", 3)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)

_libc: ctypes.CDLL | None = None


def supported() -> bool:
    """Whether pages can be mapped, populated and dropped here (Linux with a loadable libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        _load_libc()
    except OSError:
        return False
    return True


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        _libc = libc
    return _libc


def madvise(data: torch.Tensor, advice: int) -> None:
    """madvise(2) on the pages under the CPU tensor `data`. `MADV_DONTNEED` covers only the pages entirely inside
    `data` (a neighbour's bytes are never dropped); other advice every page it touches."""
    try:
        libc = _load_libc()
    except OSError as err:
        raise RuntimeError(
            f"page mapping needs Linux's madvise (libc could not be loaded: {err}); use OffloadConfig(map_files=False)"
        ) from err
    start, end = data.data_ptr(), data.data_ptr() + data.numel() * data.element_size()
    page = mmap.PAGESIZE
    if advice == MADV_DONTNEED:
        start, end = -(-start // page) * page, end - end % page
    else:
        start, end = start - start % page, -(-end // page) * page
    if end > start and libc.madvise(start, end - start, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def populate(data: torch.Tensor) -> None:
    """Map the pages under `data` (a view of a mapping) now, reading them from the file when they are not in the page
    cache (Linux >= 5.14; before, only a read-ahead hint)."""
    try:
        madvise(data, MADV_POPULATE_READ)
    except OSError:
        madvise(data, MADV_WILLNEED)


def drop(data: torch.Tensor) -> None:
    """Unmap the pages entirely inside `data`: a private file mapping reads them from the page cache again when
    touched, an anonymous one reads zeros."""
    madvise(data, MADV_DONTNEED)


def map_file(fd: int, start: int, nbytes: int) -> torch.Tensor:
    """`nbytes` at `start` of the open file `fd` as a uint8 tensor over a private mapping, no page mapped yet
    (`populate`/`drop` map and unmap parts of it). The mapping goes away with the last tensor viewing it; private: a
    write could never reach the file."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(
        fd, start + nbytes - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base
    )
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start - base)


def reserve(nbytes: int) -> torch.Tensor:
    """`nbytes` of anonymous virtual memory as a uint8 tensor: no page is resident until written."""
    anonymous = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(anonymous, dtype=torch.uint8)  # the mapping lives as long as its views
