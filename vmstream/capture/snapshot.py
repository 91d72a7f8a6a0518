"""capture_vm: pause a running VM briefly, save its device state and private
pages, resume it, then write the image memory file while the VM runs on.

The pause covers only QMP stop, the device-state save (a few KB) and one
process_vm_readv of the private pages into a buffer allocated beforehand.
Zero detection and file writes happen after the VM is running again.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmstream.capture.delta import write_delta
from vmstream.capture.guestmem import (
    PAGE,
    PageRuns,
    allocate,
    find_ram_mapping,
    private_page_runs,
    read_runs,
    runs_of,
)
from vmstream.errors import QemuError
from vmstream.qemu import QemuProcess

HEADROOM = 16 << 20  # pages the guest may touch between sizing the buffer and the stop


@dataclass(frozen=True)
class CaptureResult:
    pause_ms: float
    devstate_bytes: int
    private_bytes: int  # what the VM held privately at the snapshot point
    memory_bytes_stored: int  # bytes on disk: the sparse memory file, or the delta
    layout: str  # "full": memory.raw; "delta": delta over the root the VM maps


def _copy_sparse(src: Path, dst_fd: int, block: int = 1 << 20) -> None:
    """Copy src's non-zero blocks into dst at the same offsets, keeping holes.

    src may be a memfs file, which reports no holes: zero blocks are found by
    content too, so the copy stays sparse either way.
    """
    with open(src, "rb") as f:
        fd, end = f.fileno(), os.fstat(f.fileno()).st_size
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no more data
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                data = os.pread(fd, min(block, hole - pos), pos)
                if not data:
                    break
                if data.count(0) != len(data):
                    os.pwrite(dst_fd, data, pos)
                pos += len(data)


def _write_pages(fd: int, buf: mmap.mmap, starts: np.ndarray, counts: np.ndarray, keep_zero: bool) -> int:
    """Write packed pages back to their offsets; zero pages become holes unless keep_zero."""
    view = memoryview(buf)
    written = 0
    src = 0
    for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
        chunk = np.frombuffer(view[src * PAGE : (src + count) * PAGE], dtype=np.uint64).reshape(count, PAGE // 8)
        nonzero = np.asarray(chunk.any(axis=1)) if not keep_zero else np.ones(count, dtype=bool)
        sub = runs_of(nonzero)
        for s, c in zip(sub.starts.tolist(), sub.counts.tolist(), strict=True):
            os.pwrite(fd, view[(src + s) * PAGE : (src + s + c) * PAGE], (start + s) * PAGE)
            written += c * PAGE
        src += count
    return written


async def capture_vm(
    proc: QemuProcess, memory_bytes: int, out_dir: Path, root_memory: Path | None, flatten_above: int | None,
    while_paused: Callable[[Any], Awaitable[None]] | None = None,
) -> CaptureResult:
    """Write out_dir/devstate.bin and the memory of a running VM.

    root_memory is the memory file a clone maps (None for a booted VM). A
    clone's capture is a delta over it, unless the delta exceeds
    flatten_above bytes (None: never): then memory.raw is written whole,
    root pages plus private pages, and the image stands on its own.
    while_paused(qmp) runs in the pause, for what must match the memory (a disk).
    """
    if proc.pid is None or not proc.alive():
        raise QemuError(f"VM {proc.vm_id} is not running, so it cannot be captured")
    pid = proc.pid
    addr = find_ram_mapping(pid, memory_bytes)
    estimate = private_page_runs(pid, addr, memory_bytes).pages * PAGE
    buf = allocate(min(memory_bytes, estimate + HEADROOM))
    devstate = out_dir / "devstate.bin"

    async with proc.qmp() as qmp:
        status = await qmp.execute("query-status")
        was_running = isinstance(status, dict) and status.get("running", False)
        t0 = time.perf_counter()
        await qmp.execute("stop")
        try:
            await qmp.execute("xen-save-devices-state", {"filename": str(devstate), "live": False})
            if while_paused is not None:
                await while_paused(qmp)
            runs = private_page_runs(pid, addr, memory_bytes)
            if runs.pages * PAGE > len(buf):
                buf = allocate(runs.pages * PAGE)  # the guest outran the estimate: slower but correct
            read_runs(pid, addr, runs, buf)
        finally:
            if was_running:
                await qmp.execute("cont")
        pause_ms = (time.perf_counter() - t0) * 1000

    private = runs.pages * PAGE
    try:
        if root_memory is not None and (flatten_above is None or private <= flatten_above):
            stored = write_delta(out_dir, runs, buf)
            layout = "delta"
        else:
            stored = _write_full(out_dir / "memory.raw", memory_bytes, root_memory, runs, buf)
            layout = "full"
    finally:
        buf.close()
    return CaptureResult(round(pause_ms, 2), devstate.stat().st_size, private, stored, layout)


def _write_full(path: Path, memory_bytes: int, root_memory: Path | None, runs: PageRuns, buf: mmap.mmap) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, memory_bytes)
        if root_memory is not None:
            _copy_sparse(root_memory, fd)
        _write_pages(fd, buf, runs.starts, runs.counts, keep_zero=root_memory is not None)
        os.fsync(fd)
    finally:
        os.close(fd)
    return os.stat(path).st_blocks * 512
