"""`bench autoscale`: a load step on a scaling group; clones vs cold-booted members.

A group (vmstream.host.groups) of the demo guest behind its HAProxy serves `GET /work`, whose
cost is waiting (each VM serves 4 at a time, each ms long), so capacity grows with members
the way an I/O-bound service does. An open-loop generator (requests evenly spaced, sent
whatever the answers do) offers what one member handles, steps to what ten handle, holds,
then drops back. The same run repeats with a baseline group whose members are cold-booted.

Read from the answers, not from the agent: ten members serving is the first moment ten
different guests (their hostnames) have answered requests sent after the step; latency
percentiles are per bucket of send time; a request fails when it gets no 200, and is
reset when its connection is cut without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmstream.bench.common import Bench, say
from vmstream.bench.report import fmt_s, fmt_x, md_table, pyplot
from vmstream.bench.stats import quantile

BUCKET_S = 0.5  # latency percentiles over time: per this much send time
REQUEST_TIMEOUT_S = 60.0
POLL_S = 0.25
TARGETS = {"scale_out_to_10_s": 3.0, "p99_recovered_s": 5.0, "speedup_vs_cold_boot": 5.0}


@dataclass
class Shot:
    """One request: when it was sent (s from the run's start), how long it took, what came back."""

    sent: float
    latency: float | None = None
    status: int | None = None
    host: str | None = None
    error: str | None = None  # "reset" (cut without an answer), "timeout", or what else went wrong


@dataclass
class Phase:
    name: str
    start: float
    end: float
    rps: float


@dataclass
class Run:
    shots: list[Shot] = field(default_factory=list)
    members: list[tuple[float, int, int]] = field(default_factory=list)  # (t, serving, all members) from the agent


async def _request(port: int, path: str, shot: Shot, t0: float) -> None:
    """One HTTP/1.1 request on its own connection, read to the end."""
    writer = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
        shot.latency = time.monotonic() - t0 - shot.sent
        if not data:
            shot.error = "reset"
            return
        head, _, body = data.partition(b"\r\n\r\n")
        shot.status = int(head.split(b" ", 2)[1])
        if shot.status == 200:
            with contextlib.suppress(ValueError):
                shot.host = json.loads(body)["hostname"]
    except ConnectionResetError:
        shot.error = "reset"
    except TimeoutError:
        shot.error = "timeout"
    except (OSError, ValueError, IndexError) as exc:
        shot.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _generate(port: int, path: str, phases: list[Phase], run: Run, t0: float, stop_at: asyncio.Event,
                    pending: set[asyncio.Task[None]]) -> None:
    """Open loop: requests at evenly spaced times, each phase at its rate, sent whatever the answers
    do (the requests still out are left in pending)."""
    for phase in phases:
        n = 0
        while not stop_at.is_set():
            at = phase.start + n / phase.rps
            if at >= phase.end:
                break
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            shot = Shot(sent=time.monotonic() - t0)
            run.shots.append(shot)
            task = asyncio.create_task(_request(port, path, shot, t0))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one(bench: Bench, image: str, start: str, *, work_ms: int, low_rps: float, high_rps: float, pre_s: float, hold_s: float,
         max_size: int, target: float, maxconn: int, delay_s: float, max_hold_s: float) -> dict[str, Any]:
    """One group under the load step; its figures."""
    group, port = bench.name("g", start), _free_port()
    t_create = time.perf_counter()
    bench.call("POST", "/v1/groups", json={
        "name": group, "image": image, "port": port, "min_size": 1, "max_size": max_size, "target_inflight": target,
        "member_maxconn": maxconn, "scale_in_delay_s": delay_s, "start": start}, timeout=600)
    say(f"{start}: group {group} on port {port} with 1 member after {time.perf_counter() - t_create:.2f} s")
    def members() -> tuple[int, int]:
        g = bench.call("GET", f"/v1/groups/{group}")
        return g["serving"], len(g["members"])

    try:
        return asyncio.run(_drive(members, port, work_ms=work_ms, low_rps=low_rps, high_rps=high_rps, pre_s=pre_s,
                                  hold_s=hold_s, max_size=max_size, max_hold_s=max_hold_s, delay_s=delay_s))
    finally:
        with contextlib.suppress(Exception):
            bench.call("DELETE", f"/v1/groups/{group}", timeout=120)


async def _drive(members: Callable[[], tuple[int, int]], port: int, *, work_ms: int, low_rps: float, high_rps: float, pre_s: float,
                 hold_s: float, max_size: int, max_hold_s: float, delay_s: float) -> dict[str, Any]:
    """The load step through the group's port; members() says (serving, all) of the group now."""
    run = Run()
    t0 = time.monotonic()
    step = pre_s
    stop = asyncio.Event()
    path = f"/work?ms={work_ms}"

    async def poll() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                serving, total = await asyncio.to_thread(members)
                run.members.append((time.monotonic() - t0, serving, total))
            await asyncio.sleep(POLL_S)

    poller = asyncio.create_task(poll())
    # the high phase lasts hold_s past the moment ten members answered (a cold-booted baseline
    # takes longer to get there), at most max_hold_s
    high = Phase("step", step, step + max_hold_s, high_rps)
    phases = [Phase("low", 0.0, step, low_rps), high]
    pending: set[asyncio.Task[None]] = set()
    gen = asyncio.create_task(_generate(port, path, phases, run, t0, stop, pending))

    reached: float | None = None
    while reached is None and time.monotonic() - t0 < step + max_hold_s:
        await asyncio.sleep(0.1)
        reached = _ten_serving(run.shots, step, max_size)
    high.end = min(step + max_hold_s, (reached if reached is not None else step + max_hold_s) + hold_s)
    if high.end - (time.monotonic() - t0) > 0:
        say(f"  {max_size} members answering {(reached or 0) - step:.2f} s after the step; holding until t={high.end:.0f} s")
    await gen
    # the drop: back to the low rate (the step's requests still out finish meanwhile) until the
    # group is back at its minimum, plus a little
    drop = time.monotonic() - t0
    after = Phase("drop", drop, drop + delay_s + 60.0 + max_hold_s, low_rps)
    gen = asyncio.create_task(_generate(port, path, [after], run, t0, stop, pending))
    back: float | None = None
    while time.monotonic() - t0 < after.end:
        await asyncio.sleep(0.1)
        if back is None and run.members and run.members[-1][0] > drop and run.members[-1][2] == 1:
            back = run.members[-1][0]
            after.end = min(after.end, back + 3.0)
    stop.set()
    await gen
    await asyncio.gather(*pending)
    await poller
    return _figures(run, step, drop, back, reached, max_size, [*phases, after])


def _ten_serving(shots: list[Shot], step: float, count: int) -> float | None:
    """When `count` different members had answered requests sent after the step (answer time)."""
    seen: dict[str, float] = {}
    for s in shots:
        if s.sent >= step and s.host is not None and s.latency is not None:
            done = s.sent + s.latency
            seen[s.host] = min(seen.get(s.host, done), done)
    if len(seen) < count:
        return None
    return sorted(seen.values())[count - 1]


def _buckets(shots: list[Shot], end: float) -> list[dict[str, Any]]:
    """Per BUCKET_S of send time: requests, answered, p50 and p99 latency (failed ones count as their time)."""
    out = []
    for i in range(math.ceil(end / BUCKET_S)):
        lo, hi = i * BUCKET_S, (i + 1) * BUCKET_S
        lat = sorted(s.latency for s in shots if lo <= s.sent < hi and s.latency is not None)
        out.append({"t": lo, "requests": sum(lo <= s.sent < hi for s in shots), "p50_s": quantile(lat, 0.5) if lat else None,
                    "p99_s": quantile(lat, 0.99) if lat else None})
    return out


def _figures(run: Run, step: float, drop: float, back: float | None, reached: float | None, size: int,
             phases: list[Phase]) -> dict[str, Any]:
    shots = run.shots
    warm = [s.latency for s in shots if step / 2 <= s.sent < step and s.latency is not None and s.status == 200]
    pre_p99 = quantile(warm, 0.99) if warm else None
    buckets = _buckets(shots, max(s.sent for s in shots) + BUCKET_S)
    recovered = None
    if pre_p99 is not None:
        high = [b for b in buckets if step <= b["t"] < drop and b["p99_s"] is not None]
        over = [b for b in high if b["p99_s"] >= 2 * pre_p99]
        recovered = (over[-1]["t"] + BUCKET_S - step) if over else 0.0
    errors: dict[str, int] = {}
    for s in shots:
        if s.error is not None or s.status != 200:
            key = s.error or f"HTTP {s.status}"
            errors[key] = errors.get(key, 0) + 1
    in_step = sorted(s.latency for s in shots if step <= s.sent < drop and s.latency is not None)
    return {
        "requests": len(shots),
        "scale_out_to_10_s": round(reached - step, 3) if reached is not None else None,
        "p99_recovered_s": round(recovered, 3) if recovered is not None else None,
        "pre_step_p99_s": round(pre_p99, 4) if pre_p99 is not None else None,
        "step_p50_s": round(quantile(in_step, 0.5), 4) if in_step else None,
        "step_p99_s": round(quantile(in_step, 0.99), 4) if in_step else None,
        "failed_requests": sum(v for k, v in errors.items() if k != "reset"),
        "reset_requests": errors.get("reset", 0),
        "errors": errors,
        "scale_in_s": round(back - drop, 3) if back is not None else None,
        "members_at_step": next((m[2] for m in reversed(run.members) if m[0] <= step), None),
        "max_members": max((m[2] for m in run.members), default=0),
        "phases": [{"name": p.name, "start_s": round(p.start, 3), "end_s": round(p.end, 3), "rps": p.rps} for p in phases],
        "step_s": round(step, 3), "drop_s": round(drop, 3), "ten": size,
        "buckets": buckets,
        "members_over_time": [[round(t, 2), serving, total] for t, serving, total in run.members],
    }


def run(bench: Bench, mib: int = 256, work_ms: int = 200, low_rps: float = 5.0, high_rps: float = 110.0, pre_s: float = 8.0,
        hold_s: float = 15.0, max_size: int = 10, target: float = 2.0, maxconn: int = 4, delay_s: float = 5.0,
        baseline: bool = True, max_hold_s: float = 150.0, openstack: Path | None = None, computes: int = 2,
        keep: bool = False) -> dict[str, Any]:
    """The clone group, the cold-boot baseline group, and (openstack: the deployment's state dir)
    the same step on a group of Nova servers."""
    facts = bench.facts()
    say(f"autoscale: {mib} MiB demo guest, GET /work?ms={work_ms} (4 at a time per VM), {low_rps:g} -> {high_rps:g} req/s, "
        f"groups of 1..{max_size}, target {target:g} in flight per member")
    source = bench.name("src")
    bench.boot(source, mib)
    image = bench.name("img")
    bench.create_image(source, image)
    bench.destroy(source)
    kw: dict[str, Any] = {"work_ms": work_ms, "low_rps": low_rps, "high_rps": high_rps, "pre_s": pre_s, "hold_s": hold_s,
                          "max_size": max_size,
                          "target": target, "maxconn": maxconn, "delay_s": delay_s, "max_hold_s": max_hold_s}
    clone = _one(bench, image, "clone", **kw)
    say(f"clone group: {max_size} serving {clone['scale_out_to_10_s']} s after the step, p99 back {clone['p99_recovered_s']} s, "
        f"{clone['failed_requests']} failed, {clone['reset_requests']} reset, back to 1 in {clone['scale_in_s']} s")
    cold = _one(bench, image, "boot", **kw) if baseline else None
    if cold is not None:
        say(f"cold-boot group: {max_size} serving {cold['scale_out_to_10_s']} s after the step, "
            f"{cold['failed_requests']} failed, {cold['reset_requests']} reset")
    bench.delete_image(image)
    nova = None
    if openstack is not None:
        nova = run_openstack(openstack, computes, keep, **kw)
        say(f"Nova group: {max_size} ACTIVE and serving {nova['openstack_active_10_s']} s after the step, on "
            f"{nova['openstack_hosts_at_10']}, {nova['openstack_failed_requests']} failed, {nova['openstack_reset_requests']} reset")
    base_s = cold["scale_out_to_10_s"] if cold else None
    ours = clone["scale_out_to_10_s"]
    return {
        "bench": "autoscale", "accelerator": facts.accelerator, "host_cpus": facts.cpus, "memory_mib": mib,
        "work_ms": work_ms, "low_rps": low_rps, "high_rps": high_rps, "max_size": max_size, "target_inflight": target,
        "member_maxconn": maxconn, "scale_in_delay_s": delay_s,
        "scale_out_to_10_s": ours, "p99_recovered_s": clone["p99_recovered_s"],
        "baseline_scale_out_to_10_s": base_s,
        "speedup_vs_cold_boot": round(base_s / ours, 2) if base_s and ours else None,
        "failed_requests": clone["failed_requests"], "reset_requests": clone["reset_requests"], "scale_in_s": clone["scale_in_s"],
        "baseline_failed_requests": cold["failed_requests"] if cold else None,
        "baseline_reset_requests": cold["reset_requests"] if cold else None,
        "clone": clone, "baseline": cold, **(nova or {}),
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    c, b = res["clone"], res["baseline"]

    def met(key: str, value: float | None, most: bool = True) -> str:
        target = TARGETS[key]
        if value is None:
            return "not reached"
        return "met" if (value <= target if most else value >= target) else "**missed**"

    rows = [
        ["10 members serving after the step", fmt_s(res["scale_out_to_10_s"]), "<= 3 s",
         met("scale_out_to_10_s", res["scale_out_to_10_s"])],
        ["p99 back under 2x its pre-step value", fmt_s(res["p99_recovered_s"]), "<= 5 s", met("p99_recovered_s", res["p99_recovered_s"])],
        ["cold-boot baseline: 10 members serving", fmt_s(res["baseline_scale_out_to_10_s"]), "-", "-"],
        ["speedup vs cold boot", fmt_x(res["speedup_vs_cold_boot"]), ">= 5x",
         met("speedup_vs_cold_boot", res["speedup_vs_cold_boot"], most=False)],
        ["failed / reset requests", f"{res['failed_requests']} / {res['reset_requests']}", "0 / 0",
         "met" if res["failed_requests"] == 0 and res["reset_requests"] == 0 else "**missed**"],
        ["back to 1 member after the drop", fmt_s(res["scale_in_s"]), "-", "-"],
    ]
    if "nova" in res:
        spread = res["openstack_hosts_at_10"]
        rows += [
            ["on OpenStack: 10 Nova servers ACTIVE and serving after the step", fmt_s(res["openstack_active_10_s"]),
             ">= 2 computes", "met" if len(spread) >= 2 else "**missed**"],
            ["on OpenStack: where the 10 ran", ", ".join(f"{h} {n}" for h, n in sorted(spread.items())) or "-", "-", "-"],
            ["on OpenStack: failed / reset requests", f"{res['openstack_failed_requests']} / {res['openstack_reset_requests']}",
             "0 / 0", "met" if res["openstack_failed_requests"] == 0 and res["openstack_reset_requests"] == 0 else "**missed**"],
        ]
    md = (
        f"A group of the {res['memory_mib']} MiB demo guest ({res['accelerator']}, {res['host_cpus']} host cores) behind its "
        f"HAProxy serves `GET /work?ms={res['work_ms']}` (4 at a time per VM: {4000 / res['work_ms']:.0f} req/s each). An open-loop "
        f"load of {res['low_rps']:g} req/s steps to {res['high_rps']:g} req/s, holds, and drops back. The group: 1..{res['max_size']} "
        f"members, target {res['target_inflight']:g} requests in flight per member, at most {res['member_maxconn']} at a member "
        f"(the rest wait in HAProxy), scale-in after {res['scale_in_delay_s']:g} s of low load. The baseline group's members "
        f"are cold-booted instead of cloned.\n\n"
        + md_table(["", "clones", "target", ""], rows)
        + f"\n\nClone group: {c['requests']} requests, pre-step p99 {fmt_s(c['pre_step_p99_s'])}, during the step p50 "
        f"{fmt_s(c['step_p50_s'])} and p99 {fmt_s(c['step_p99_s'])}, {c['members_at_step']} member(s) at the step, at most "
        f"{c['max_members']}."
        + (f" Baseline group: {b['requests']} requests, {b['failed_requests']} failed "
           f"({', '.join(f'{k} {v}' for k, v in b['errors'].items()) or 'none'}), "
           f"{b['reset_requests']} reset; p99 during the step {fmt_s(b['step_p99_s'])}." if b else "")
    )
    plt = pyplot()
    runs = [("clones", c)] + ([("cold-booted members (baseline)", b)] if b else []) \
        + ([("Nova servers of the live image (OpenStack)", res["nova"])] if "nova" in res else [])
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.6 * len(runs)), squeeze=False)
    for ax, (label, r) in zip(axes[:, 0], runs, strict=True):
        t = [x["t"] - r["step_s"] for x in r["buckets"]]
        ax.semilogy(t, [x["p99_s"] for x in r["buckets"]], "-", color="#d94f3f", label="p99 latency")
        ax.semilogy(t, [x["p50_s"] for x in r["buckets"]], "-", color="#3f7fd9", label="p50 latency")
        if r["pre_step_p99_s"]:
            ax.axhline(2 * r["pre_step_p99_s"], color="#d94f3f", ls=":", lw=1, label="2x pre-step p99")
        ax.axvline(0, color="grey", lw=1)
        ax.axvline(r["drop_s"] - r["step_s"], color="grey", lw=1, ls="--")
        ax.set_ylabel("latency (s)")
        ax.set_xlabel("seconds from the load step (dashed: the drop)")
        ax2 = ax.twinx()
        m = r["members_over_time"]
        ax2.step([x[0] - r["step_s"] for x in m], [x[1] for x in m], where="post", color="#3f9f3f", label="members serving")
        ax2.set_ylim(0, r["ten"] + 1)
        ax2.set_ylabel("members")
        ten = r["scale_out_to_10_s"]
        ax.set_title(f"{label}: {r['ten']} serving {ten:.2f} s after the step" if ten is not None else f"{label}: never {r['ten']}")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [str(x.get_label()) for x in lines], loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return md, fig


