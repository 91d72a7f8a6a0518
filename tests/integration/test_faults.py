"""Real faults: the agent or memfs killed (SIGKILL) in the middle of their work, disks full.

After each, the next command starts a new agent, which takes over what still runs: the
VMs that ran keep running with their memory intact (memcheck), nothing half-made is
left (no half image, no half-started clone, no QEMU without a row, no staging dir), and
the work can be done again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.hosts import Cli, fuse_mounts, our_qemu_pids, status
from tests.integration.conftest import BaseImage, VmFactory, vm_qemu_pids
from vmstream.bench.delay import DelayProxy
from vmstream.memfs.mount import control_request


def _kill_agent_when(cli: Cli, line: str, after_s: float, request: dict[str, Any]) -> dict[str, Any]:
    """Send request to the agent in a thread; SIGKILL the agent after_s after its log shows
    line. What the request got (an error: the agent died under it)."""
    url, headers, pid = cli.agent()
    log = cli.home / "agent.log"
    start = log.stat().st_size
    got: dict[str, Any] = {}

    def send() -> None:
        try:
            got["response"] = httpx.request(request["method"], url + request["path"], json=request.get("json"),
                                            headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            got["error"] = exc

    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 60
    while line not in log.read_text(errors="replace")[start:]:
        assert time.monotonic() < deadline, f"the agent never logged {line!r}"
        time.sleep(0.005)
    time.sleep(after_s)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    return got


def _no_leftovers(cli: Cli) -> None:
    listed = {v["name"]: v for v in cli.json("list")}  # starts the next agent
    assert all(v["state"] in ("running", "paused") for v in listed.values()), listed
    assert len(vm_qemu_pids(cli)) == len(listed), (vm_qemu_pids(cli), sorted(listed))
    images = cli.home / "images"
    assert not [p.name for p in images.iterdir() if p.name.startswith((".staging-", ".fetching-"))]


def test_agent_killed_mid_capture(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    """A booted VM's capture (its whole memory saved and stored: about a second) cut short."""
    src: dict[str, Any] = cli.json("boot", "capkill", "--memory", "256M")
    vms.names.append("capkill")
    assert cli.ask("capkill", "memcheck-fill 48 777")["ok"]
    got = _kill_agent_when(cli, "live-image create vm=capkill image=capkill-img: started", 0.25,
                           {"method": "POST", "path": "/v1/live-images", "json": {"vm": "capkill", "name": "capkill-img"}})
    assert "error" in got, f"the capture was not cut short: {got}"
    _no_leftovers(cli)
    after = cli.json("show", "capkill")
    assert after["state"] == "running", "the capture's pause outlived the agent that made it"
    assert status(src["endpoint"])["hostname"] == "capkill"
    assert cli.ask("capkill", "memcheck-verify")["result"]["bad_pages"] == 0
    images = {i["name"] for i in cli.json("live-image", "list")}
    if "capkill-img" not in images:  # the capture did not commit: it can be made again, whole
        cli.json("live-image", "create", "capkill", "capkill-img")
    [clone] = vms.clones("capkill-img", 1, "capkill-c")
    assert cli.ask(clone["name"], "memcheck-verify")["result"]["bad_pages"] == 0
    vms.destroy_all()
    cli.json("live-image", "delete", "capkill-img")


