"""Boot, capture, clone, destroy and re-attach, with real QEMU guests."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.hosts import Cli, our_qemu_pids, status
from tests.integration.conftest import BaseImage, VmFactory, wait_hooks, wait_pool
from vmstream.host.footprint import cpu_seconds


def test_info_names_accelerator_and_reason(cli: Cli) -> None:
    info = cli.json("info")
    assert info["accelerator"] in ("kvm", "tcg")
    assert info["accelerator_reason"]


def test_boot_serves_http_with_its_hostname(cli: Cli, base_vm: dict) -> None:
    st = status(base_vm["endpoint"])
    assert st["hostname"] == "base"
    later = status(base_vm["endpoint"])
    time.sleep(1.2)
    assert status(base_vm["endpoint"])["counter"] > later["counter"]
    shown = cli.json("show", "base")
    assert shown["state"] == "running"
    fp = shown["footprint"]
    assert fp["pss_bytes"] > 0 and fp["resident_bytes"] >= fp["private_bytes"]


def test_the_work_endpoint_serves_a_bounded_number_at_a_time(base_vm: dict) -> None:
    """The demo guest's /work (a workload whose cost is waiting): twelve requests at once all
    get their answer, at most four are in service at a time (the guest says how many were),
    and the rest waited their turn."""
    url = base_vm["endpoint"].rstrip("/") + "/work?ms=1000"
    answers: list[dict] = []

    def one() -> None:
        answers.append(httpx.get(url, timeout=60).raise_for_status().json())

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 12 and all(a["hostname"] == "base" and a["worked_ms"] == 1000 for a in answers), answers
    assert max(a["in_service"] for a in answers) == 4, answers
    assert sum(1 for a in answers if a["queued_ms"] >= 500) >= 4, "with four slots, some waited for one"
    assert httpx.get(base_vm["endpoint"], timeout=30).json()["hostname"] == "base"  # the rest of the server is as before


def test_openapi_is_served(cli: Cli, base_vm: dict) -> None:
    port = json.loads((cli.home / "agent.json").read_text())["port"]
    spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()
    assert "/v1/live-images/{name}/start" in spec["paths"]
    # and the API refuses a request without the token
    assert httpx.get(f"http://127.0.0.1:{port}/v1/vms", timeout=10).status_code == 401


def test_create_keeps_vm_running(cli: Cli, base_vm: dict, base_image: BaseImage) -> None:
    info = base_image.info
    assert info["pause_ms"] > 0
    assert 0 < info["memory_bytes_stored"] <= info["memory_bytes"]
    before = status(base_vm["endpoint"])["counter"]
    time.sleep(1.5)
    assert status(base_vm["endpoint"])["counter"] > before
    listed = {i["name"]: i for i in cli.json("live-image", "list")}
    assert listed["base-img"]["source_vm"] == "base"
    # capture did not disturb the base VM's memory
    verify = cli.ask("base", "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify


def test_clone_continues_from_snapshot(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="cont")
    st = status(clone["endpoint"])
    # a fresh boot would restart the counter at 1 with an uptime of a few seconds
    assert st["counter"] >= base_image.counter
    assert float(st["uptime"]) >= base_image.uptime
    assert st["hostname"] == clone["name"]  # a new identity, not the base VM's
    assert clone["parent_image"] == "base-img"
    verify = cli.ask(clone["name"], "memcheck-verify")
    assert verify["ok"], verify
    assert verify["result"]["bad_pages"] == 0
    assert verify["result"]["seed"] == base_image.memcheck_seed
    fp = cli.json("show", clone["name"])["footprint"]
    # a clone's guest RAM is mostly the image's pages, not its own
    assert fp["guest_ram"]["image_bytes"] > 0
    assert fp["guest_ram"]["anonymous_bytes"] < base_image.info["memory_bytes_stored"]


def test_many_clones_in_parallel(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    clones = vms.clones("base-img", count=4, prefix="many")
    assert len({c["endpoint"] for c in clones}) == 4
    for c in clones:
        assert status(c["endpoint"])["counter"] >= base_image.counter
    servers = {v["name"] for v in cli.json("live-image", "servers", "base-img")}
    assert {c["name"] for c in clones} <= servers


def test_delete_refused_while_clones_exist(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="pin")
    proc = cli.run("live-image", "delete", "base-img")
    assert proc.returncode == 4
    assert "clone" in proc.stderr and clone["name"] in proc.stderr
    assert "base-img" in {i["name"] for i in cli.json("live-image", "list")}


def test_destroy_leaves_nothing_behind(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="gone")
    pid = clone["pid"]
    rundirs_before = set((cli.home / "run").iterdir())
    assert pid in our_qemu_pids(cli.home)
    cli.json("destroy", clone["name"])
    assert pid not in our_qemu_pids(cli.home)
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    gone = rundirs_before - set((cli.home / "run").iterdir())
    assert len(gone) == 1, "the clone's run dir (sockets, logs) must be removed"
    assert clone["name"] not in {v["name"] for v in cli.json("list")}
    try:
        httpx.get(clone["endpoint"], timeout=2)
        raise AssertionError("the destroyed clone's endpoint still answers")
    except httpx.TransportError:
        pass


def _qemu_alive(pid: int) -> bool:
    try:
        return b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def test_clone_taken_from_the_pool(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (first,) = vms.clones("base-img", prefix="warm")  # a start leaves a paused QEMU ready for the next
    pooled = wait_pool(cli, "base-img")
    (clone,) = vms.clones("base-img", prefix="pooled")
    assert "pool_taken" in clone["phases"] and clone["pid"] in pooled, clone["phases"]
    # its own identity, not the pooled QEMU's placeholder nor its sibling's
    assert clone["vmgenid"] != first["vmgenid"] and clone["mac"] != first["mac"]
    st = cli.ask(clone["name"], "status")
    assert st["hostname"] == clone["name"] and st["mac"] == clone["mac"]
    assert status(clone["endpoint"])["hostname"] == clone["name"]
    assert cli.ask(clone["name"], "memcheck-verify")["result"]["bad_pages"] == 0
    assert cli.ask(clone["name"], "random")["random"] != cli.ask(first["name"], "random")["random"]
    # the pooled QEMU ran through a start before it was taken (with its own placeholder
    # hostname), but the clone hooks ran once, for the clone, with the clone's identity
    hooks = wait_hooks(cli, clone["name"])
    (hook,) = hooks["hooks"]
    seen = base64.b64decode(hook["output_b64"]).decode()
    assert f"hostname={clone['name']}" in seen and ".pool" not in seen, seen
    # pooled QEMUs are not VMs: not listed; an image's go with it
    names = {v["name"] for v in cli.json("list")}
    assert not any(n.startswith(".") for n in names)
    cli.json("live-image", "create", clone["name"], "pool-img")
    (child,) = vms.clones("pool-img", prefix="pchild")
    cli.json("destroy", child["name"])
    vms.names.remove(child["name"])
    its_pool = wait_pool(cli, "pool-img")
    assert its_pool and all(_qemu_alive(p) for p in its_pool)
    cli.json("live-image", "delete", "pool-img")
    assert not any(_qemu_alive(p) for p in its_pool), "the image's pooled QEMUs went with it"
    assert "pool-img" not in cli.json("host", "--json")["clone_pool"]["pids"]


def test_agent_restart_reattaches(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="survivor")
    pooled = wait_pool(cli, "base-img")
    old_agent = json.loads((cli.home / "agent.json").read_text())["pid"]
    os.kill(old_agent, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{old_agent}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # the CLI starts a new agent, which adopts the running clone
    listed = {v["name"]: v for v in cli.json("list")}
    assert listed[clone["name"]]["state"] == "running"
    assert listed[clone["name"]]["pid"] == clone["pid"]
    new_agent = json.loads((cli.home / "agent.json").read_text())["pid"]
    assert new_agent != old_agent
    assert not any(_qemu_alive(p) for p in pooled), "the new agent stopped the old one's pooled QEMUs"
    assert status(clone["endpoint"])["counter"] >= base_image.counter
    assert cli.ask(clone["name"], "ping")["ok"]
    # its memory is served by memfs, which outlived the agent: still every page right
    verify = cli.ask(clone["name"], "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify


def test_pause_stops_the_guest_and_unpause_runs_it_on(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="napper")
    name = clone["name"]
    assert cli.json("pause", name)["state"] == "paused"
    try:
        httpx.get(clone["endpoint"], timeout=2)
        raise AssertionError("a paused guest answered HTTP")
    except httpx.TimeoutException:
        pass  # QEMU's user network takes the connection; the stopped guest never answers
    before = cpu_seconds(clone["pid"])
    time.sleep(2)
    assert cpu_seconds(clone["pid"]) - before < 0.2, "a paused VM's QEMU kept using CPU"  # of 2 s: vCPUs stopped
    refused = cli.run("live-image", "create", name, "napper-img")
    said = " ".join(refused.stderr.split())  # the terminal width wraps it
    assert refused.returncode == 4 and "is paused" in said and f"vmstream unpause {name}" in said, refused.stderr

    # an agent that restarts keeps it paused (QEMU says so)
    old_agent = json.loads((cli.home / "agent.json").read_text())["pid"]
    os.kill(old_agent, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{old_agent}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {v["name"]: v for v in cli.json("list")}[name]["state"] == "paused"

    assert cli.json("unpause", name)["state"] == "running"
    assert status(clone["endpoint"])["hostname"] == name
    verify = cli.ask(name, "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify
