"""Fixtures that boot real QEMU guests through the real agent and CLI.

One agent, one base VM and one live image per session; every other VM a
test makes is owned by the `vms` factory, which destroys it at teardown.
At the end of the session nothing of ours may be left: no QEMU process,
no run dir, no socket.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hosts import Cli, fuse_mounts, our_qemu_pids, status
from tests.procs import pids_mentioning

SCRAPE_TOKEN = "scrape-" + secrets.token_hex(8)  # the session agent's read-only token for /metrics


def vm_qemu_pids(cli: Cli) -> set[int]:
    """Our QEMU processes but the agent's clone pool (QEMUs started ahead, which come and go)."""
    pids = cli.json("host", "--json")["clone_pool"]["pids"]
    pooled = {pid for per_image in pids.values() for pid in per_image}
    return set(our_qemu_pids(cli.home)) - pooled


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    home = tmp_path_factory.mktemp("vmstream-home")
    c = Cli(home, {"VMSTREAM_METRICS_TOKEN": SCRAPE_TOKEN})
    try:
        yield c
    finally:
        c.run("agent", "stop", "--destroy-vms")
        left = our_qemu_pids(home)
        assert not left, f"QEMU processes left behind: {left}"
        assert not fuse_mounts(home), f"FUSE mounts left behind: {fuse_mounts(home)}"
        assert not pids_mentioning(home, b"haproxy"), f"HAProxy left behind: {pids_mentioning(home, b'haproxy')}"
        run = home / "run"
        assert not run.exists() or not any(run.iterdir()), f"run dirs left behind: {list(run.iterdir())}"


class VmFactory:
    """Owns the VMs a test makes; destroys each one at teardown."""

    def __init__(self, cli: Cli) -> None:
        self.cli = cli
        self.names: list[str] = []

    def clones(self, image: str, count: int = 1, prefix: str | None = None) -> list[dict[str, Any]]:
        args = ["live-image", "start", image, "--count", str(count)]
        if prefix:
            args += ["--name", prefix]
        vms: list[dict[str, Any]] = self.cli.json(*args)["vms"]
        self.names += [v["name"] for v in vms]
        return vms

    def destroy_all(self) -> None:
        for name in reversed(self.names):
            self.cli.run("destroy", name)
        self.names.clear()


@pytest.fixture
def vms(cli: Cli) -> Iterator[VmFactory]:
    factory = VmFactory(cli)
    try:
        yield factory
    finally:
        factory.destroy_all()


@pytest.fixture(scope="session")
def base_vm(cli: Cli) -> dict[str, Any]:
    vm: dict[str, Any] = cli.json("boot", "base", "--memory", "256M")
    return vm


@dataclass
class BaseImage:
    name: str
    info: dict[str, Any]
    counter: int  # the base VM's counter just before the capture
    uptime: float
    memcheck_seed: int
    created: float  # host time when the image was taken


@pytest.fixture(scope="session")
def base_image(cli: Cli, base_vm: dict[str, Any]) -> BaseImage:
    """The base VM with a filled memcheck region, frozen into a live image."""
    seed = 4242
    filled = cli.ask("base", f"memcheck-fill 48 {seed}")
    assert filled["ok"], filled
    deadline = time.monotonic() + 30
    while (st := status(base_vm["endpoint"]))["counter"] < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    info = cli.json("live-image", "create", "base", "base-img")
    return BaseImage("base-img", info, st["counter"], float(st["uptime"]), seed, time.time())


@pytest.fixture
def peer_host(cli: Cli, tmp_path: Path) -> Iterator[Cli]:
    """A second host (its own data dir and agent) whose store is this host's agent."""
    cli.json("list")  # this host's agent runs
    port = json.loads((cli.home / "agent.json").read_text())["port"]
    token = (cli.home / "agent.token").read_text().strip()
    other = Cli(tmp_path / "host-b", {"VMSTREAM_STORE": f"peer:http://127.0.0.1:{port}/v1/store",
                                      "VMSTREAM_PEER_TOKEN": token})
    try:
        yield other
    finally:
        other.run("agent", "stop", "--destroy-vms")
        assert not our_qemu_pids(other.home) and not fuse_mounts(other.home)


def wait_hooks(cli: Cli, name: str, timeout: float = 120) -> dict[str, Any]:
    """The clone hooks' results once they ran."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vm = cli.json("show", name)
        if vm["hooks"]:
            hooks: dict[str, Any] = vm["hooks"]
            return hooks
        time.sleep(0.5)
    raise AssertionError(f"the clone hooks of {name} did not finish in {timeout}s")


def wait_pool(cli: Cli, image: str, timeout: float = 60) -> list[int]:
    """The pids of the agent's pooled QEMUs, once it has one ready for image."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool = cli.json("host", "--json")["clone_pool"]
        if pool["ready"].get(image):
            return list(pool["pids"][image])
        time.sleep(0.2)
    raise AssertionError(f"no pooled QEMU for {image} after {timeout}s")


CLOCK_TOLERANCE_S = 0.05  # a clone's wall clock against the host's: a correctness bound, not a speed


def clone_clock(cli: Cli, name: str, qga: bool = False, timeout: float = 120) -> dict[str, Any]:
    """A clone's clock against the host's (vmstream guest clock), once the agent has set it."""
    deadline = time.monotonic() + timeout
    while not cli.json("show", name)["clock"]:
        assert time.monotonic() < deadline, f"the clock of {name} was not set in {timeout}s"
        time.sleep(0.2)
    reading: dict[str, Any] = cli.json("guest", "clock", name, *(["--qga"] if qga else []))
    return reading


def assert_clock_is_the_hosts(cli: Cli, name: str, qga: bool = False) -> None:
    r = clone_clock(cli, name, qga)
    assert abs(r["offset_s"]) < CLOCK_TOLERANCE_S, f"{name}'s clock is {r['offset_s'] * 1000:+.1f} ms off the host's: {r}"
    assert r["error_s"] < CLOCK_TOLERANCE_S, f"{name}'s clock could not be read to within 50 ms: {r}"
