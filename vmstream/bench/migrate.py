"""`bench migrate`: live and delta migration between two agents on a network test bed.

Hosts are network namespaces joined by a bridge (vmstream.net.TestBed). Each
host runs its own agent whose VMs sit on that host's bridge, with an address
from the agent's range (VMSTREAM_BRIDGE, VMSTREAM_NETNS, VMSTREAM_VM_ADDRESSES);
host b's store is host a's, so both hold the clone's live image. A move is
what `vmstream migrate VM --to HOST --mode MODE` does: the REST call
POST /v1/vms/{vm}/migrate on the VM's agent, followed until it ends, so the
figures are those of the agents' own migration path. The VM keeps its
address when it moves, and a client namespace sends requests to it
throughout, over one kept-alive connection and over new connections. For
each mode and load (idle; guest rewriting memory at 20 MB/s) one move; the
figures are QEMU's downtime, the largest gap the client saw, and what was sent.

The agents do not program the fabric (no fabric controller between real
hosts): frames sent to the source's port during the switch-over are lost
and TCP retransmits them, which the client gap includes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.bench.common import Bench, say
from vmstream.bench.report import fmt_mib, md_table, pyplot
from vmstream.errors import VmstreamError
from vmstream.migrate.client import LoadClient
from vmstream.migrate.types import MigrationError
from vmstream.net import TestBed, namespaces_with_prefix, unique_prefix

TARGET_GAP_MS = 100.0  # from the issue
LOADS = {"idle": 0, "write20": 20}
GUEST_ANSWER_S = 30.0  # a moved guest's agent answers within this, or the guest counts as lost
RANGES = {"a": (10, 29), "b": (30, 49)}  # each agent's VM addresses in the bed's subnet (disjoint)
POLL_S = 0.1
MOVE_TIMEOUT_S = 300.0


def other(host: str) -> str:
    return "b" if host == "a" else "a"


def bridged_agent_env(bed: TestBed, host: str, first: int, last: int) -> dict[str, str]:
    """The settings of an agent whose VMs sit on test-bed host `host`'s bridge, with addresses
    .first-.last of the bed's subnet; its QEMUs and delta receiver listen on the host's address."""
    return {
        "VMSTREAM_BRIDGE": bed.hosts[host].bridge, "VMSTREAM_NETNS": bed.hosts[host].netns,
        "VMSTREAM_VM_ADDRESSES": f"{bed.subnet}.{first}-{bed.subnet}.{last}/24",
        "VMSTREAM_MIGRATION_ADDRESS": bed.hosts[host].ip, "VMSTREAM_CLONE_POOL": "0",
    }


@contextlib.contextmanager
def agents(bed: TestBed, work: Path) -> Iterator[dict[str, AgentClient]]:
    """An agent per test-bed host, on its bridge, each the other's peer; stopped (VMs destroyed) on exit."""
    clients: dict[str, AgentClient] = {}
    try:
        for host, (first, last) in RANGES.items():
            clients[host] = AgentClient(work / f"host-{host}", env={
                **bridged_agent_env(bed, host, first, last),
                "VMSTREAM_STORE": str(work / "host-a" / "store"),  # one store: both hosts hold every image
            })
            clients[host].call("GET", "/v1/info")  # starts it; builds its guest and picks its accelerator
        for host, client in clients.items():
            peer = clients[other(host)].data_dir
            port = json.loads((peer / "agent.json").read_text())["port"]
            client.call("PUT", f"/v1/peers/{other(host)}",
                        json={"url": f"http://127.0.0.1:{port}", "token": (peer / "agent.token").read_text().strip()})
        yield clients
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.stop_agent(destroy_vms=True)
            client.close()


def ask(client: AgentClient, vm: str, command: str, timeout: float = 120.0) -> dict[str, Any]:
    answer: dict[str, Any] = client.call("POST", f"/v1/vms/{vm}/guest", json={"command": command, "timeout": timeout})
    return answer


def _move(client: AgentClient, vm: str, to: str, mode: str) -> dict[str, Any]:
    """Migrate vm to peer `to` the way `vmstream migrate` does; the job once completed."""
    job: dict[str, Any] = client.call("POST", f"/v1/vms/{vm}/migrate", json={"to": to, "mode": mode})
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    while job["state"] in ("preparing", "running"):
        if time.monotonic() > deadline:
            with contextlib.suppress(VmstreamError):
                client.call("DELETE", f"/v1/vms/{vm}/migration")
            raise MigrationError(f"the {mode} move of {vm} to {to} did not end within {MOVE_TIMEOUT_S:.0f}s")
        time.sleep(POLL_S)
        job = client.call("GET", f"/v1/vms/{vm}/migration")
    if job["state"] != "completed":
        raise MigrationError(f"the {mode} move of {vm} to {to} {job['state']}: {job.get('error')}")
    return job


