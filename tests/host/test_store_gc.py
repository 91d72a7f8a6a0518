"""The agent's store GC drops the memory of captures that never committed, and only theirs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.host.conftest import Agent
from vmstream.memfs import memory_ref
from vmstream.store.store import REFS


def _age(agent: Agent, ref: str, seconds: float) -> None:
    [path] = [p for p in agent.manager.settings.home.rglob("*") if p.is_file() and str(p).endswith(REFS + ref)]
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_memory_of_a_capture_that_never_committed_goes_after_the_grace(agent: Agent, tmp_path: Path) -> None:
    agent.boot("src")
    agent.image("src", "kept")
    store = agent.manager.store
    memory = tmp_path / "memory.raw"
    memory.write_bytes(os.urandom(1 << 20))
    store.store_file(memory, ref=memory_ref("ghost"))  # a capture killed before its commit
    store.store_file(memory, ref=memory_ref("young"))  # one under way (here or on another host)
    _age(agent, memory_ref("ghost"), 7200)
    if memory_ref("kept") in store.list_refs():  # a committed image's memory stays however old
        _age(agent, memory_ref("kept"), 7200)
    report = agent.call("POST", "/v1/host/store/gc", params={"grace": 3600})
    assert report["orphan_refs"] == ["ghost"]
    refs = store.list_refs()
    assert memory_ref("ghost") not in refs and memory_ref("young") in refs
    assert [i["name"] for i in agent.call("GET", "/v1/live-images")] == ["kept"]
