"""vmstream's Nova driver in Nova's own functional-test harness, in process, on two real agents.

The other way of issue #16 (5a) besides the real deployment of test_nova_driver.py: Nova's API,
conductor, scheduler and two computes run in one Debian python3 process
(tests/openstack/functional/nova_harness.py) with Placement, Glance and Neutron fixtures, so
there is no MariaDB, RabbitMQ, Keystone or fixed port, and nothing to stand up for a minute
first. The guests are real: each compute's driver drives its own vmstream agent, started here
in a data dir of its own; as in the deployment, the second agent streams from the first one's
store (clones of a live image made on one host start on either) and each knows the other as a
peer named after its compute (the driver's live migration moves a VM to the peer named `dest`).

The harness must run in a process of its own (nova.tests.functional monkey-patches eventlet on
import) under /usr/bin/python3 with python3-nova, whose functional tests need python3-oslotest
and python3-wsgi-intercept; they are installed here when missing (as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hosts import Cli, fuse_mounts, our_qemu_pids
from tests.openstack.conftest import processes_mentioning
from tests.procs import pids_mentioning
from vmstream.agentapi import ApiClient
from vmstream.openstack.deploy.errors import DeployError
from vmstream.openstack.deploy.packages import install, missing_packages, stderr_progress
from vmstream.openstack.nova.shim import install_shim
from vmstream.openstack.nova.translate import VM_PREFIX

pytestmark = pytest.mark.openstack

DEBIAN_PYTHON = "/usr/bin/python3"
HARNESS = Path(__file__).parent / "functional" / "nova_harness.py"
# Nova and its functional tests' own needs (oslotest, wsgi-intercept), api-paste.ini (nova-common),
# the Placement fixture (python3-placement), the driver's HTTP client (python3-httpx).
PACKAGES = ("python3-nova", "nova-common", "python3-placement", "python3-oslotest", "python3-wsgi-intercept", "python3-httpx")
HOSTS = ("compute1", "compute2")
HARNESS_TIMEOUT_S = 900  # the cases take 1-2.5 min on 2 busy cores; this only bounds a hang
# Every case must pass: the harness skips the live-image and live-migration cases when the driver
# says it cannot do them (NotImplementedError), and this driver can, so a skip is a regression.
CASES = ("test_servers_are_vms_of_their_hosts_agents",
         "test_an_image_the_driver_cannot_boot_fails_its_server_and_leaves_no_vm",
         "test_a_snapshot_is_a_live_image_whose_servers_are_clones",
         "test_live_migration_moves_the_vm_to_the_other_hosts_agent")


@dataclass
class Agents:
    """The real agents of the two computes, each in its own data dir."""

    root: Path
    clis: dict[str, Cli]

    def url(self, host: str) -> str:
        return f"http://127.0.0.1:{json.loads((self.clis[host].home / 'agent.json').read_text())['port']}"

    def token_file(self, host: str) -> Path:
        return self.clis[host].home / "agent.token"

    def for_nova(self) -> dict[str, dict[str, str]]:
        """The harness's VMSTREAM_NOVA_AGENTS: each compute's agent."""
        return {h: {"url": self.url(h), "token_file": str(self.token_file(h))} for h in self.clis}

    def nova_vms(self, host: str) -> list[str]:
        with ApiClient(self.url(host), self.token_file(host).read_text().strip(), f"the agent of {host}") as api:
            return [vm["name"] for vm in api.call("GET", "/v1/vms") if vm["name"].startswith(VM_PREFIX)]


def _ensure_packages() -> None:
    missing = missing_packages(PACKAGES)
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"Nova's functional harness needs Debian's {' '.join(missing)}: installing them needs root")
    try:
        install(missing, Path("/var/log/vmstream-nova-functional-apt.log"), stderr_progress)
    except DeployError as exc:
        pytest.fail(str(exc))


def _ours_left(root: Path, timeout: float = 10.0) -> list[str]:
    """Processes still pointing into root (agents, QEMUs, memfs), after up to timeout for them to exit."""
    deadline = time.monotonic() + timeout
    while pids_mentioning(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    return processes_mentioning(root)


@pytest.fixture(scope="module")
def nova_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    """Two agents (compute1's store shared with compute2, peers of each other), their demo guests
    built; at the end stopped with their VMs, and nothing of theirs may be left."""
    _ensure_packages()
    root = tmp_path_factory.mktemp("nova-functional")
    clis = {"compute1": Cli(root / "compute1"),
            "compute2": Cli(root / "compute2", {"VMSTREAM_STORE": str(root / "compute1" / "store")})}
    try:
        with ThreadPoolExecutor(len(clis)) as pool:  # each starts its agent and builds its guest (not boot time)
            list(pool.map(lambda c: c.json("guest", "build", timeout=900), clis.values()))
        for host, cli in clis.items():
            other = next(h for h in clis if h != host)
            cli.json("peer", "add", other, "--home", str(clis[other].home))
        yield Agents(root, clis)
    finally:
        with ThreadPoolExecutor(len(clis)) as pool:
            list(pool.map(lambda c: c.run("agent", "stop", "--destroy-vms"), clis.values()))
        left = _ours_left(root)
        assert not left, f"processes left behind: {left}"
        assert not our_qemu_pids(root), f"QEMU processes left behind: {our_qemu_pids(root)}"
        assert not fuse_mounts(root), f"FUSE mounts left behind: {fuse_mounts(root)}"


def _harness_env(agents: Agents, shim: Path, results: Path, figures: Path) -> dict[str, str]:
    """Debian's python3 with the shim first on its path; none of the caller's venv, proxies or vmstream settings."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("VMSTREAM_", "OS_", "PYTHON")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
            and k != "VIRTUAL_ENV"}
    knobs = {k: v for k, v in os.environ.items() if k in ("VMSTREAM_NOVA_SERVERS", "VMSTREAM_NOVA_BOOT_TIMEOUT")}  # the harness's own
    return {**keep, **knobs, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(shim), "PYTHONDONTWRITEBYTECODE": "1",
            "VMSTREAM_NOVA_AGENTS": json.dumps(agents.for_nova()), "VMSTREAM_NOVA_RESULTS": str(results),
            "VMSTREAM_NOVA_FIGURES": str(figures), "OS_TEST_TIMEOUT": str(HARNESS_TIMEOUT_S)}