def serial_tail(client: AgentClient, vm: str, lines: int = 40) -> str:
    """The last lines of the VM's console (its QEMU's serial log), to see why a guest failed."""
    try:
        pid = client.call("GET", f"/v1/vms/{vm}")["pid"]
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        log = next(Path(a.decode().removeprefix("file:")) for a in args if a.endswith(b"/serial.log"))
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except (VmstreamError, OSError, StopIteration, TypeError) as exc:
        return f"(no serial log: {exc!r})"


def one_move(bed: TestBed, clients: dict[str, AgentClient], vm: str, ip: str, at: str, mode: str, rate: int) -> dict[str, Any]:
    """One move of vm from host `at` to the other under the client (and the guest writing `rate` MB/s)."""
    src, dst = clients[at], clients[other(at)]
    if rate:
        answer = ask(src, vm, f"memcheck-dirty 64 {rate}")
        if not answer.get("ok"):
            raise MigrationError(f"cannot start the memory writer: {answer}")
        time.sleep(1.0)
    try:
        with LoadClient(ip, bed.client) as client:
            time.sleep(1.0)
            client.reset_gaps()
            job = _move(src, vm, other(at), mode)
            time.sleep(1.0)
        stats = client.stop()
    except BaseException:
        if rate:
            with contextlib.suppress(Exception):
                ask(src, vm, "memcheck-dirty-stop", timeout=10)
        raise
    # A guest that stops answering after its move is a result of this run (counted,
    # with its console), not the end of the whole bench.
    guest_error, verify = None, {}
    try:
        if rate:
            ask(dst, vm, "memcheck-dirty-stop", timeout=GUEST_ANSWER_S)
        verify = ask(dst, vm, "memcheck-verify", timeout=GUEST_ANSWER_S)
    except VmstreamError as exc:
        guest_error = str(exc)
    broken = guest_error or not verify.get("ok") or verify.get("result", {}).get("bad_pages") or stats.client_gap_ms > 2000
    result = job["result"]
    return {
        "guest_error": guest_error,
        # a guest that failed after the move: its console, to see why (a panic shows here)
        "serial_tail": serial_tail(dst, vm) if broken else None,
        "downtime_ms": result["downtime_ms"], "client_gap_ms": stats.client_gap_ms, "total_s": result["total_s"],
        "bytes_sent": result["bytes_sent"], "failed_requests": stats.failed_requests,
        "reset_connections": stats.reset_connections, "requests": stats.requests, "rounds": result["rounds"],
        "postcopy": result["postcopy"], "private_bytes": result["private_bytes"],
        "memcheck_bad_pages": verify.get("result", {}).get("bad_pages") if verify.get("ok") else None,
        "pause_breakdown_ms": result["details"].get("pause_ms"),
        "job_s": job["elapsed_s"],  # the agent's job: request to done, destination set-up included
        # per stream: a kept-alive connection waits for TCP's retransmission, a new one for its SYN's (1 s)
        "stream_gaps_ms": {name: round(st["max_gap_ms"], 1) for name, st in stats.streams.items()},
    }


def _loads(bed: TestBed, clients: dict[str, AgentClient], vm: str, mode: str, loads: tuple[str, ...]) -> dict[str, Any]:
    """One move per load, a to b, then back, and so on; a guest lost after a move ends its series."""
    out: dict[str, Any] = {}
    ip = clients["a"].call("GET", f"/v1/vms/{vm}")["endpoint"].removeprefix("http://").rstrip("/")
    at = "a"
    for load in loads:
        out[load] = one_move(bed, clients, vm, ip, at, mode, LOADS[load])
        at = other(at)
        if out[load]["guest_error"]:
            break
    clients[at].call("DELETE", f"/v1/vms/{vm}")  # before the next boot: host a may hand its address out again
    return out


def boot_filled(client: AgentClient, name: str, memory_mib: int) -> None:
    client.call("POST", "/v1/vms", json={"name": name, "memory": f"{memory_mib}M", "cpus": 1})
    fill = ask(client, name, "memcheck-fill 32 7")
    if not fill.get("ok"):
        raise MigrationError(f"memcheck-fill failed in {name}: {fill}")


