"""Layered images: a clone's private pages stored as a delta over its root.

A clone maps its root image's memory file MAP_PRIVATE, so its private pages
(present, not file-backed) are exactly what differs from the root. A delta
is those pages packed in delta.bin plus their runs in delta.idx (npy, one
(first page, count) row per run). Because a clone of a layered image gets
the delta written into its RAM as private pages, a new capture from it again
yields a delta over the same root: chains of any depth map one root file and
apply one delta, and every clone of the chain shares the root's pages.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from vmstream.capture.guestmem import PAGE, PageRuns, find_ram_mapping, write_runs
from vmstream.errors import QemuError

DELTA_PAGES = "delta.bin"
DELTA_INDEX = "delta.idx.npy"


def write_delta(out_dir: Path, runs: PageRuns, buf: mmap.mmap) -> int:
    """Write the packed pages and their runs; returns the bytes of page data."""
    nbytes = runs.pages * PAGE
    with open(out_dir / DELTA_PAGES, "wb") as f:
        f.write(memoryview(buf)[:nbytes])
        os.fsync(f.fileno())
    with open(out_dir / DELTA_INDEX, "wb") as f:
        np.save(f, np.stack([runs.starts, runs.counts], axis=1).astype(np.int64))
        os.fsync(f.fileno())
    return nbytes


def load_runs(image_dir: Path) -> PageRuns:
    table = np.load(image_dir / DELTA_INDEX)
    return PageRuns(table[:, 0], table[:, 1]) if len(table) else PageRuns(np.zeros(0, np.int64), np.zeros(0, np.int64))


def apply_delta(pid: int, memory_bytes: int, image_dir: Path) -> int:
    """Write an image's delta pages into a clone's RAM before it runs."""
    runs = load_runs(image_dir)
    if runs.pages == 0:
        return 0
    size = os.path.getsize(image_dir / DELTA_PAGES)
    if size != runs.pages * PAGE:
        raise QemuError(f"delta of {image_dir.name} is damaged: {size} bytes of pages for {runs.pages} pages in its index")
    addr = find_ram_mapping(pid, memory_bytes)
    # ACCESS_COPY: a private map is writable to ctypes but only ever read here
    with open(image_dir / DELTA_PAGES, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as pages:
        write_runs(pid, addr, runs, pages)
    return runs.pages * PAGE
