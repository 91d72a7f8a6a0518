"""`bench soak`: many live moves in a row, and what they leave behind.

Two agents on a network test bed (as `bench migrate`: VMs on bridges, a client namespace
sending requests to each VM throughout its move, over a kept-alive connection and new
ones). A booted VM moves live and a clone moves by delta, in turn, back and forth, every
fourth move of each while its guest rewrites memory at 20 MB/s; after each move the
guest's memcheck region is verified on its new host. Between the moves, `clone_cycles`
clones of the image in all are started on host a one at a time, verified and destroyed
(spread evenly: 1000 over 200 moves is 5 after each). A guest that
stops answering after a move is counted (guest_panics, its console kept), destroyed and
made again, so one loss does not end the run.

Figures: moves, guest_panics, memcheck_bad_pages, lost_connections (requests that failed
and connections reset), stalls_over_1s (moves whose client waited 1 s or more: a lost
SYN's retransmission), clone_cycles, and each agent's open files, threads and RSS after
a tenth of the moves (the agents' caches, pools and heaps have warmed up by then) and at
the end (a leak grows with the moves); each move's record has both agents' RSS.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.bench.common import Bench, say
from vmstream.bench.migrate import LOADS, agents, ask, boot_filled, one_move, other
from vmstream.bench.report import md_table, pyplot
from vmstream.errors import VmstreamError
from vmstream.net import TestBed, namespaces_with_prefix, unique_prefix

LOADED_EVERY = 4  # every fourth move of a VM is made while its guest writes 20 MB/s
IMAGE = "soak-image"


def agent_stats(client: AgentClient) -> dict[str, int]:
    """The agent process's open files, threads and resident memory."""
    pid = int(client.call("GET", "/health")["pid"])
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(fields["Threads"]),
            "rss_bytes": int(fields["VmRSS"].split()[0]) * 1024}


def _make(clients: dict[str, AgentClient], kind: str, memory_mib: int, n: int) -> str:
    """A VM to move, on host a: a booted one (kind live) or a clone of the image (delta)."""
    a = clients["a"]
    if kind == "live":
        name = f"soak-live-{n}"
        boot_filled(a, name, memory_mib)
        return name
    return str(a.call("POST", f"/v1/live-images/{IMAGE}/start", json={"count": 1, "name": f"soak-clone-{n}"})["vms"][0]["name"])


def _clone_cycle(client: AgentClient, n: int) -> int:
    """Start a clone of the image, verify its memory, destroy it; its bad pages (-1: the
    check failed, -2: the clone did not start)."""
    try:
        vm = client.call("POST", f"/v1/live-images/{IMAGE}/start", json={"count": 1, "name": f"soak-cycle-{n}"})["vms"][0]["name"]
    except VmstreamError as exc:
        say(f"clone cycle {n}: the clone did not start: {exc}")
        return -2
    try:
        verify = ask(client, vm, "memcheck-verify")
        return int(verify["result"]["bad_pages"]) if verify.get("ok") else -1
    finally:
        client.call("DELETE", f"/v1/vms/{vm}")