def measure(work: Path, modes: tuple[str, ...] = ("live", "delta"), loads: tuple[str, ...] = ("idle", "write20"),
            memory_mib: int = 256) -> dict[str, Any]:
    """Run the migration moves in a throw-away test bed with two agents under work; returns the figures."""
    t0 = time.monotonic()
    prefix = unique_prefix("vb")
    out: dict[str, Any] = {"meta": {"memory_mib": memory_mib, "host": platform.node(), "cpus": os.cpu_count(),
                                    "loads_mb_s": LOADS, "path": "two agents, vmstream migrate (REST)"}}
    with TestBed(prefix) as bed, agents(bed, work) as clients:
        out["meta"]["accel"] = clients["a"].call("GET", "/v1/info")["accelerator"]
        a = clients["a"]
        if "live" in modes:
            boot_filled(a, "live", memory_mib)
            out["live"] = _loads(bed, clients, "live", "live", loads)
        if "delta" in modes:
            boot_filled(a, "imgsrc", memory_mib)
            a.call("POST", "/v1/live-images", json={"vm": "imgsrc", "name": "image"})
            a.call("DELETE", "/v1/vms/imgsrc")
            started = a.call("POST", "/v1/live-images/image/start", json={"count": 1, "name": "clone", "pool": False})
            clone = started["vms"][0]["name"]
            out["delta"] = _loads(bed, clients, clone, "delta", loads)
    out["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    out["meta"]["left_behind"] = namespaces_with_prefix(prefix)
    return out


def run(bench: Bench, memory_mib: int = 256) -> dict[str, Any]:
    say(f"migrate: live (booted VM) and delta (clone) moves of a {memory_mib} MiB guest between two agents, "
        "idle and writing 20 MB/s")
    raw = measure(bench.scratch / "migrate", memory_mib=memory_mib)
    modes = {m: raw[m] for m in ("live", "delta") if m in raw}
    for mode, loads in modes.items():
        for load, r in loads.items():
            say(f"{mode}/{load}: downtime {r['downtime_ms']:.0f} ms, client gap {r['client_gap_ms']:.0f} ms, "
                f"failed {r['failed_requests']}, resets {r['reset_connections']}"
                + (f"; THE GUEST STOPPED ANSWERING after the move: {r['guest_error']}" if r.get("guest_error") else ""))
    rows = [r for loads in modes.values() for r in loads.values()]
    return {
        "bench": "migrate",
        "accelerator": raw["meta"]["accel"],
        "memory_mib": memory_mib,
        "modes": modes,
        "max_client_gap_ms": max(r["client_gap_ms"] for r in rows),
        "failed_requests": sum(r["failed_requests"] for r in rows),
        "reset_connections": sum(r["reset_connections"] for r in rows),
        "delta_sent_over_private": max(
            (r["bytes_sent"] / r["private_bytes"] for r in modes.get("delta", {}).values() if r.get("private_bytes")), default=None
        ),
        "memcheck_bad_pages": sum(r["memcheck_bad_pages"] or 0 for r in rows),
        "guests_lost": sum(1 for r in rows if r.get("guest_error")),
        "left_behind": raw["meta"]["left_behind"],
        "elapsed_s": raw["meta"]["elapsed_s"],
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    rows, labels, gaps, downs = [], [], [], []
    for mode, loads in res["modes"].items():
        for load, r in loads.items():
            rows.append([f"{mode}, {load}", f"{r['downtime_ms']:.0f} ms", f"{r['client_gap_ms']:.0f} ms", f"{r['total_s']:.2f} s",
                         fmt_mib(r["bytes_sent"]), fmt_mib(r.get("private_bytes")), r["failed_requests"], r["reset_connections"],
                         "guest lost" if r.get("guest_error") else r["memcheck_bad_pages"]])
            labels.append(f"{mode}\n{load}")
            gaps.append(r["client_gap_ms"])
            downs.append(r["downtime_ms"])
    md = (
        f"One move per row, {res['memory_mib']} MiB guest, {res['accelerator']}, hosts as network namespaces on one "
        "machine, each with its own agent (the move is `vmstream migrate VM --to HOST --mode MODE`; the agents do not "
        "program the fabric, so frames sent to the source during the switch-over are lost and TCP resends them). "
        f"Loads: idle, and the guest rewriting memory at {LOADS['write20']} MB/s. Client gap: the largest "
        f"pause in a client's request stream (kept-alive and new connections). Target: gap <= {TARGET_GAP_MS:.0f} ms, "
        "no failed requests, no resets.\n\n"
        + md_table(["mode, load", "downtime (QEMU)", "client gap", "total", "sent", "private", "failed", "resets", "bad pages"], rows)
    )
    for mode, loads in res["modes"].items():
        for load, r in loads.items():
            if r.get("guest_error"):
                md += (f"\n\nThe guest stopped answering after the {mode}/{load} move ({r['guest_error']}); "
                       f"the last lines of its console:\n\n```\n{r.get('serial_tail') or '(empty)'}\n```")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], downs, width=0.4, label="downtime (QEMU)")
    ax.bar([x + 0.2 for x in xs], gaps, width=0.4, label="client gap")
    ax.axhline(TARGET_GAP_MS, color="grey", linestyle="--", label=f"target {TARGET_GAP_MS:.0f} ms")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms")
    ax.set_title("Migration between agents: downtime and client-visible gap")
    ax.legend()
    return md, fig