def test_nova_functional_harness_on_real_agents(nova_agents: Agents, tmp_path: Path) -> None:
    """Every harness case passes (none skipped); Nova loaded the driver through the shim; no Nova VM is left."""
    shim = install_shim(tmp_path / "python")
    results, figures, log = tmp_path / "results.json", tmp_path / "figures.jsonl", tmp_path / "harness.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run([DEBIAN_PYTHON, str(HARNESS)], env=_harness_env(nova_agents, shim, results, figures),
                              cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              timeout=HARNESS_TIMEOUT_S)
    took = time.monotonic() - t0
    output = log.read_text(errors="replace")
    assert results.is_file(), f"the harness wrote no results (exit {proc.returncode}):\n{output[-8000:]}"
    run: dict[str, Any] = json.loads(results.read_text())
    cases = {c["name"]: c for c in run["cases"]}
    broken = {n: c["detail"] for n, c in cases.items() if c["outcome"] not in ("ok", "skipped")}
    assert not broken and proc.returncode == 0, (
        f"harness exit {proc.returncode}; failed: {list(broken)}\n" + "\n\n".join(broken.values())
        + f"\n--- the end of its output (all of it: {log}) ---\n{output[-3000:]}")

    assert set(cases) == set(CASES), f"cases run: {sorted(cases)}"
    skipped = {n: c["detail"] for n, c in cases.items() if c["outcome"] != "ok"}
    assert not skipped, f"cases skipped: {skipped}"
    loaded = run.get("nova_virt_vmstream") or "nowhere"
    assert loaded.startswith(str(shim)), f"Nova loaded nova.virt.vmstream from {loaded}, not the shim in {shim}"
    assert {h: nova_agents.nova_vms(h) for h in HOSTS} == {h: [] for h in HOSTS}

    print(f"Nova functional harness: {took:.1f}s in all")
    for c in run["cases"]:
        print(f"  {c['name']}: {c['outcome']} in {c['seconds']}s" + (f" ({c['detail']})" if c["outcome"] == "skipped" else ""))
    if figures.is_file():
        print(figures.read_text().strip())
