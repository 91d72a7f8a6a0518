"""Reading a QEMU process's guest RAM from outside, without QEMU's help.

The RAM block is the rw mapping of exactly the RAM size in /proc/PID/maps.
/proc/PID/pagemap tells per page: bit 63 present, bit 61 file-backed or
shared. Present pages with bit 61 clear are the VM's private pages: all
touched RAM of a booted VM, or the copy-on-write pages of a clone whose
other pages still come from its image's memory file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmstream.errors import QemuError

PAGE = 4096
IOV_MAX = 1024
_PRESENT = np.uint64(1 << 63)
_FILE_OR_SHARED = np.uint64(1 << 61)

_libc = ctypes.CDLL(None, use_errno=True)
# ssize_t results: the default int would wrap past 2 GiB
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t
MAX_CALL_BYTES = 256 << 20  # per system call, so one result never nears the int limits


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@dataclass(frozen=True)
class PageRuns:
    """Contiguous runs of pages, as (first page, page count) arrays."""

    starts: np.ndarray
    counts: np.ndarray

    @property
    def pages(self) -> int:
        return int(self.counts.sum())


def find_ram_mapping(pid: int, size: int) -> int:
    """Start address of the guest RAM mapping in QEMU's address space."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi - lo == size and fields[1].startswith("rw"):
                return lo
    raise QemuError(f"no guest RAM mapping of {size >> 20} MiB found in QEMU pid {pid}")


def private_page_runs(pid: int, addr: int, size: int) -> PageRuns:
    """Runs of pages that are present and not backed by a file: the VM's own data."""
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        entries = np.frombuffer(
            os.pread(pagemap.fileno(), size // PAGE * 8, addr // PAGE * 8), dtype=np.uint64
        )
    private = ((entries & _PRESENT) != 0) & ((entries & _FILE_OR_SHARED) == 0)
    return runs_of(private)


def runs_of(mask: np.ndarray) -> PageRuns:
    """Runs of True in a boolean array, as starts and lengths."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return PageRuns(starts, ends - starts)


def allocate(nbytes: int) -> mmap.mmap:
    """A pre-faulted buffer, so filling it later costs no page faults."""
    return mmap.mmap(-1, max(nbytes, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def read_runs(pid: int, addr: int, runs: PageRuns, buf: mmap.mmap) -> None:
    """Copy the runs, packed back to back, into buf with process_vm_readv."""
    _transfer(_libc.process_vm_readv, pid, addr, runs, buf, "reading")


def write_runs(pid: int, addr: int, runs: PageRuns, buf: mmap.mmap) -> None:
    """Copy packed pages from buf into the runs of the process's guest RAM.

    On a MAP_PRIVATE mapping each written page becomes the VM's own
    copy-on-write page; the image file underneath is never modified.
    """
    _transfer(_libc.process_vm_writev, pid, addr, runs, buf, "writing")


def _batches(runs: PageRuns) -> Iterator[list[tuple[int, int]]]:
    """(first page, count) pieces, at most IOV_MAX and MAX_CALL_BYTES per system call."""
    batch: list[tuple[int, int]] = []
    pages = 0
    limit = MAX_CALL_BYTES // PAGE
    for start, count in zip(runs.starts.tolist(), runs.counts.tolist(), strict=True):
        while count:
            take = min(count, limit - pages)
            batch.append((start, take))
            pages += take
            start += take
            count -= take
            if len(batch) == IOV_MAX or pages == limit:
                yield batch
                batch, pages = [], 0
    if batch:
        yield batch


def _transfer(call: Any, pid: int, addr: int, runs: PageRuns, buf: mmap.mmap, doing: str) -> None:
    if runs.pages == 0:
        return
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = 0
    for batch in _batches(runs):
        remote = (_IoVec * len(batch))(*(_IoVec(addr + s * PAGE, c * PAGE) for s, c in batch))
        want = sum(c for _, c in batch) * PAGE
        local = _IoVec(base + offset, want)
        got = call(pid, ctypes.byref(local), 1, remote, len(batch), 0)
        if got != want:
            err = ctypes.get_errno()
            raise QemuError(f"{doing} guest memory of pid {pid} failed: {got} of {want} bytes ({os.strerror(err)})")
        offset += want
