"""A real one-machine OpenStack, brought up once for the module by `vmstream openstack up`
and torn down by `down`; teardown checks that none of its processes or listeners is left."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.procs import pids_mentioning
from vmstream.openstack.deploy.cloud import Cloud, Credentials
from vmstream.openstack.deploy.layout import AGENT_PORT_BASE, PORTS
from vmstream.openstack.deploy.processes import is_running, listeners

UP_TIMEOUT_S = 3600  # a fresh machine installs ~350 packages first


def vmstream(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmstream", *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class OpenStack:
    state: Path
    creds: Credentials
    up: dict[str, Any]

    def osc(self, *args: str, timeout: float = 120) -> Any:
        """The `openstack` CLI with the deployment's openrc; its JSON output."""
        env = {**os.environ, **self.creds.env(), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        proc = subprocess.run(["openstack", *args, "-f", "json"], capture_output=True, text=True, env=env, timeout=timeout)
        assert proc.returncode == 0, f"openstack {' '.join(args)} failed: {proc.stderr[-2000:]}"
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def cloud(self) -> Cloud:
        return Cloud(self.creds)


def recorded_pids(state: Path) -> list[tuple[str, int, int]]:
    return [(r["name"], r["pid"], r["start_ticks"]) for r in
            (json.loads(p.read_text()) for p in (state / "pids").glob("*.json"))]


def processes_mentioning(state: Path) -> list[str]:
    found = []
    for pid in pids_mentioning(state):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{pid}: {shown}")
    return found


def assert_nothing_left(state: Path, pids: list[tuple[str, int, int]]) -> None:
    alive = [name for name, pid, ticks in pids if is_running(pid, ticks)]
    assert not alive, f"services left running: {alive}"
    assert not processes_mentioning(state), f"processes left: {processes_mentioning(state)}"
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if str(state) in line]
    assert not mounts, f"mounts left (an agent's memfs): {mounts}"
    ports = {**PORTS, "agent-compute1": AGENT_PORT_BASE + 1, "agent-compute2": AGENT_PORT_BASE + 2}
    busy = {service: listeners(port) for service, port in ports.items() if listeners(port)}
    assert not busy, f"listeners left: {busy}"


@contextlib.contextmanager
def deployment(tmp_path_factory: pytest.TempPathFactory, *up_args: str) -> Iterator[OpenStack]:
    """`vmstream openstack up --dir TMP --computes 2 UP_ARGS`, then `down`, asserting nothing is left."""
    if os.geteuid() != 0:
        pytest.skip("the OpenStack deployment installs packages and runs services as root")
    state = tmp_path_factory.mktemp("openstack")
    pids: list[tuple[str, int, int]] = []
    try:
        proc = vmstream("openstack", "up", "--dir", str(state), "--computes", "2", *up_args, "--json", timeout=UP_TIMEOUT_S)
        pids = recorded_pids(state)
        assert proc.returncode == 0, f"vmstream openstack up failed:\n{proc.stderr[-4000:]}"
        up = json.loads(proc.stdout)
        print(f"openstack up: {up['timings']}", file=sys.stderr)
        yield OpenStack(state, Credentials.load(state / "cloud.json"), up)
    finally:
        pids = pids or recorded_pids(state)
        down = vmstream("openstack", "down", "--dir", str(state), "--json", timeout=300)
        assert down.returncode == 0, f"vmstream openstack down failed:\n{down.stderr[-4000:]}"
        print(f"openstack down: {down.stdout}", file=sys.stderr)
        assert_nothing_left(state, pids)


@pytest.fixture(scope="module")
def openstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenStack]:
    """Two FakeDriver computes."""
    with deployment(tmp_path_factory) as os_:
        yield os_


@pytest.fixture(scope="module")
def vmstream_openstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenStack]:
    """Two computes with vmstream's driver, each with its own agent."""
    with deployment(tmp_path_factory, "--vmstream") as os_:
        yield os_
