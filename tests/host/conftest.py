"""An agent in this process, without QEMU or FUSE: the real API, registry, pool,
image repository and chunk store (a directory), with the Starter and memfs
replaced by fakes. For API validation, conflicts, not-found and state guards;
what needs a guest is tested in tests/integration with real QEMU."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmstream.capture import CaptureResult
from vmstream.errors import QemuError
from vmstream.guest import GuestArtifacts
from vmstream.host.api import create_app
from vmstream.host.db import VmRecord
from vmstream.host.manager import HostManager
from vmstream.host.registry import VmRegistry
from vmstream.host.starter import Starter
from vmstream.image import ImageRepository, LiveImage
from vmstream.qemu import AccelChoice, MachineSpec
from vmstream.settings import Settings

TOKEN = "test-token"


class FakeProcess:
    """Stands in for a QemuProcess: 'runs' from start() until stop() or die(), and,
    like a QEMU, outlives the agent that started it (found again by vm_id)."""

    running: set[str] = set()  # vm_ids of fake QEMUs that run

    def __init__(self, vm_id: str, rundir: Path, pid: int | None = None) -> None:
        self.vm_id, self.rundir, self.pid = vm_id, rundir, None  # no pid: nothing to measure in /proc
        self.spec: MachineSpec | None = None

    def start(self, spec: MachineSpec) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        (self.rundir / "serial.log").write_text(f"fake console of {self.vm_id}\n")
        self.spec = spec
        self.running.add(self.vm_id)

    def alive(self) -> bool:
        return self.vm_id in self.running

    def die(self) -> None:
        self.running.discard(self.vm_id)

    async def stop(self, soft_timeout: float = 3.0, keep: Callable[[], None] | None = None) -> None:
        self.die()
        if keep is not None:
            keep()

    agent_path = property(lambda self: self.rundir / "agent.sock")
    serial_path = property(lambda self: self.rundir / "serial.log")
    log_path = property(lambda self: self.rundir / "qemu.log")

    def log_tail(self, lines: int = 8) -> str:
        return ""

    def serial_tail(self, lines: int = 12) -> str:
        return ""


class FakeStarter(Starter):
    """The Starter with every QEMU and guest interaction answered in process.
    fail: hooks a test sets to make a step fail for a VM name."""

    process_class = FakeProcess  # type: ignore[assignment]
    fail: dict[str, Callable[[str], bool]]

    def __init__(self, settings: Settings, registry: VmRegistry, images: ImageRepository) -> None:
        super().__init__(settings, registry, images)
        self.fail = {}
        self.asked: list[tuple[str, str]] = []
        guest = settings.home / "guest"
        guest.mkdir(parents=True, exist_ok=True)
        for f in ("vmlinuz", "initrd.img"):
            (guest / f).write_bytes(b"fake")
        self.artifacts = GuestArtifacts(guest / "vmlinuz", guest / "initrd.img", "fakekey", "6.1.0-fake")

    def _maybe_fail(self, step: str, name: str) -> None:
        check = self.fail.get(step)
        if check is not None and check(name):
            raise QemuError(f"fake {step} failure for {name}")

    def guest(self, kernel: Path | None = None, force: bool = False) -> GuestArtifacts:
        return self.artifacts

    def accelerator(self, guest: GuestArtifacts) -> AccelChoice:
        return AccelChoice("tcg", "fake")

    async def wait_ready(self, rec: VmRecord, proc: Any, timeout: float, attempt_s: float = 2.0, ready: Any = None) -> None:
        self._maybe_fail("http", rec.name)

    async def resume_clone(self, rec: VmRecord, proc: Any, image: LiveImage, identity: str, pooled: bool,
                           mark: Callable[[str], None]) -> asyncio.Task[dict[str, Any]]:
        mark("qmp_ready")
        self._maybe_fail("resume", rec.name)
        mark("running")

        async def answer() -> dict[str, Any]:
            return {"ok": True, "hostname": rec.hostname}

        return asyncio.create_task(answer())

    async def load_paused(self, rec: VmRecord, proc: Any, image: LiveImage) -> None:
        self._maybe_fail("pool", rec.name)

    tb_flushes: int | None = 1  # what a run-through reports: 1 is the state load's flush only

    async def run_through(self, rec: VmRecord, proc: Any, prepare: str) -> int | None:
        return self.tb_flushes

    async def ask(self, proc: Any, command: str, timeout: float, expect: Any = None) -> dict[str, Any]:
        self.asked.append((proc.vm_id, command))
        if command == "hooks":
            return {"ok": True, "result": {"state": "done", "hooks": []}}
        return {"ok": True, "command": command}

    paused: set[str] = set()  # vm_ids whose fake QEMU took 'stop'

    async def run_state(self, rec: VmRecord, proc: Any, command: str) -> None:
        self._maybe_fail("qmp", rec.name)
        (self.paused.add if command == "stop" else self.paused.discard)(proc.vm_id)

    @staticmethod
    async def qemu_status(proc: Any) -> str | None:
        return "paused" if proc.vm_id in FakeStarter.paused else "running"

    @staticmethod
    async def resume_if_paused(proc: Any) -> str | None:
        if proc.vm_id not in FakeStarter.paused:
            return None
        FakeStarter.paused.discard(proc.vm_id)
        return "paused"

    async def capture(self, rec: VmRecord, proc: Any, stage: Path, root_memory: Path | None,
                      flatten_above: int | None) -> tuple[CaptureResult, list[Path]]:
        self._maybe_fail("capture", rec.name)
        with open(stage / "memory.raw", "wb") as f:
            f.truncate(rec.memory_bytes)
            f.write(b"vmstream fake page")
        (stage / "devstate.bin").write_bytes(b"fake device state")
        return CaptureResult(1.0, 17, 4096, 4096, "full"), []


class FakeMemfs:
    """memfs without FUSE: answers its control requests, serves nothing."""

    def __init__(self, home: Path) -> None:
        self.mountpoint = home / "memfs"
        self.requests: list[str] = []

    def pid(self) -> int | None:
        return None

    async def ensure(self) -> None:
        pass

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.requests.append(cmd)
        return {"ok": True, "missing": [], "chunks": []}

    async def stop(self) -> None:
        pass


class Agent:
    """An in-process agent: its HTTP client (with the token), manager and fakes."""

    def __init__(self, http: TestClient, manager: HostManager) -> None:
        self.http, self.manager = http, manager
        assert isinstance(manager.starter, FakeStarter)
        self.starter: FakeStarter = manager.starter

    def call(self, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        r = self.http.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"}, **kw)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def error(self, method: str, path: str, status: int, **kw: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.call(method, path, status, **kw)
        assert set(body) == {"error", "message"}, body
        return body

    def boot(self, name: str, **kw: Any) -> dict[str, Any]:
        vm: dict[str, Any] = self.call("POST", "/v1/vms", json={"name": name, "memory": "64M", **kw})
        return vm

    def image(self, vm: str, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.call("POST", "/v1/live-images", json={"vm": vm, "name": name})
        return info

    def start(self, image: str, **kw: Any) -> list[dict[str, Any]]:
        vms: list[dict[str, Any]] = self.call("POST", f"/v1/live-images/{image}/start", json=kw)["vms"]
        return vms

    def wait_pool(self, image: str, timeout: float = 10.0) -> None:
        """Until the agent has a pooled QEMU ready for image."""
        deadline = time.monotonic() + timeout
        while not self.call("GET", "/v1/host")["clone_pool"]["ready"].get(image):
            assert time.monotonic() < deadline, f"no pooled QEMU for {image}"
            time.sleep(0.01)

    def names(self) -> set[str]:
        return {v["name"] for v in self.call("GET", "/v1/vms")}


def make_agent(home: Path, **settings: Any) -> tuple[HostManager, TestClient]:
    cfg = Settings(home=home, gc_interval_s=0, **{"clone_pool": 0, **settings})
    manager = HostManager(cfg, starter=FakeStarter, memfs=FakeMemfs(home))  # type: ignore[arg-type]
    return manager, TestClient(create_app(manager, TOKEN, lambda: None))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    manager, http = make_agent(tmp_path / "home")
    with http:
        yield Agent(http, manager)
    FakeProcess.running.clear()
    FakeStarter.paused.clear()


@pytest.fixture
def pooled_agent(tmp_path: Path) -> Iterator[Agent]:
    manager, http = make_agent(tmp_path / "home", clone_pool=1)
    with http:
        yield Agent(http, manager)
    FakeProcess.running.clear()
    FakeStarter.paused.clear()