def test_agent_killed_mid_clone_burst(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    [keeper] = vms.clones(base_image.name, 1, "burstkeep")  # ran before: must run after
    got = _kill_agent_when(cli, "start 4 clone(s) vm=burstkill-1", 0.1,
                           {"method": "POST", "path": f"/v1/live-images/{base_image.name}/start",
                            "json": {"count": 4, "name": "burstkill"}})
    assert "error" in got or got["response"].status_code >= 500 or got["response"].status_code == 200, got
    _no_leftovers(cli)
    listed = {v["name"] for v in cli.json("list")}
    assert keeper["name"] in listed
    assert cli.ask(keeper["name"], "memcheck-verify")["result"]["bad_pages"] == 0
    survivors = sorted(n for n in listed if n.startswith("burstkill-"))
    vms.names += survivors  # destroyed at teardown
    for name in survivors:  # what finished before the kill runs as a clone should
        assert cli.ask(name, "memcheck-verify")["result"]["bad_pages"] == 0
    # and the burst can be asked for again, under names not taken
    again = vms.clones(base_image.name, 4, "burstagain")
    assert len(again) == 4


def test_a_full_store_during_a_capture(tmp_path: Path) -> None:
    """The store's file system fills up while a capture writes the image's memory: the capture
    fails naming the cause, the VM runs on with its memory, nothing of the image is left
    (no half image, no ref, no temporary file), and with room again the capture succeeds."""
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "vmstream-test-full", str(store)], check=True)
    cli = Cli(tmp_path / "home", {"VMSTREAM_STORE": str(store)})
    try:
        cli.json("boot", "full", "--memory", "256M")
        assert cli.ask("full", "memcheck-fill 48 4711")["ok"]  # 48 MiB of random pages: they do not compress
        proc = cli.run("live-image", "create", "full", "full-img")
        assert proc.returncode != 0
        assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert cli.json("show", "full")["state"] == "running"
        assert cli.ask("full", "memcheck-verify")["result"]["bad_pages"] == 0
        assert cli.json("live-image", "list") == []
        assert not list((tmp_path / "home" / "images").iterdir())
        assert not [p for p in store.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or "images/full-img" in str(p))]
        subprocess.run(["mount", "-o", "remount,size=512m", str(store)], check=True)
        cli.json("live-image", "create", "full", "full-img")
        [clone] = cli.json("live-image", "start", "full-img")["vms"]
        assert cli.ask(clone["name"], "memcheck-verify")["result"]["bad_pages"] == 0
    finally:
        cli.run("agent", "stop", "--destroy-vms")
        subprocess.run(["umount", str(store)], check=False)
        assert not our_qemu_pids(tmp_path / "home")


def _incoming_running(peer: Cli, name: str, timeout: float = 120) -> None:
    url, headers, _ = peer.agent()
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/v1/migrations/incoming/{name}", headers=headers, timeout=10)
        if r.status_code == 200 and r.json()["running"]:
            return
        assert time.monotonic() < deadline, f"the move of {name} never reached its end on the peer: {r.text}"
        time.sleep(0.2)


def test_agent_killed_mid_migration_leaves_the_vm_running_on_one_host(
    cli: Cli, base_image: BaseImage, peer_host: Cli, vms: VmFactory,
) -> None:
    """The source agent SIGKILLed while a live move runs (throttled to take seconds); its QEMU goes
    on sending without it. Restarted before the move ends: the move is undone (the peer's half
    removed) and the VM runs at home. Killed again and restarted after the move reached its end:
    the VM runs on the peer only. Either way its memory is intact and no QEMU is left over."""
    peer_host.json("list")
    cli.json("peer", "add", "b", "--home", str(peer_host.home))
    src: dict[str, Any] = cli.json("boot", "migkill", "--memory", "256M")
    vms.names.append("migkill")
    assert cli.ask("migkill", "memcheck-fill 64 4242")["ok"]
    move = {"method": "POST", "path": "/v1/vms/migkill/migrate", "json": {"to": "b", "mode": "live", "max_bandwidth_mbps": 40}}

    _kill_agent_when(cli, "migrate to b vm=migkill: started", 0.5, move)
    _no_leftovers(cli)  # the next agent: the move was under way, so it is undone
    assert cli.json("show", "migkill")["state"] == "running"
    assert "migkill" not in {v["name"] for v in peer_host.json("list")}
    assert not our_qemu_pids(peer_host.home), "the peer's half of the move is removed"
    assert status(src["endpoint"])["hostname"] == "migkill"
    assert cli.ask("migkill", "memcheck-verify")["result"]["bad_pages"] == 0

    _kill_agent_when(cli, "migrate to b vm=migkill: started", 0.5, move)
    _incoming_running(peer_host, "migkill")  # the source QEMU sent it all, the peer's QEMU runs it
    _no_leftovers(cli)  # the next agent: the VM lives on the peer, this host's copy goes
    assert "migkill" not in {v["name"] for v in cli.json("list")}
    vms.names.remove("migkill")
    moved = peer_host.json("show", "migkill")
    assert moved["state"] == "running", moved
    assert peer_host.ask("migkill", "memcheck-verify")["result"]["bad_pages"] == 0
    assert peer_host.run("destroy", "migkill").returncode == 0


