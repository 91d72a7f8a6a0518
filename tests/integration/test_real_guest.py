"""A real Linux guest: Debian with systemd on a disk, booted, frozen and cloned.

The image is built with debootstrap (`vmstream guest rootfs`); the vmstream
agent is in it through its one-command installer, and qemu-guest-agent from
Debian, which the tests use to read and write files in the guests.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.hosts import Cli, status
from tests.integration.conftest import assert_clock_is_the_hosts, wait_hooks, wait_pool


def qga(cli: Cli, vm: str, execute: str, **arguments: Any) -> Any:
    args = ["guest", "qga", vm, execute, "--timeout", "60"]
    if arguments:
        args += ["--arguments", json.dumps(arguments)]
    proc = cli.run(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["return"]


def write_file(cli: Cli, vm: str, path: str, text: str) -> None:
    handle = qga(cli, vm, "guest-file-open", path=path, mode="w")
    qga(cli, vm, "guest-file-write", handle=handle, **{"buf-b64": base64.b64encode(text.encode()).decode()})
    qga(cli, vm, "guest-file-close", handle=handle)
    qga(cli, vm, "guest-exec", path="/bin/sync")
    time.sleep(1.0)  # guest-exec returns at once; give sync its moment


def guest_has_file(cli: Cli, vm: str, path: str) -> bool:
    """Whether qemu-guest-agent can open the guest's file."""
    r = cli.run("guest", "qga", vm, "guest-file-open", "--timeout", "60", "--arguments", json.dumps({"path": path, "mode": "r"}))
    if r.returncode != 0:
        assert "No such file" in r.stderr, r.stderr
        return False
    qga(cli, vm, "guest-file-close", handle=json.loads(r.stdout)["return"])
    return True


def read_file(cli: Cli, vm: str, path: str) -> str:
    handle = qga(cli, vm, "guest-file-open", path=path, mode="r")
    data = qga(cli, vm, "guest-file-read", handle=handle, count=4096)
    qga(cli, vm, "guest-file-close", handle=handle)
    return base64.b64decode(data["buf-b64"]).decode()


@pytest.fixture(scope="module")
def debian(cli: Cli) -> Iterator[dict[str, Any]]:
    """A booted Debian disk guest (the image is built on first use)."""
    vm = cli.json("boot", "deb", "--disk", "debian", "--memory", "512M", timeout=900)
    try:
        yield vm
    finally:
        cli.run("destroy", "deb")


def test_debian_guest_boots_with_both_agents(cli: Cli, debian: dict[str, Any]) -> None:
    assert debian["state"] == "running" and debian["disk"]
    assert status(debian["endpoint"])["hostname"] == "deb", "systemd took the VM's name"
    assert cli.ask("deb", "ping")["ok"], "the vmstream agent the installer put in the image answers"
    assert qga(cli, "deb", "guest-info")["version"], "qemu-guest-agent answers"
    # a clone's new MAC is announced, or slirp keeps sending to the image's (bursts of clones waited seconds)
    assert read_file(cli, "deb", "/proc/sys/net/ipv4/conf/all/arp_notify").strip() == "1", "the agent turned on arp_notify"


def exit_code(cli: Cli, vm: str, *argv: str) -> int:
    """A command's exit code in the guest, through qemu-guest-agent."""
    pid = qga(cli, vm, "guest-exec", path=argv[0], arg=list(argv[1:]))["pid"]
    for _ in range(300):
        st = qga(cli, vm, "guest-exec-status", pid=pid)
        if st["exited"]:
            return int(st["exitcode"])
        time.sleep(0.1)
    raise AssertionError(f"{argv} did not finish in the guest {vm}")


def test_a_guest_cannot_reach_the_agents_api(cli: Cli, debian: dict[str, Any]) -> None:
    """slirp's gateway is the host's loopback, where the agent listens: a guest's connection to
    it (or anywhere out of the VM) goes nowhere, while the host still reaches the guest."""
    port = json.loads((cli.home / "agent.json").read_text())["port"]
    probe = f"exec 3<>/dev/tcp/10.0.2.2/{port}"
    assert exit_code(cli, "deb", "/usr/bin/timeout", "5", "/bin/bash", "-c", "exec 3<>/dev/null") == 0, "the probe itself works"
    assert exit_code(cli, "deb", "/usr/bin/timeout", "5", "/bin/bash", "-c", probe) != 0, "the guest reached the agent's port"
    assert status(debian["endpoint"])["hostname"] == "deb"