def measure(work: Path, moves: int, memory_mib: int = 256, clone_cycles: int = 1000) -> dict[str, Any]:
    t0 = time.monotonic()
    prefix = unique_prefix("vs")
    records: list[dict[str, Any]] = []
    out: dict[str, Any] = {"meta": {"memory_mib": memory_mib, "host": platform.node(), "cpus": os.cpu_count(),
                                    "moves": moves, "clone_cycles": clone_cycles}}
    with TestBed(prefix) as bed, agents(bed, work) as clients:
        a = clients["a"]
        out["meta"]["accel"] = a.call("GET", "/v1/info")["accelerator"]
        boot_filled(a, "soak-src", memory_mib)
        a.call("POST", "/v1/live-images", json={"vm": "soak-src", "name": IMAGE})
        a.call("DELETE", "/v1/vms/soak-src")
        made = {"live": 0, "delta": 0}
        vms = {kind: _make(clients, kind, memory_mib, 0) for kind in ("live", "delta")}
        at = {"live": "a", "delta": "a"}
        cycles, cycle_bad, cycle_failed, start_stats = 0, 0, 0, None
        for i in range(moves):
            kind = "live" if i % 2 == 0 else "delta"
            vm = vms[kind]
            ip = clients[at[kind]].call("GET", f"/v1/vms/{vm}")["endpoint"].removeprefix("http://").rstrip("/")
            load = "write20" if (i // 2) % LOADED_EVERY == LOADED_EVERY - 1 else "idle"
            try:
                r = one_move(bed, clients, vm, ip, at[kind], kind, LOADS[load])
            except VmstreamError as exc:  # the move itself failed: counted, the VM is where the agents say
                r = {"move_error": str(exc), "guest_error": None, "serial_tail": None, "client_gap_ms": None,
                     "failed_requests": 0, "reset_connections": 0, "memcheck_bad_pages": None, "downtime_ms": None}
            else:
                at[kind] = other(at[kind])
            r.update(move=i + 1, mode=kind, load=load, vm=vm, t=round(time.monotonic() - t0, 1),
                     rss_mib={h: round(agent_stats(c)["rss_bytes"] / (1 << 20), 1) for h, c in clients.items()})
            records.append(r)
            gap = r.get("client_gap_ms")
            say(f"move {i + 1}/{moves}: {kind}/{load} {vm} -> {at[kind]}: "
                + (f"client gap {gap:.0f} ms, downtime {r['downtime_ms']:.0f} ms" if gap is not None else f"FAILED: {r['move_error']}")
                + (f"; GUEST LOST: {r['guest_error']}" if r.get("guest_error") else ""))
            if r.get("guest_error") or (r.get("serial_tail") and "Kernel panic" in r["serial_tail"]):
                with contextlib.suppress(VmstreamError):
                    clients[at[kind]].call("DELETE", f"/v1/vms/{vm}")
                made[kind] += 1
                vms[kind], at[kind] = _make(clients, kind, memory_mib, made[kind]), "a"
            while cycles < clone_cycles * (i + 1) // moves:
                bad = _clone_cycle(a, cycles)
                cycles += 1
                cycle_bad += max(bad, 0)
                cycle_failed += bad < 0
                if cycles % 100 == 0:
                    say(f"{cycles} clone cycles, {cycle_failed} failed, {cycle_bad} bad pages")
            if i == max(1, moves // 10) - 1:  # after a tenth of the run: the agents have warmed up
                start_stats = {h: agent_stats(c) for h, c in clients.items()}
        end_stats = {h: agent_stats(c) for h, c in clients.items()}
    out["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    out["meta"]["left_behind"] = namespaces_with_prefix(prefix)
    out["records"] = records
    out["clone_cycles"], out["clone_cycle_bad_pages"], out["clone_cycle_failures"] = cycles, cycle_bad, cycle_failed
    out["agents_start"], out["agents_end"] = start_stats or end_stats, end_stats
    return out


def run(bench: Bench, moves: int = 200, memory_mib: int = 256, clone_cycles: int = 1000) -> dict[str, Any]:
    say(f"soak: {moves} moves of a {memory_mib} MiB booted VM (live) and a clone (delta) in turn between two agents, "
        f"memcheck after each, and {clone_cycles} clones started, verified and destroyed between them")
    raw = measure(bench.scratch / "soak", moves, memory_mib, clone_cycles)
    rec = raw["records"]
    done = [r for r in rec if r.get("client_gap_ms") is not None]
    lost = [r for r in rec if r.get("guest_error") or (r.get("serial_tail") and "Kernel panic" in r["serial_tail"])]
    start, end = raw["agents_start"]["a"], raw["agents_end"]["a"]
    return {
        "bench": "soak",
        "accelerator": raw["meta"]["accel"],
        "memory_mib": memory_mib,
        "live_moves": len(done),  # moves that completed, live and delta (the count)
        "moves_by_mode": {m: sum(1 for r in done if r["mode"] == m) for m in ("live", "delta")},
        "failed_moves": len(rec) - len(done),
        "guest_panics": len(lost),
        "memcheck_bad_pages": sum(r.get("memcheck_bad_pages") or 0 for r in rec) + raw["clone_cycle_bad_pages"],
        "lost_connections": sum(r["failed_requests"] + r["reset_connections"] for r in rec),
        "stalls_over_1s": sum(1 for r in done if r["client_gap_ms"] >= 1000),
        "max_client_gap_ms": max((r["client_gap_ms"] for r in done), default=None),
        "clone_cycles": raw["clone_cycles"],
        "clone_cycle_failures": raw["clone_cycle_failures"],  # clones that did not start or whose memcheck could not run
        "agent_fds_start": start["fds"], "agent_fds_end": end["fds"],
        "agent_threads_start": start["threads"], "agent_threads_end": end["threads"],
        "agent_rss_start_bytes": start["rss_bytes"], "agent_rss_end_bytes": end["rss_bytes"],
        "agents": {"start": raw["agents_start"], "end": raw["agents_end"]},
        "lost_guests": [{k: r.get(k) for k in ("move", "mode", "load", "vm", "guest_error", "serial_tail")} for r in lost],
        "elapsed_s": raw["meta"]["elapsed_s"],
        "left_behind": raw["meta"]["left_behind"],
        "records": [{k: v for k, v in r.items() if k != "serial_tail"} for r in rec],
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    rows = [[k, str(res[k])] for k in ("live_moves", "failed_moves", "guest_panics", "memcheck_bad_pages", "lost_connections",
                                       "stalls_over_1s", "max_client_gap_ms", "clone_cycles",
                                       "clone_cycle_failures")]
    for key in ("fds", "threads", "rss_bytes"):
        s, e = res["agents"]["start"]["a"][key], res["agents"]["end"]["a"][key]
        rows.append([f"agent a {key}: after the first moves -> at the end", f"{s} -> {e} ({(e - s) / s:+.1%})" if s else f"{s} -> {e}"])
    md = (f"{res['live_moves']} moves ({res['moves_by_mode']}) of a {res['memory_mib']} MiB guest between two agents "
          f"({res['accelerator']}), {res['elapsed_s']:.0f} s.\n\n" + md_table(["figure", "value"], rows))
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, color in (("live", "#3f7fd9"), ("delta", "#d94f3f")):
        pts = [(r["move"], r["client_gap_ms"]) for r in res["records"] if r["mode"] == mode and r.get("client_gap_ms") is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=color, label=mode)
    ax.set_yscale("log")
    ax.set_xlabel("move")
    ax.set_ylabel("largest client gap (ms)")
    ax.set_title("Each move: what the client waited")
    ax.legend()
    ax.grid(alpha=0.3)
    for host in ("a", "b"):
        s, e = res["agents"]["start"][host], res["agents"]["end"][host]
        ax2.bar([f"{host} fds", f"{host} threads"], [e["fds"] - s["fds"], e["threads"] - s["threads"]], alpha=0.7)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_title("Agents: growth over the run (end - start)")
    fig.tight_layout()
    return md, fig
