"""Live images in the chunk store, streamed by memfs: integrity, peers, a store that is down."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.hosts import Cli
from tests.integration.conftest import BaseImage, VmFactory, vm_qemu_pids


def _chunk_map(home: Path, image: str) -> dict:
    return json.loads((home / "store" / "refs" / "images" / image / "memory").read_text())


def test_clone_maps_memfs_and_host_counts_streaming(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="stream")
    maps = Path(f"/proc/{clone['pid']}/maps").read_text()
    assert str(cli.home / "memfs" / "base-img") in maps, "the clone's RAM is the memfs file of its image"
    host = cli.json("host")
    assert host["memfs"]["running"]
    stats = host["memfs"]["images"]["base-img"]
    # the host cache was filled from the captured memory at create: reads hit it
    assert stats["cache_hits"] > 0
    assert stats["fetched_bytes"] <= stats["nonzero_bytes"]
    assert host["memfs"]["cache_bytes"] >= stats["nonzero_bytes"] // 2
    assert stats["errors"] == 0
    assert host["guest_ram_from_images_bytes"] > 0
    # the image's files are in the store, the manifest last: any host can find it
    assert (cli.home / "store" / "meta" / "images" / "base-img" / "manifest.json").is_file()


def _vmflags(pid: int, path_part: str) -> list[str]:
    """VmFlags of the first mapping in /proc/PID/smaps whose line contains path_part."""
    found = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if not found and path_part in line and "-" in line.split()[0]:
            found = True
        elif found and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping of {path_part} in /proc/{pid}/smaps")


def test_clone_memory_is_faulted_in_page_by_page(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    """No huge-page hint on the clone's RAM (which makes the kernel read 4 MiB around
    each fault) and no kernel read-ahead on memfs: a clone pulls the chunks it touches."""
    (clone,) = vms.clones("base-img", prefix="pages")
    flags = _vmflags(clone["pid"], str(cli.home / "memfs" / "base-img"))
    assert "hg" not in flags and "nh" in flags, flags
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    (dev,) = [ln.split()[2] for ln in mountinfo if ln.split()[4] == str(cli.home / "memfs")]
    assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "0"


def test_corrupted_chunk_is_detected(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="tamper")
    cli.json("live-image", "create", clone["name"], "tamper-img", "--flatten")
    vms.destroy_all()
    base_packs = {c["pack"] for c in _chunk_map(cli.home, "base-img")["chunks"] if c}
    own = [c for c in _chunk_map(cli.home, "tamper-img")["chunks"] if c and c["pack"] not in base_packs]
    assert own, "the flattened image has chunks of its own"
    for c in own:  # damage every chunk only this image has
        pack = cli.home / "store" / "packs" / c["pack"]
        with open(pack, "r+b") as f:
            f.seek(c["offset"] + c["length"] // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    cli.json("host", "--drop-cache")  # the create left verified copies in the host cache
    before = vm_qemu_pids(cli)
    proc = cli.run("live-image", "start", "tamper-img", "--name", "tampered")
    assert proc.returncode == 6, (proc.stdout, proc.stderr)
    message = " ".join(proc.stderr.split())
    assert "reading the image memory failed" in message and "the stored copy is damaged" in message, message
    assert any(c["id"] in message for c in own), "the error names the damaged chunk"
    assert "tampered-1" not in {v["name"] for v in cli.json("list")}
    assert vm_qemu_pids(cli) == before, "the failed clone's QEMU was removed"
    cli.json("live-image", "delete", "tamper-img")


def test_peer_host_streams_an_image(cli: Cli, base_image: BaseImage, peer_host: Cli) -> None:
    assert "base-img" in {i["name"] for i in peer_host.json("live-image", "list")}
    (clone,) = peer_host.json("live-image", "start", "base-img", "--name", "far")["vms"]
    verify = peer_host.ask(clone["name"], "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify
    stats = peer_host.json("host")["memfs"]["images"]["base-img"]
    assert stats["fetched_bytes"] > 0, "host B fetched chunks from host A over HTTP"
    peer_host.json("destroy", clone["name"])


def test_store_down_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = Cli(tmp_path / "host-c", {"VMSTREAM_STORE": f"peer:http://127.0.0.1:{port}"})
    try:
        proc = down.run("live-image", "list")
        assert proc.returncode != 0
        message = " ".join(proc.stderr.split())
        assert "gave up after" in message and f"127.0.0.1:{port}" in message, message
        assert "Traceback" not in proc.stderr
    finally:
        down.run("agent", "stop", "--destroy-vms")


def test_store_gc_removes_a_deleted_images_packs_only(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="gc")
    cli.json("live-image", "create", clone["name"], "gc-img", "--flatten")
    vms.destroy_all()
    first = cli.json("host", "--gc", "--grace", "0")  # sweeps leftovers of earlier tests; gc-img is in use
    assert first["roots"] >= 2 and first["live_packs"] >= 1
    cli.json("live-image", "delete", "gc-img")
    condemned = cli.json("host", "--gc", "--grace", "0")
    assert condemned["condemned"] >= 1, "gc-img's own packs are condemned first"
    deleted = cli.json("host", "--gc", "--grace", "0")
    assert deleted["deleted"] >= condemned["condemned"] and deleted["deleted_bytes"] > 0
    # what the remaining image uses is still there: a clone runs on intact memory
    cli.run("host", "--drop-cache")
    (after,) = vms.clones("base-img", prefix="gc-after")
    verify = cli.ask(after["name"], "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify
