"""The demo: cold boot vs clones of a live image, measured in one run.

Clones are started one request at a time, each once the previous one has
settled, so each figure is one clone's own time from request to first HTTP
answer; they then all run side by side for the footprint comparison. Everything the demo made is removed at the end,
also on failure or Ctrl-C, and the agent too if the demo started it.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from vmstream.agentapi import AgentClient


def _status(endpoint: str) -> dict[str, Any]:
    r = httpx.get(endpoint + "status.json", timeout=5.0)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def _footprint(vm: dict[str, Any]) -> dict[str, Any]:
    fp = vm.get("footprint") or {}
    return {
        "name": vm["name"],
        "private_bytes": fp.get("private_bytes"),
        "shared_bytes": fp.get("shared_bytes"),
        "resident_bytes": fp.get("resident_bytes"),
        "pss_bytes": fp.get("pss_bytes"),
        "guest_written_bytes": (fp.get("guest_ram") or {}).get("anonymous_bytes"),
    }


def run_demo(client: AgentClient, clones: int, memory: str, progress: Console | None) -> dict[str, Any]:
    tag = secrets.token_hex(2)
    base, image, prefix = f"demo-{tag}", f"demo-{tag}-img", f"demo-{tag}-clone"
    made_vms: list[str] = []

    def say(msg: str) -> None:
        if progress is not None:
            progress.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")

    try:
        say("building the demo guest (cached after the first run)")
        client.call("POST", "/v1/guest/build", json={})
        info = client.call("GET", "/v1/info")
        say(f"accelerator: {info['accelerator']} ({info['accelerator_reason']})")

        say(f"cold-booting {base} ({memory})")
        t0 = time.perf_counter()
        vm = client.call("POST", "/v1/vms", json={"name": base, "memory": memory, "cpus": 1})
        cold_boot_s = time.perf_counter() - t0
        made_vms.append(base)
        say(f"{base} answered HTTP after {cold_boot_s:.2f}s")

        before = _status(vm["endpoint"])["counter"]
        img = client.call("POST", "/v1/live-images", json={"vm": base, "name": image})
        say(f"live image {image}: VM paused {img['pause_ms']:.1f} ms, {img['memory_bytes_stored'] >> 20} MiB stored")

        ready: list[float] = []
        endpoints: dict[str, str] = {}
        for i in range(clones):
            t = time.perf_counter()
            res = client.call("POST", f"/v1/live-images/{image}/start", json={"count": 1, "name": prefix})
            ready.append(time.perf_counter() - t)
            clone = res["vms"][0]
            made_vms.append(clone["name"])
            endpoints[clone["name"]] = clone["endpoint"]
            say(f"clone {i + 1}/{clones} {clone['name']} answered HTTP after {ready[-1]:.3f}s")
            _settle(client, clone["name"])

        serving, counters = 0, []
        for endpoint in endpoints.values():
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                counter = _status(endpoint)["counter"]
                counters.append(counter)
                serving += counter >= before  # continued from the image, not booted anew
        time.sleep(1.0)  # let the clones settle so the footprint is steady-state
        footprint = [_footprint(client.call("GET", f"/v1/vms/{n}")) for n in made_vms]
        median = statistics.median(ready) if ready else float("nan")
        return {
            "accelerator": info["accelerator"],
            "memory_bytes": vm["memory_bytes"],
            "cold_boot_s": round(cold_boot_s, 3),
            "clone_ready_s": [round(r, 3) for r in ready],
            "clone_ready_median_s": round(median, 3),
            "speedup": round(cold_boot_s / median, 1) if ready else None,
            "clones_serving": serving,
            "counter_at_image": before,
            "clone_counters": counters,
            "pause_ms": img["pause_ms"],
            "image_stored_bytes": img["memory_bytes_stored"],
            "footprint": footprint,
        }
    finally:
        say("cleaning up")
        _remove_tagged(client, base)
        if client.started_agent:
            with contextlib.suppress(Exception):
                client.stop_agent()


def _settle(client: AgentClient, name: str, timeout: float = 15.0) -> None:
    """Wait until a new clone's hooks have run, so the next clone's start is timed on a
    quiet host (as the cold boot is): under TCG a clone's first second of background
    work would otherwise compete with the next start for the 2 cores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not client.call("GET", f"/v1/vms/{name}").get("hooks"):
        time.sleep(0.1)


def _remove_tagged(client: AgentClient, tag: str) -> None:
    """Destroy every VM and image whose name starts with the demo's tag.

    By name, not by what the demo saw come back: after Ctrl-C a boot or
    clone may still have been in flight in the agent.
    """
    with contextlib.suppress(Exception):
        for vm in reversed(client.call("GET", "/v1/vms")):
            if vm["name"] == tag or vm["name"].startswith(tag + "-"):
                with contextlib.suppress(Exception):
                    client.call("DELETE", f"/v1/vms/{vm['name']}")
        for img in client.call("GET", "/v1/live-images"):
            if img["name"].startswith(tag + "-"):
                with contextlib.suppress(Exception):
                    client.call("DELETE", f"/v1/live-images/{img['name']}")


def render_demo(out: Console, r: dict[str, Any]) -> None:
    mib = 1 << 20
    t = Table(title=f"vmstream demo ({r['accelerator']}, {r['memory_bytes'] // mib} MiB guest)")
    t.add_column("")
    t.add_column("time to first HTTP answer", justify="right")
    t.add_row("cold boot", f"{r['cold_boot_s']:.2f} s")
    t.add_row("clone (median)", f"{r['clone_ready_median_s']:.3f} s")
    t.add_row("clone (fastest / slowest)", f"{min(r['clone_ready_s']):.3f} / {max(r['clone_ready_s']):.3f} s")
    t.add_row("[bold]speed-up[/bold]", f"[bold]{r['speedup']}x[/bold]")
    t.add_row("live-image pause", f"{r['pause_ms']:.1f} ms")
    t.add_row("clones serving", f"{r['clones_serving']} / {len(r['clone_ready_s'])}")
    out.print(t)
    f = Table(title="memory footprint per VM")
    for col in ("VM", "PSS", "private", "shared", "guest RAM written"):
        f.add_column(col, justify="right" if col != "VM" else "left")
    for vm in r["footprint"]:
        keys = ("pss_bytes", "private_bytes", "shared_bytes", "guest_written_bytes")
        f.add_row(vm["name"], *(f"{(vm[k] or 0) / mib:.1f} MiB" for k in keys))
    out.print(f)