def test_a_full_chunk_cache_disk_while_a_clone_streams(cli: Cli, base_image: BaseImage, tmp_path: Path) -> None:
    """Host B streams the base image from host A into a chunk cache whose disk (a 12 MiB tmpfs) is
    far smaller than the image's 48 MiB of random pages, with the cache's bound left at 8G: the disk
    fills during the fill. The clone runs with its memory intact and the cache stays on its disk."""
    url, headers, _ = cli.agent()
    home = tmp_path / "host-b"
    cache = home / "cache"
    cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "vmstream-test-cache", str(cache)], check=True)
    b = Cli(home, {"VMSTREAM_STORE": f"peer:{url}/v1/store", "VMSTREAM_PEER_TOKEN": headers["Authorization"].split()[1]})
    try:
        [clone] = b.json("live-image", "start", base_image.name, "--name", "cachefull")["vms"]
        verify = b.ask(clone["name"], "memcheck-verify")
        assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify
        assert b.json("show", clone["name"])["state"] == "running"
        stats = b.json("host")["memfs"]["images"][base_image.name]
        assert stats["fetched_bytes"] > 12 << 20, f"it fetched more than the cache's disk holds: {stats}"
    finally:
        b.run("agent", "stop", "--destroy-vms")
        subprocess.run(["umount", "--lazy", str(cache)], check=False)
    assert not our_qemu_pids(home) and not fuse_mounts(home)


def _memfs_request(home: Path, cmd: str, **args: Any) -> dict[str, Any]:
    """Straight to a host's memfs control socket: what the test does to its caches, no agent needed."""
    return control_request(home / "memfs.sock", cmd, **args)


def test_memfs_and_the_agent_killed_under_faulting_clones(base_image: BaseImage, peer_host: Cli) -> None:
    """Three clones on a host that streams the image from another verify their memory over and
    over; before each of three SIGKILLs of the host's memfs daemon its caches are dropped, so
    the clones are faulting pages in from the store when it dies. Then the agent is killed too.
    memfs's supervisor keeps the mount and starts another daemon each time: every clone keeps
    running, no check finds a bad page, and the checks made through the restarts all answer."""
    image = base_image.name
    names = [c["name"] for c in peer_host.json("live-image", "start", image, "--count", "3", "--name", "mfkill")["vms"]]
    stop = threading.Event()
    checks: dict[str, list[dict[str, Any]]] = {n: [] for n in names}

    def verify(name: str) -> None:
        while not stop.is_set():
            proc = peer_host.run("guest", "ask", name, "memcheck-verify", "--timeout", "120", timeout=180)
            if proc.returncode == 0:  # not while the agent is down: the clone is checked again after
                checks[name].append(json.loads(proc.stdout))

    threads = [threading.Thread(target=verify, args=(n,)) for n in names]
    for t in threads:
        t.start()
    try:
        for kill in range(3):
            time.sleep(1.5)
            _memfs_request(peer_host.home, "drop-cache")
            _memfs_request(peer_host.home, "invalidate", image=image)  # the clones' pages come from the store again
            pid = int(_memfs_request(peer_host.home, "stats")["pid"])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError):
                    if int(_memfs_request(peer_host.home, "stats")["pid"]) != pid:
                        break
                assert time.monotonic() < deadline, f"memfs did not come back after kill {kill + 1}"
                time.sleep(0.05)
        time.sleep(1.5)
        _memfs_request(peer_host.home, "invalidate", image=image)
        os.kill(peer_host.agent()[2], signal.SIGKILL)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    listed = {v["name"]: v["state"] for v in peer_host.json("list")}  # the next agent adopts the clones
    assert listed == dict.fromkeys(names, "running"), listed
    for name in names:
        final = peer_host.ask(name, "memcheck-verify")
        assert final["ok"] and final["result"]["bad_pages"] == 0, final
        assert checks[name] and all(c["ok"] and c["result"]["bad_pages"] == 0 for c in checks[name]), checks[name]
    stats = peer_host.json("host")["memfs"]
    assert stats["restarts"] == 3 and stats["images"][image]["errors"] == 0, stats
    for name in names:
        assert peer_host.run("destroy", name).returncode == 0


