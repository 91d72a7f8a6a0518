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

import httpx
import pytest

from tests.procs import pids_mentioning
from vmstream.openstack.deploy.cloud import DEMO_MARKER, Cloud, Credentials
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

    def osc_run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The `openstack` CLI with the deployment's openrc (vmstream's plugin on PYTHONPATH)."""
        env = {**os.environ, **self.creds.env(), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(self.state / "osc")}
        return subprocess.run(["openstack", *args], capture_output=True, text=True, env=env, timeout=timeout)

    def osc(self, *args: str, timeout: float = 120) -> Any:
        """The `openstack` CLI's JSON output; it must succeed."""
        proc = self.osc_run(*args, "-f", "json", timeout=timeout)
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


MIGRATION_MBPS = "10"  # a capped QEMU live move of a 256 MiB guest with 64 MiB filled takes seconds: time to act


@pytest.fixture(scope="session")
def vmstream_openstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenStack]:
    """Two computes with vmstream's driver, each with its own agent; live moves capped at
    MIGRATION_MBPS. For the whole session (its modules share it): the modules that use the
    FakeDriver deployment (test_deploy.py) sort before its first user, and ports are fixed,
    so only one deployment runs at a time."""
    with deployment(tmp_path_factory, "--vmstream", "--migration-max-bandwidth", MIGRATION_MBPS) as os_:
        yield os_


MARKER_IMAGE = DEMO_MARKER


def agent_call(openstack: OpenStack, host: str, method: str, path: str, **kw: Any) -> Any:
    """One request to a compute's vmstream agent, through its own API."""
    home = openstack.state / "agents" / host
    port = json.loads((home / "agent.json").read_text())["port"]
    token = (home / "agent.token").read_text().strip()
    r = httpx.request(method, f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"},
                      timeout=kw.pop("timeout", 60), **kw)
    assert r.status_code < 300, f"{method} {path} on {host}'s agent: {r.status_code} {r.text[:500]}"
    return r.json()


def agent_vms(openstack: OpenStack, host: str) -> dict[str, dict[str, Any]]:
    """The VMs of a compute's agent, by name."""
    return {vm["name"]: vm for vm in agent_call(openstack, host, "GET", "/v1/vms")}


def demo_image(cloud: Cloud) -> str:
    """The Glance image that stands for vmstream's demo guest (`up --vmstream` makes it)."""
    return cloud.ensure_demo_image()
