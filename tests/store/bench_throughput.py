"""Throughput of store_file and read_range on a local backend (not a test; run by hand).

    .venv/bin/python -m tests.store.bench_throughput [MEMORY_FILE]

Without a file it makes a 256 MiB sparse file with 80 MiB of data: 40 MiB random
(incompressible) and 40 MiB of repetitive text, in 1 MiB runs spread over the file.
The backend sits on the same disk, with a warm page cache.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from vmstream.store import ChunkStore, LocalBackend

MIB = 1 << 20


def synthetic(path: Path) -> None:
    rng = random.Random(1)
    slots = rng.sample(range(256), 80)
    with open(path, "wb") as f:
        f.truncate(256 * MIB)
        for n, slot in enumerate(slots):
            f.seek(slot * MIB)
            f.write(os.urandom(MIB) if n % 2 else (b"line %d of some text\n" % n) * (MIB // 20))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp) / "mem.raw"
        if len(sys.argv) == 1:
            synthetic(src)
        store = ChunkStore(LocalBackend(Path(tmp) / "store"))
        size = src.stat().st_size
        t = time.perf_counter()
        cmap = store.store_file(src, ref="img")
        t_store = time.perf_counter() - t
        stored = sum(o.size for o in store.backend.list("packs/"))
        t = time.perf_counter()
        store.store_file(src)
        t_again = time.perf_counter() - t
        t = time.perf_counter()
        for off in range(0, size, MIB):
            store.read_range(cmap, off, MIB)
        t_read = time.perf_counter() - t
        refs = list(cmap.stored())
        sample = random.Random(2).sample(refs, min(200, len(refs)))
        t = time.perf_counter()
        for ref in sample:
            store.read_chunk(ref)
        t_chunk = (time.perf_counter() - t) / len(sample)
        store.close()
        print(json.dumps({
            "file_mib": size / MIB,
            "nonzero_mib": round(cmap.nonzero_bytes / MIB, 1),
            "stored_mib": round(stored / MIB, 1),
            "store_file_s": round(t_store, 3),
            "store_file_mib_s_logical": round(size / MIB / t_store),
            "store_file_mib_s_nonzero": round(cmap.nonzero_bytes / MIB / t_store),
            "store_file_again_all_dedup_s": round(t_again, 3),
            "read_range_1mib_sequential_s": round(t_read, 3),
            "read_range_mib_s_logical": round(size / MIB / t_read),
            "read_range_mib_s_nonzero": round(cmap.nonzero_bytes / MIB / t_read),
            "read_chunk_ms_random": round(t_chunk * 1000, 2),
        }, indent=1))


if __name__ == "__main__":
    main()
