"""`vmstream migrate VM --to HOST` between two real agents on loopback.

Host B is a second agent with its own data dir, streaming images from host
A's store, so a clone of A's image can move to B by delta (only its private
pages) and come back by a full live migration.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any

from tests.hosts import Cli, our_qemu_pids, status
from tests.integration.conftest import BaseImage, VmFactory, vm_qemu_pids


def _peers(a: Cli, b: Cli) -> None:
    b.json("list")  # starts B's agent
    a.json("peer", "add", "b", "--home", str(b.home))
    b.json("peer", "add", "a", "--home", str(a.home))


def _names(cli: Cli) -> set[str]:
    return {v["name"] for v in cli.json("list")}


def _memcheck_ok(cli: Cli, vm: str) -> None:
    verify = cli.ask(vm, "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify


def test_peer_add_checks_the_peer(cli: Cli, peer_host: Cli) -> None:
    peer_host.json("list")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once the socket is closed
    r = cli.run("peer", "add", "nowhere", f"http://127.0.0.1:{port}", "--token", "x")
    assert r.returncode == 7 and "cannot be reached" in r.stderr, r.stderr
    url = f"http://127.0.0.1:{json.loads((peer_host.home / 'agent.json').read_text())['port']}"
    r = cli.run("peer", "add", "wrong", url, "--token", "not-the-token")
    assert r.returncode == 2 and "token" in r.stderr, r.stderr
    assert not {"nowhere", "wrong"} & {p["name"] for p in cli.json("peer", "list")}


def test_clone_moves_by_delta_and_back_live(cli: Cli, base_image: BaseImage, peer_host: Cli, vms: VmFactory) -> None:
    _peers(cli, peer_host)
    (clone,) = vms.clones("base-img", prefix="mover")
    name = clone["name"]
    before = status(clone["endpoint"])

    there: dict[str, Any] = cli.json("migrate", name, "--to", "b")
    assert there["state"] == "completed" and there["mode"] == "delta", there
    res = there["result"]
    assert res["bytes_sent"] <= 2 * res["private_bytes"] + res["details"]["devstate_bytes"], res
    assert name not in _names(cli)
    moved = peer_host.json("show", name)
    assert moved["state"] == "running" and moved["parent_image"] == "base-img" and moved["migrated_from"]
    assert (moved["mac"], moved["vmgenid"], moved["hostname"]) == (clone["mac"], clone["vmgenid"], clone["hostname"])
    after = status(moved["endpoint"])
    assert after["hostname"] == before["hostname"] and after["uptime"] >= before["uptime"], "the same guest, not rebooted"
    _memcheck_ok(peer_host, name)

    back: dict[str, Any] = peer_host.json("migrate", name, "--to", "a", "--mode", "live")
    assert back["state"] == "completed" and back["mode"] == "live", back
    assert name not in _names(peer_host) and name in _names(cli)
    home = cli.json("show", name)
    assert home["state"] == "running" and home["parent_image"] is None, "after a live move it needs no image"
    _memcheck_ok(cli, name)
    assert status(home["endpoint"])["uptime"] >= after["uptime"]
    assert not our_qemu_pids(peer_host.home), "nothing left on B"


def test_failed_migrations_leave_the_vm_on_the_source(cli: Cli, base_image: BaseImage, peer_host: Cli, vms: VmFactory) -> None:
    _peers(cli, peer_host)
    (clone,) = vms.clones("base-img", prefix="stay")
    name = clone["name"]

    r = cli.run("migrate", name, "--to", "nope")
    assert r.returncode == 3 and "no peer host named 'nope'" in r.stderr, r.stderr

    # the name is taken on B: the destination refuses, nothing changes
    blocker = peer_host.json("live-image", "start", "base-img", "--name", "stay")["vms"][0]
    assert blocker["name"] == name
    r = cli.run("migrate", name, "--to", "b", "--json")
    failed = json.loads(r.stdout)
    assert r.returncode == 1 and failed["state"] == "failed" and "already exists" in failed["error"], failed
    peer_host.json("destroy", name)

    # B's QEMU dies while the VM streams over (live): the VM keeps serving on A
    r_pid: list[int] = []
    proc = cli.run("migrate", name, "--to", "b", "--mode", "live", "--max-bandwidth", "10", "--detach", "--json")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not r_pid:
        for v in peer_host.json("list"):  # B's agent started it for this test: its pid is ours to end
            if v["name"] == name and v["state"] == "incoming" and v["pid"]:
                r_pid.append(v["pid"])
        m = cli.json("migrate", name, "--status")
        if m["state"] not in ("preparing", "running"):
            break
    assert r_pid, f"the capped move ended before B showed an incoming VM: {m}"
    os.kill(r_pid[0], signal.SIGKILL)  # the destination QEMU this test's agent B started
    while (m := cli.json("migrate", name, "--status"))["state"] in ("preparing", "running"):
        time.sleep(0.2)
    assert m["state"] == "failed" and "destination" in m["error"], m
    assert cli.json("show", name)["state"] == "running"
    status(clone["endpoint"])
    _memcheck_ok(cli, name)
    deadline = time.monotonic() + 10
    while name in _names(peer_host) and time.monotonic() < deadline:
        time.sleep(0.2)
    # (B keeps a clone pool for base-img since it started 'stay' above)
    assert name not in _names(peer_host) and not vm_qemu_pids(peer_host), "B removed its half-started VM"

    # cancel: the VM stays
    cli.json("migrate", name, "--to", "b", "--mode", "live", "--max-bandwidth", "10", "--detach")
    cli.json("migrate", name, "--cancel")
    while (m := cli.json("migrate", name, "--status"))["state"] in ("preparing", "running"):
        time.sleep(0.2)
    assert m["state"] == "cancelled", m
    assert cli.json("show", name)["state"] == "running"
    _memcheck_ok(cli, name)
    assert name not in _names(peer_host)


def test_destroy_and_capture_are_refused_while_the_vm_migrates(
    cli: Cli, base_image: BaseImage, peer_host: Cli, vms: VmFactory
) -> None:
    _peers(cli, peer_host)
    (clone,) = vms.clones("base-img", prefix="busy")
    name = clone["name"]
    started = cli.json("migrate", name, "--to", "b", "--mode", "live", "--max-bandwidth", "10", "--detach")
    assert started["state"] in ("preparing", "running"), started
    assert cli.json("show", name)["state"] == "migrating"

    r = cli.run("destroy", name)
    assert r.returncode == 4 and "is migrating" in r.stderr and "--cancel" in r.stderr, r.stderr
    r = cli.run("live-image", "create", name, "busy-img")
    assert r.returncode == 4 and "is migrating" in r.stderr, r.stderr
    r = cli.run("migrate", name, "--to", "b")
    assert r.returncode == 4, r.stderr

    deadline = time.monotonic() + 240
    while (m := cli.json("migrate", name, "--status"))["state"] in ("preparing", "running"):
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert m["state"] == "completed", m
    assert name not in _names(cli) and peer_host.json("show", name)["state"] == "running"
    assert "busy-img" not in {i["name"] for i in cli.json("live-image", "list")}
    _memcheck_ok(peer_host, name)
    peer_host.json("destroy", name)
