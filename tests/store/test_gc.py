"""Garbage collection: never a referenced chunk, and safe beside writers that have not committed yet."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.store.conftest import FAST_RETRY
from tests.store.test_conformance import make_file
from vmstream.store import ChunkStore, LocalBackend, StoreConflict, StoreError, collect_garbage

CS = 16 << 10


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(LocalBackend(tmp_path / "store"), chunk_size=CS, pack_size=64 << 10, retry=FAST_RETRY)


def packs(store: ChunkStore) -> set[str]:
    return {o.key.removeprefix("packs/") for o in store.backend.list("packs/")}


def test_random_images_gc_keeps_every_committed_chunk(store: ChunkStore, tmp_path: Path) -> None:
    """Images made of a shared pool of blocks; delete some refs, collect, check every survivor in full."""
    rng = random.Random(3)
    pool = [os.urandom(CS) for _ in range(24)]
    contents = {}
    for n in range(8):
        regions = [(i * CS, rng.choice(pool)) for i in range(32) if rng.random() < 0.5]
        contents[f"img{n}"] = make_file(tmp_path / f"img{n}", 32 * CS, regions)
        store.store_file(tmp_path / f"img{n}", ref=f"img{n}")
    for name in rng.sample(sorted(contents), 5):
        store.delete_ref(name)
        del contents[name]
    total = len(packs(store))
    for _ in range(3):
        collect_garbage(store, grace=0)
    assert len(packs(store)) < total
    for name, content in contents.items():
        cmap = store.get_ref(name)
        for ref in cmap.stored():
            store.read_chunk(ref)  # verifies blake3
        assert store.read_range(cmap, 0, cmap.size) == content
    used = set().union(*(store.get_ref(n).packs for n in contents))
    assert packs(store) == used  # and nothing unreferenced is left


def test_young_unreferenced_packs_are_kept(store: ChunkStore, tmp_path: Path) -> None:
    """A writer that wrote packs but has not committed yet: its packs are younger than the grace period."""
    make_file(tmp_path / "f", 8 * CS, [(0, os.urandom(8 * CS))])
    uncommitted = store.store_file(tmp_path / "f")  # no ref
    report = collect_garbage(store)  # default grace: an hour
    assert report.young_packs == len(uncommitted.packs) and report.condemned == report.deleted == 0
    store.commit("f", uncommitted)
    assert store.read_range(uncommitted, 0, uncommitted.size) == (tmp_path / "f").read_bytes()


def test_maps_passed_in_are_roots(store: ChunkStore, tmp_path: Path) -> None:
    make_file(tmp_path / "f", 4 * CS, [(0, os.urandom(4 * CS))])
    in_flight = store.store_file(tmp_path / "f")
    for _ in range(2):
        report = collect_garbage(store, [in_flight], grace=0)
        assert report.live_packs == len(in_flight.packs) and report.deleted == 0
    assert packs(store) == in_flight.packs


def test_commit_refused_for_condemned_pack_and_store_file_recovers(store: ChunkStore, tmp_path: Path) -> None:
    """GC condemns an old unreferenced pack while a writer is about to reuse its chunks."""
    content = os.urandom(4 * CS)
    make_file(tmp_path / "old", 4 * CS, [(0, content)])
    old = store.store_file(tmp_path / "old")  # never committed: garbage once it is old
    writer = ChunkStore(LocalBackend(tmp_path / "store"), chunk_size=CS, retry=FAST_RETRY)  # another host
    make_file(tmp_path / "new", 4 * CS, [(0, content)])
    reusing = writer.store_file(tmp_path / "new")  # dedups against the old pack
    assert reusing.packs == old.packs
    assert collect_garbage(store, grace=0).condemned == len(old.packs)
    with pytest.raises(StoreConflict, match="condemned or removed"):
        writer.commit("new", reusing)
    # store_file with a ref notices the condemned pack, skips it and writes the chunks anew.
    fresh = writer.store_file(tmp_path / "new", ref="new")
    assert not fresh.packs & old.packs
    collect_garbage(store, grace=0)
    assert packs(store) == fresh.packs
    assert writer.read_range(writer.get_ref("new"), 0, 4 * CS) == content


def test_pack_used_again_is_rescued(store: ChunkStore, tmp_path: Path) -> None:
    """A ref that appears after condemnation (its commit passed its check just before) saves the pack."""
    make_file(tmp_path / "f", 4 * CS, [(0, os.urandom(4 * CS))])
    cmap = store.store_file(tmp_path / "f")
    assert collect_garbage(store, grace=0).condemned == len(cmap.packs)
    store.backend.put("refs/late", cmap.model_dump_json().encode())  # the ref write of that racing commit
    report = collect_garbage(store, grace=0)
    assert report.rescued == len(cmap.packs) and report.deleted == 0
    assert not list(store.backend.list("gc/"))
    assert collect_garbage(store, grace=0).deleted == 0


def test_leftovers_of_crashes_are_collected(store: ChunkStore, tmp_path: Path) -> None:
    """A pack without index (writer died before the index) and an index without pack (GC died midway)."""
    store.backend.put("packs/orphan", b"\x00whatever")
    store.backend.put("index/gone", b'{"format": 1, "pack": "gone", "chunks": []}')
    collect_garbage(store, grace=0)
    collect_garbage(store, grace=0)
    assert not list(store.backend.list(""))


def test_unreadable_ref_stops_gc(store: ChunkStore, tmp_path: Path) -> None:
    """If a root cannot be read, GC cannot know what is live, so it deletes nothing."""
    make_file(tmp_path / "f", 4 * CS, [(0, os.urandom(4 * CS))])
    store.store_file(tmp_path / "f")
    collect_garbage(store, grace=0)  # condemns the unreferenced pack
    store.backend.put("refs/broken", b"{not json")
    with pytest.raises(StoreError, match="'broken' is not a valid chunk map"):
        collect_garbage(store, grace=0)
    assert packs(store)


_GC_CHILD = """
import sys
from pathlib import Path
from vmstream.store import ChunkStore, LocalBackend, collect_garbage
store = ChunkStore(LocalBackend(Path(sys.argv[1])), chunk_size=int(sys.argv[2]), pack_size=int(sys.argv[3]))
print("ready", flush=True)
sys.stdin.read(1)
collect_garbage(store, grace=0)
print("done", flush=True)
"""


def test_a_gc_killed_at_any_point_loses_no_live_chunk(store: ChunkStore, tmp_path: Path) -> None:
    """A GC process SIGKILLed at random points while it deletes hundreds of condemned packs (a
    real process, a real store on disk). Every image still referenced reads back whole after
    each kill, and a GC run to the end then leaves exactly the packs they use. At least one kill
    must land while packs were being deleted, or the test proves nothing."""
    rng = random.Random(11)
    pool = [os.urandom(CS) for _ in range(64)]
    contents = {}
    for n in range(16):
        regions = [(i * CS, rng.choice(pool) if rng.random() < 0.3 else os.urandom(CS)) for i in range(96)]
        contents[f"img{n}"] = make_file(tmp_path / f"img{n}", 96 * CS, regions)
        store.store_file(tmp_path / f"img{n}", ref=f"img{n}")
    for name in rng.sample(sorted(contents), 12):
        store.delete_ref(name)
        del contents[name]
    assert collect_garbage(store, grace=0).condemned > 150  # the next runs delete them
    root = tmp_path / "store"
    cut_short = 0
    for delay in (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2):
        before = len(packs(store))
        child = subprocess.Popen([sys.executable, "-c", _GC_CHILD, str(root), str(CS), str(64 << 10)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdin is not None
        try:
            assert child.stdout.readline().strip() == "ready"
            child.stdin.write("go")
            child.stdin.flush()
            time.sleep(delay)
            child.kill()
        finally:
            child.wait()
        after = len(packs(store))
        cut_short += before > after > len(set().union(*(store.get_ref(n).packs for n in contents)))
        for name, content in contents.items():
            cmap = store.get_ref(name)
            assert store.read_range(cmap, 0, cmap.size) == content, f"{name} after a GC killed at {delay}s"
    assert cut_short, "no kill landed while the GC was deleting packs"
    collect_garbage(store, grace=0)
    assert packs(store) == set().union(*(store.get_ref(n).packs for n in contents))