def test_debian_image_clones_share_its_disk_and_keep_their_own_writes(cli: Cli, debian: dict[str, Any]) -> None:
    write_file(cli, "deb", "/root/marker", "before-capture")
    image = cli.json("live-image", "create", "deb", "deb-img")
    assert image["pause_ms"] < 1000
    write_file(cli, "deb", "/root/marker", "source-after-capture")  # goes to the VM's new overlay only
    clones = cli.json("live-image", "start", "deb-img", "--count", "2", "--name", "debc", timeout=600)["vms"]
    try:
        a, b = (c["name"] for c in clones)
        assert all("identity_in_guest" in c["phases"] for c in clones), "the native agent applied the identities"
        for c in clones:  # the NIC (renamed by udev in Debian) took the clone's own MAC
            assert cli.ask(c["name"], "status")["mac"] == c["mac"], c["name"]
        assert {qga(cli, a, "guest-get-host-name")["host-name"], qga(cli, b, "guest-get-host-name")["host-name"]} == {a, b}
        assert read_file(cli, a, "/root/marker") == "before-capture", "the disk as it was in the capture pause"
        write_file(cli, a, "/root/marker", "written-by-a")
        assert read_file(cli, a, "/root/marker") == "written-by-a"
        assert read_file(cli, b, "/root/marker") == "before-capture", "a clone's writes stay its own"
        assert read_file(cli, "deb", "/root/marker") == "source-after-capture"
        guest_ns = qga(cli, b, "guest-get-time")
        assert abs(guest_ns / 1e9 - time.time()) < 2.0, "a clone does not live in the past"
        r = cli.run("migrate", a, "--to", "nowhere")
        assert r.returncode != 0 and ("disk guest" in r.stderr or "no peer" in r.stderr), r.stderr

        wait_pool(cli, "deb-img")  # a pooled disk clone: its own overlay, made ahead
        (pooled,) = cli.json("live-image", "start", "deb-img", "--name", "debp", timeout=600)["vms"]
        clones.append(pooled)
        assert "pool_taken" in pooled["phases"] and pooled["disk"] not in {c["disk"] for c in clones[:2]}, pooled
        assert read_file(cli, pooled["name"], "/root/marker") == "before-capture"
        assert cli.ask(pooled["name"], "status")["mac"] == pooled["mac"]
    finally:
        for c in clones:
            cli.run("destroy", c["name"])
        cli.run("live-image", "delete", "deb-img")



SSH_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"


@dataclass
class DebianClones:
    image_id: str  # the image's /etc/machine-id
    image_key: str | None  # its SSH host key, where openssh-server is installed
    vms: list[dict[str, Any]]  # two started together, one from the clone pool


@pytest.fixture(scope="module")
def debian_clones(cli: Cli, debian: dict[str, Any]) -> Iterator[DebianClones]:
    """Clones of a Debian live image, once their clone hooks have run."""
    image_id = read_file(cli, "deb", "/etc/machine-id").strip()
    image_key = read_file(cli, "deb", SSH_KEY) if guest_has_file(cli, "deb", SSH_KEY) else None
    cli.json("live-image", "create", "deb", "deb-id-img")
    vms: list[dict[str, Any]] = []
    try:
        vms += cli.json("live-image", "start", "deb-id-img", "--count", "2", "--name", "debid", timeout=600)["vms"]
        wait_pool(cli, "deb-id-img")
        vms += cli.json("live-image", "start", "deb-id-img", "--name", "debidp", timeout=600)["vms"]
        for vm in vms:
            hooks = wait_hooks(cli, vm["name"], timeout=900)  # under TCG an RSA key alone takes tens of seconds
            by_name = {h["hook"]: h for h in hooks["hooks"]}
            assert set(by_name) >= {"10-machine-id", "20-ssh-host-keys"}, hooks
            assert all(h["rc"] == 0 for h in by_name.values()), hooks
        yield DebianClones(image_id, image_key, vms)
    finally:
        for vm in vms:
            cli.run("destroy", vm["name"])
        cli.run("live-image", "delete", "deb-id-img")


def test_debian_clones_get_their_own_machine_id(cli: Cli, debian_clones: DebianClones) -> None:
    ids = {}
    for vm in debian_clones.vms:
        ids[vm["name"]] = read_file(cli, vm["name"], "/etc/machine-id").strip()
        assert len(ids[vm["name"]]) == 32
        # journald restarted onto the new id: the clone logs under its own directory
        assert guest_has_file(cli, vm["name"], f"/var/log/journal/{ids[vm['name']]}/system.journal")
    assert len(set(ids.values())) == len(ids) and debian_clones.image_id not in ids.values(), (debian_clones.image_id, ids)
    assert read_file(cli, "deb", "/etc/machine-id").strip() == debian_clones.image_id, "the source VM keeps its id"


def test_debian_clones_clock_is_the_hosts(cli: Cli, debian_clones: DebianClones) -> None:
    for vm in debian_clones.vms:
        assert_clock_is_the_hosts(cli, vm["name"])  # as the vmstream agent reads it
        assert_clock_is_the_hosts(cli, vm["name"], qga=True)  # and qemu-guest-agent


def test_debian_clones_get_their_own_ssh_host_keys(cli: Cli, debian_clones: DebianClones) -> None:
    if debian_clones.image_key is None:
        pytest.skip(f"no {SSH_KEY} in the Debian test image (openssh-server is not installed)")
    keys = {vm["name"]: read_file(cli, vm["name"], SSH_KEY) for vm in debian_clones.vms}
    assert len(set(keys.values())) == len(keys) and debian_clones.image_key not in keys.values(), keys
    assert all(key.strip().endswith(f"root@{name}") for name, key in keys.items()), "made under the clone's name"
