"""A multi-host test bed (network namespaces + bridges) with real QEMU guests.

One TestBed, one booted VM (10.77.0.10) and one live image (captured from a
second VM, 10.77.0.11, which is then stopped) per session. Names carry a
random per-session prefix. At the end nothing of ours may remain: no
namespace with our prefix, no QEMU with our run root, no run dir.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import qemu_pids_under
from vmstream.guest import build_guest
from vmstream.migrate.bed import BedVm, Fleet
from vmstream.net import TestBed, namespaces_with_prefix, unique_prefix
from vmstream.net.links import root_links_with_prefix

MEMCHECK_SEED = 7




@dataclass
class Session:
    fleet: Fleet
    base: BedVm
    image_dir: Path
    image_like: BedVm  # the VM the image was taken from (stopped; its identity is the clones')


@pytest.fixture(scope="session")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    prefix = unique_prefix("vt")
    root = tmp_path_factory.mktemp("migrate")
    guest = build_guest(root / "guest")
    bed = TestBed(prefix)
    bed.__enter__()
    fleet = Fleet(bed, guest, root / "run", accel=os.environ.get("VMSTREAM_ACCEL", "tcg"))

    async def setup() -> Session:
        base, src = await asyncio.gather(fleet.boot("base", 0), fleet.boot("imgsrc", 1))
        fill = await asyncio.gather(base.ask(f"memcheck-fill 32 {MEMCHECK_SEED}"),
                                    src.ask(f"memcheck-fill 32 {MEMCHECK_SEED}"))
        assert all(f["ok"] for f in fill), fill
        image = await fleet.capture(src, root / "image")
        await fleet.destroy(src)
        return Session(fleet, base, image, src)

    try:
        yield asyncio.run(setup())
    finally:
        asyncio.run(fleet.close())
        bed.close()
        left_ns = namespaces_with_prefix(prefix)
        left_links = root_links_with_prefix(prefix)
        left_qemu = qemu_pids_under(root)
        run = root / "run"
        left_dirs = list(run.iterdir()) if run.exists() else []
        assert not left_ns and not left_links, f"network left behind: {left_ns} {left_links}"
        assert not left_qemu, f"QEMU processes left behind: {left_qemu}"
        assert not left_dirs, f"run dirs left behind: {left_dirs}"


@pytest.fixture(autouse=True)
def healthy_base(session: Session) -> None:
    """Each test starts with a base VM whose memcheck runs. A guest that crashed in an
    earlier test (and rebooted, losing memcheck) is replaced, so one failure does not
    fail every test after it; the test that saw the crash has failed already."""

    async def heal() -> None:
        try:
            answer = await session.base.ask("memcheck-verify", timeout=60)
        except Exception as exc:  # a dead or hung guest is replaced the same way
            answer = {"ok": False, "error": str(exc)}
        if answer.get("ok"):
            return
        print(f"base VM unhealthy ({answer}); booting a new one")
        await session.fleet.destroy(session.base)
        session.base = await session.fleet.boot(f"base{secrets.token_hex(2)}", 0)
        fill = await session.base.ask(f"memcheck-fill 32 {MEMCHECK_SEED}")
        assert fill["ok"], fill

    asyncio.run(heal())