# ---- on OpenStack: the members are Nova servers ------------------------------------------------

def run_openstack(root: Path, computes: int = 2, keep: bool = False, work_ms: int = 200, low_rps: float = 5.0,
                  high_rps: float = 110.0, pre_s: float = 8.0, hold_s: float = 15.0, max_size: int = 10, target: float = 2.0,
                  maxconn: int = 4, delay_s: float = 5.0, max_hold_s: float = 150.0) -> dict[str, Any]:
    """The same step on a group whose members are Nova servers of a live image (vmstream.openstack.autoscale),
    on the one-machine deployment (brought up if need be, with `computes` vmstream computes)."""
    from vmstream.bench.openstack import Cluster, deployment
    from vmstream.lb import Balancer
    from vmstream.openstack.autoscale import NovaGroup, NovaGroupSpec, agent_locator
    from vmstream.openstack.deploy.cloud import Cloud

    with deployment(root, computes, keep) as dep, Cloud(dep.credentials()) as cloud:
        agents = {a.host: a for a in (c.agent for c in dep.computes) if a is not None}
        cluster = Cluster(cloud, agents)
        flavor, demo = cloud.ensure_flavor(), cloud.ensure_demo_image()
        made: list[str] = []
        live_id: str | None = None
        try:
            say(f"openstack autoscale: a source server of the demo guest, its live image ({len(agents)} computes)")
            src = cluster.batch("as-src", demo, flavor, 1)
            made += src.ids
            live_id = cloud.live_image(src.ids[0], "as-live")

            def vm_on(host: str, name: str) -> dict[str, Any] | None:
                vm: dict[str, Any] | None = cluster.agent(host, "GET", f"/v1/vms/{name}") if host in agents else None
                return vm

            port = _free_port()
            spec = NovaGroupSpec("as-group", live_id, flavor, 1, max_size, target, maxconn, delay_s)
            group = NovaGroup(cloud, spec, Balancer("as-group", root / "lb", port), agent_locator(vm_on))
            t_create = time.perf_counter()
            group.start()
            say(f"group on port {port} with 1 Nova server serving after {time.perf_counter() - t_create:.2f} s")
            spread: dict[str, int] = {}
            active_at: list[float] = []

            def members() -> tuple[int, int]:
                serving = len(group.serving())
                if serving >= max_size and not active_at:
                    active_at.append(time.monotonic())
                    spread.update(group.hosts())
                return serving, len(group.members)

            try:
                t0 = time.monotonic()
                res = asyncio.run(_drive(members, port, work_ms=work_ms, low_rps=low_rps, high_rps=high_rps, pre_s=pre_s,
                                         hold_s=hold_s, max_size=max_size, max_hold_s=max_hold_s, delay_s=delay_s))
            finally:
                group.close()
                shutil.rmtree(root / "lb", ignore_errors=True)
        finally:
            with contextlib.suppress(Exception):
                if made:
                    cloud.delete_servers(made)
            if live_id:
                with contextlib.suppress(Exception):
                    cloud.delete_image(live_id)
            cluster.close()
    res["active_10_s"] = round(active_at[0] - t0 - pre_s, 3) if active_at else None
    res["hosts_at_10"] = spread
    return {
        "bench": "autoscale-openstack", "computes": sorted(agents), "work_ms": work_ms, "low_rps": low_rps, "high_rps": high_rps,
        "max_size": max_size, "target_inflight": target, "member_maxconn": maxconn, "scale_in_delay_s": delay_s,
        "openstack_scale_out_to_10_s": res["scale_out_to_10_s"], "openstack_active_10_s": res["active_10_s"],
        "openstack_hosts_at_10": spread, "openstack_failed_requests": res["failed_requests"],
        "openstack_reset_requests": res["reset_requests"], "openstack_p99_recovered_s": res["p99_recovered_s"],
        "openstack_scale_in_s": res["scale_in_s"], "nova": res,
    }
