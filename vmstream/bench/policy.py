"""`bench policy`: the paper's case study. N clones run a mix of memory workloads (memload:
ramps, sawtooth, spikes, a slow leak, one that wants twice its room, idle), staggered, once
with the policy off (no limits: what static allocation gives every VM) and once on (a memory
limit and a burst per clone), on one host, sampled every second.

- within_limit_fraction: samples outside bursts with the clone's private memory (its QEMU's
  RssAnon) <= its limit + 5% (policy on).
- burst_honoured_fraction: of each burst's allowed time, how long the clone kept its extra
  allowance (or until it went back under the limit on its own).
- freed_returned_15s_fraction: of what the ramp workloads free at once, the share the host got
  back within 15 s (free page reporting; policy off, so no balloon helps).
- host_memory_saving: 1 - the peak of the clones' summed private memory with the policy over
  what static allocation gives them (each its RAM); host_memory_saving_vs_no_policy: over the
  peak without the policy (where free page reporting already gives freed memory back).
- admitted_ratio: VMs a fixed budget admits with the policy (each counted for limit + burst, as
  the agent's admission does) over without (each counted for its RAM); the budget is what the
  policy run used, and all_workloads_finished says whether they all finished in it.
- slowdown: 1 - the mean of each workload's ops/s with the policy over without, for the
  workloads that fit their allowance; slowdown_over_limit: the ones that want twice their room
  (held to the limit, they swap: slower by design).
- oom_kills (the host's oom_kill counter, and workloads the guests killed), memcheck_bad_pages
  (every clone's memcheck region, verified at the end), controller_cpu_fraction (the agent's
  memory controller's CPU time over the run's wall time, of one core).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from vmstream.bench.common import MIB, Bench, mem_available, say
from vmstream.bench.report import md_table, pyplot
from vmstream.bench.stats import ratio
from vmstream.host.footprint import rss_anon

SWAP_MIB = 192  # each guest's zram swap: where a guest held to its limit puts what it cannot keep
ROOM_MIB = 64  # a clone's limit: what it costs at start plus this
BURST_MIB, BURST_S = 32, 8.0
FREE_WINDOW_S = 15.0


def _patterns(length_s: float) -> list[tuple[str, list[tuple[float, float]]]]:
    """(name, phases (MiB, seconds)) of each workload kind, lasting about length_s. All but
    the last fit in the room a clone's limit leaves it (ROOM_MIB), the spike with its burst;
    the last wants twice that room (the grinder's test: held to its limit, it must finish)."""
    u = length_s / 60
    return [
        ("ramp, hold, free", [(48, 8 * u), (48, 20 * u), (0, 0), (0, 20 * u)]),
        ("sawtooth", [(48.0, 5 * u), (0.0, 0.0), (0.0, 5 * u)] * 3 + [(0.0, 15 * u)]),
        ("spike", [(16, 10 * u), (80, 0), (80, min(5.0, 5 * u)), (16, 0), (16, 30 * u)]),
        ("slow leak", [(8, 0), (56, 50 * u)]),
        ("idle", [(0, 50 * u)]),
        ("twice its room", [(2 * ROOM_MIB, 8 * u), (2 * ROOM_MIB, 20 * u), (0, 0), (0, 20 * u)]),
    ]


OVER = "twice its room"


def _phases(phases: list[tuple[float, float]], delay: float) -> str:
    return " ".join(f"{m:g}:{s:.1f}" for m, s in [(0, delay), *phases])


def _rss_anon(pid: int) -> int:
    """The clone's private memory, as the controller counts it; 0 once it is gone."""
    try:
        return rss_anon(pid)
    except OSError:
        return 0


def _oom_kills() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _one_run(bench: Bench, image: str, count: int, ram_mib: int, length_s: float, policy: bool) -> dict[str, Any]:
    label = "on" if policy else "off"
    vms, _ = bench.start(image, count, bench.name(label))
    names = [v["name"] for v in vms]
    pids = {v["name"]: int(v["pid"]) for v in vms}
    for n in names:
        answer = bench.call("POST", f"/v1/vms/{n}/guest", json={"command": f"swap {SWAP_MIB}", "timeout": 30})
        if not answer.get("ok"):
            raise RuntimeError(f"swap in {n}: {answer}")
    time.sleep(2)
    base = {n: _rss_anon(pids[n]) for n in names}
    limits = {n: (base[n] >> 20 << 20) + ROOM_MIB * MIB for n in names}
    if policy:
        for n in names:
            bench.call("PUT", f"/v1/vms/{n}/memory", json={"limit_bytes": limits[n], "burst_bytes": BURST_MIB * MIB, "burst_s": BURST_S})
    kinds = _patterns(length_s)
    plan = {n: (kinds[i % len(kinds)], (i * 1.5) % 10) for i, n in enumerate(names)}
    say(f"policy {label}: {count} clones, workloads staggered over 10 s, ~{length_s:.0f} s each")
    oom0, cpu0 = _oom_kills(), bench.call("GET", "/v1/host/memory")["controller_cpu_s"]
    t0 = time.monotonic()
    for n in names:
        (_, phases), delay = plan[n]
        bench.call("POST", f"/v1/vms/{n}/guest", json={"command": "memload " + _phases(phases, delay), "timeout": 30})
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            t = time.monotonic() - t0
            mp = bench.call("GET", "/v1/host/memory")
            samples.append({
                "t": round(t, 2), "mem_available": mem_available(), "pressure": mp.get("memory_pressure"),
                "private": {n: _rss_anon(pids[n]) for n in names},
                "allowed": {n: (mp["vms"].get(n) or {}).get("allowed_bytes") for n in names},
                "bursting": {n: bool((mp["vms"].get(n) or {}).get("bursting")) for n in names},
            })
            stop.wait(max(0.0, 1.0 - (time.monotonic() - t0 - t) % 1.0))

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + length_s * 4 + 60
    try:
        while len(results) < len(names) and time.monotonic() < deadline:
            time.sleep(2)
            for n in names:
                if n in results:
                    continue
                a = bench.call("POST", f"/v1/vms/{n}/guest", json={"command": "memload-status", "timeout": 30})
                r = a.get("result") or {}
                if not a.get("running"):
                    results[n] = {"state": r.get("state", "killed"), "mean_ops_per_s": r.get("mean_ops_per_s"),
                                  "stalled_s": r.get("stalled_s"), "seconds": r.get("seconds")}
        time.sleep(FREE_WINDOW_S if not policy else 2)
    finally:
        stop.set()
        thread.join()
    wall = time.monotonic() - t0
    cpu = bench.call("GET", "/v1/host/memory")["controller_cpu_s"] - cpu0
    bad = 0
    for n in names:
        v = bench.call("POST", f"/v1/vms/{n}/guest", json={"command": "memcheck-verify", "timeout": 120})
        bad += int((v.get("result") or {}).get("bad_pages", 1)) if v.get("ok") else 1
    bench.destroy(*names)
    return {
        "policy": policy, "count": count, "ram_mib": ram_mib, "wall_s": round(wall, 1), "controller_cpu_s": round(cpu, 3),
        "limits": limits, "base": base, "plan": {n: [plan[n][0][0], plan[n][1]] for n in names},
        "phases": {n: _phases(plan[n][0][1], plan[n][1]) for n in names},
        "results": results, "unfinished": [n for n in names if results.get(n, {}).get("state") != "done"],
        "oom_kills": _oom_kills() - oom0, "memcheck_bad_pages": bad, "samples": samples,
    }


def _in_burst(s: dict[str, Any], n: str, limit: int) -> bool:
    """A burst window: the controller says so, or the clone is over its limit while its
    burst is still there to take (the controller had not looked yet: going over starts it)."""
    allowed = s["allowed"].get(n)
    return bool(s["bursting"].get(n)) or (allowed is not None and allowed > limit and s["private"][n] > limit)


def _within(on: dict[str, Any]) -> float | None:
    ok = total = 0
    for s in on["samples"]:
        for n, p in s["private"].items():
            if _in_burst(s, n, on["limits"][n]):
                continue
            total += 1
            ok += p <= on["limits"][n] * 1.05
    return round(ok / total, 4) if total else None


def _bursts(on: dict[str, Any]) -> float | None:
    """Per burst: how long the extra allowance lasted, up to the burst's length, over its length;
    a clone back under its limit on its own before that counts as honoured."""
    fractions = []
    for n, limit in on["limits"].items():
        start = None
        for s in on["samples"]:
            if s["bursting"].get(n) and start is None:
                start = s["t"]
            elif start is not None and not s["bursting"].get(n):
                back = s["private"][n] <= limit
                fractions.append(1.0 if back else min(1.0, (s["t"] - start) / BURST_S))
                start = None
    return round(sum(fractions) / len(fractions), 3) if fractions else None


def _freed(off: dict[str, Any]) -> float | None:
    """For the ramp workloads: private memory just before they free, and 15 s after."""
    freed = returned = 0.0
    for n, (kind, delay) in off["plan"].items():
        if kind not in ("ramp, hold, free", OVER):
            continue
        phases = next(p for k, p in _patterns(float(off["length_s"])) if k == kind)
        at = delay + phases[0][1] + phases[1][1]  # the free, seconds after the workloads began
        before = [s["private"][n] for s in off["samples"] if at - 3 <= s["t"] <= at - 0.5]
        after = [s["private"][n] for s in off["samples"] if at + FREE_WINDOW_S - 1 <= s["t"] <= at + FREE_WINDOW_S]
        if before and after:
            freed += phases[0][0] * MIB
            returned += max(before) - min(after)
    return round(returned / freed, 3) if freed else None


def _slowdown(off: dict[str, Any], on: dict[str, Any], fits: bool) -> float | None:
    """1 - the mean over workloads of (ops/s with the policy / without), the same workload in
    the same place of each run; fits: those within their allowance, else the one over it."""
    ratios = []
    for (n_off, (kind, _)), n_on in zip(off["plan"].items(), on["plan"], strict=True):
        a, b = off["results"].get(n_off, {}).get("mean_ops_per_s"), on["results"].get(n_on, {}).get("mean_ops_per_s")
        if (kind != OVER) == fits and a and b:
            ratios.append(b / a)
    return round(1 - sum(ratios) / len(ratios), 3) if ratios else None


def _peak(run: dict[str, Any]) -> int:
    return max((sum(s["private"].values()) for s in run["samples"]), default=0)


def run(bench: Bench, count: int = 12, ram_mib: int = 384, length_s: float = 60.0) -> dict[str, Any]:
    facts = bench.facts()
    say(f"policy: {count} clones of a {ram_mib} MiB guest, policy off then on, workloads of ~{length_s:.0f} s")
    src, image = bench.name("src"), bench.name("img")
    bench.boot(src, ram_mib)
    if not bench.call("POST", f"/v1/vms/{src}/guest", json={"command": "memcheck-fill 16 77", "timeout": 120}).get("ok"):
        raise RuntimeError("memcheck-fill in the source VM failed")
    bench.create_image(src, image)
    bench.destroy(src)
    runs = {}
    for policy in (False, True):
        r = _one_run(bench, image, count, ram_mib, length_s, policy)
        r["length_s"] = length_s
        runs["on" if policy else "off"] = r
    bench.delete_image(image)
    off, on = runs["off"], runs["on"]
    budget = sum(on["limits"].values()) + count * BURST_MIB * MIB
    static = budget // (ram_mib * MIB)
    return {
        "bench": "policy", "accelerator": facts.accelerator, "clones": count, "ram_mib": ram_mib, "length_s": length_s,
        "room_mib": ROOM_MIB, "burst": f"{BURST_MIB} MiB for {BURST_S:g} s", "swap_mib": SWAP_MIB,
        "within_limit_fraction": _within(on),
        "burst_honoured_fraction": _bursts(on),
        "freed_returned_15s_fraction": _freed(off),
        "host_memory_saving": round(1 - _peak(on) / (count * ram_mib * MIB), 3),
        "host_memory_saving_vs_no_policy": round(1 - _peak(on) / _peak(off), 3) if _peak(off) else None,
        "admitted_ratio": ratio(count, static, 2) if static else None,
        "all_workloads_finished": not on["unfinished"] and not off["unfinished"],
        "slowdown": _slowdown(off, on, fits=True),
        "slowdown_over_limit": _slowdown(off, on, fits=False),
        "oom_kills": on["oom_kills"] + off["oom_kills"],
        "memcheck_bad_pages": on["memcheck_bad_pages"] + off["memcheck_bad_pages"],
        "controller_cpu_fraction": round(on["controller_cpu_s"] / on["wall_s"], 4) if on["wall_s"] else None,
        "peak_private_bytes": {"off": _peak(off), "on": _peak(on)},
        "budget_bytes": budget, "static_admits": static,
        "detail": runs,
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    keys = ["within_limit_fraction", "burst_honoured_fraction", "freed_returned_15s_fraction", "host_memory_saving",
            "host_memory_saving_vs_no_policy", "admitted_ratio", "all_workloads_finished", "slowdown", "slowdown_over_limit",
            "oom_kills", "memcheck_bad_pages", "controller_cpu_fraction"]
    md = (
        f"{res['clones']} clones of a {res['ram_mib']} MiB demo guest ({res['accelerator']}), each a memload workload "
        f"(~{res['length_s']:.0f} s, staggered), zram swap of {res['swap_mib']} MiB in each guest; policy on: a limit of what "
        f"the clone cost at start + {res['room_mib']} MiB, burst {res['burst']}.\n\n"
        + md_table(["figure", "value"], [[k, res[k]] for k in keys])
        + f"\nPeak of the clones' summed private memory: off {res['peak_private_bytes']['off'] / MIB:.0f} MiB, "
        f"on {res['peak_private_bytes']['on'] / MIB:.0f} MiB.\n"
    )
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, key in zip(axes, ("off", "on"), strict=True):
        run = res["detail"][key]
        ts = [s["t"] for s in run["samples"]]
        for n in run["limits"]:
            ax.plot(ts, [s["private"][n] / MIB for s in run["samples"]], lw=1)
        ax.plot(ts, [sum(s["private"].values()) / MIB / len(run["limits"]) for s in run["samples"]], "k--", lw=2, label="mean")
        ax.set_title(f"policy {key}: each clone's private memory")
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("MiB")
    fig.tight_layout()
    return md, fig