def test_agent_killed_mid_gc(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    """The agent dies while its store GC deletes two deleted images' packs (condemned by the run
    before). Nothing the remaining images use is lost: the next GC finishes the work, and a
    clone of the image in use, started with the host's caches dropped, has its memory intact."""
    (clone,) = vms.clones(base_image.name, prefix="gckill")
    for n in (1, 2):
        cli.json("live-image", "create", clone["name"], f"gckill-img-{n}", "--flatten")
    vms.destroy_all()
    cli.json("host", "--gc", "--grace", "0")  # sweeps what earlier tests left: this run's work is the two images
    for n in (1, 2):
        cli.json("live-image", "delete", f"gckill-img-{n}")
    assert cli.json("host", "--gc", "--grace", "0")["condemned"] >= 2
    got = _kill_agent_when(cli, "store GC: started", 0.0, {"method": "POST", "path": "/v1/host/store/gc?grace=0"})
    assert "error" in got or got["response"].status_code == 200, got
    _no_leftovers(cli)
    again = cli.json("host", "--gc", "--grace", "0")  # the next agent's GC completes what the killed one began
    assert again["condemned"] == 0, again
    final = cli.json("host", "--gc", "--grace", "0")
    assert final["deleted"] == 0 and final["condemned"] == 0, f"a second run found work left: {final}"
    cli.run("host", "--drop-cache")
    (after,) = vms.clones(base_image.name, prefix="gckill-after")
    verify = cli.ask(after["name"], "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify


def test_a_slow_peer_store_then_the_peer_gone_mid_stream(cli: Cli, base_image: BaseImage, tmp_path: Path) -> None:
    """Host B streams from host A through a 50 ms link: a clone starts and its memory is whole.
    Then B's caches are dropped, so the clone's pages must come from A again, and the link dies:
    the next start on B fails with an error that names A and what was tried, leaves no half-made
    clone, and the agent stops clean."""
    url, headers, _ = cli.agent()
    proxy = DelayProxy(int(url.rsplit(":", 1)[1]), rtt_ms=50).__enter__()
    b = Cli(tmp_path / "host-b", {"VMSTREAM_STORE": f"peer:{proxy.url}/v1/store?bulk=off",
                                  "VMSTREAM_PEER_TOKEN": headers["Authorization"].split()[1]})
    try:
        [clone] = b.json("live-image", "start", base_image.name, "--name", "slowpeer")["vms"]
        verify = b.ask(clone["name"], "memcheck-verify")
        assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify
        assert b.json("host")["memfs"]["images"][base_image.name]["fetched_bytes"] > 0
        _memfs_request(b.home, "drop-cache")
        _memfs_request(b.home, "invalidate", image=base_image.name)
        proxy.__exit__(None, None, None)  # host A is gone
        proc = b.run("live-image", "start", base_image.name, "--name", "orphan")
        assert proc.returncode != 0, proc.stdout
        message = " ".join(proc.stderr.split())
        assert proxy.url.split("//")[1] in message and "gave up" in message, message
        assert "Traceback" not in proc.stderr
        listed = b.json("list")
        assert not [v for v in listed if v["name"].startswith("orphan")], listed
        assert len(vm_qemu_pids(b)) == sum(1 for v in listed if v["state"] == "running")
    finally:
        with contextlib.suppress(Exception):
            proxy.__exit__(None, None, None)
        b.run("agent", "stop", "--destroy-vms")
    assert not our_qemu_pids(b.home) and not fuse_mounts(b.home)
