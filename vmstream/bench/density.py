"""`bench density`: host memory per VM, clones vs cold boots vs QEMU restores.

For each kind, VMs are added up to each N, then (after settling) two figures
are taken: the sum of the QEMU processes' PSS (/proc/PID/smaps_rollup), and
the drop in MemAvailable since before the first VM of that kind. Marginal
bytes per VM are the least-squares slope against N, so costs every VM shares
(QEMU's binary and libraries, a clone image's page cache) cancel out. Only
one kind runs at a time. MemAvailable is host-wide, so other work on the
host shows in it; PSS is per process and is the headline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.bench import baseline
from vmstream.bench.common import MIB, Bench, mem_available, pss, say
from vmstream.bench.report import fmt_mib, fmt_x, md_table, pyplot
from vmstream.bench.stats import ratio, slope

SETTLE_S = 3.0
TARGET_RATIO = 6.0


def _measure(pids: list[int], base_avail: int) -> dict[str, int]:
    time.sleep(SETTLE_S)
    return {"pss_bytes": sum(pss(p) for p in pids), "memavailable_drop_bytes": base_avail - mem_available()}


def _fit(points: list[dict[str, int]]) -> dict[str, Any]:
    ns = [p["n"] for p in points]
    return {
        "points": points,
        "marginal_pss_bytes": round(slope(ns, [p["pss_bytes"] for p in points])),
        "marginal_memavailable_bytes": round(slope(ns, [p["memavailable_drop_bytes"] for p in points])),
    }


def _agent_pids(bench: Bench, names: list[str]) -> list[int]:
    return [int(bench.call("GET", f"/v1/vms/{n}")["pid"]) for n in names]


def _grow(counts: Sequence[int], add: Callable[[int, int], None], pids: Callable[[], list[int]]) -> list[dict[str, int]]:
    """Add VMs up to each count (add(have, want)), measuring after each step."""
    base = mem_available()
    have, points = 0, []
    for n in counts:
        add(have, n)
        have = n
        m = _measure(pids(), base)
        points.append({"n": n, **m})
        say(f"  N={n}: PSS sum {m['pss_bytes'] / MIB:.0f} MiB, MemAvailable drop {m['memavailable_drop_bytes'] / MIB:.0f} MiB")
    return points


def _clones(bench: Bench, mib: int, counts: Sequence[int]) -> list[dict[str, int]]:
    source = bench.name("src")
    bench.boot(source, mib)
    image = bench.name("img")
    bench.create_image(source, image)
    bench.destroy(source)
    names: list[str] = []

    def add(have: int, want: int) -> None:
        vms, _ = bench.start(image, want - have, bench.name("clone"))
        names.extend(v["name"] for v in vms)

    try:
        say("density: clones")
        return _grow(counts, add, lambda: _agent_pids(bench, names))
    finally:
        bench.destroy(*names)
        bench.delete_image(image)


def _cold(bench: Bench, mib: int, counts: Sequence[int]) -> list[dict[str, int]]:
    names: list[str] = []

    def add(have: int, want: int) -> None:
        errors: list[BaseException] = []

        def one(i: int) -> None:
            client = AgentClient(bench.data_dir)
            try:
                bench.boot(bench.name("cold", i), mib, client)
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        new = list(range(have, want))
        names.extend(bench.name("cold", i) for i in new)
        threads = [threading.Thread(target=one, args=(i,)) for i in new]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    try:
        say("density: cold-booted VMs")
        return _grow(counts, add, lambda: _agent_pids(bench, names))
    finally:
        bench.destroy(*names)


async def _restored(bench: Bench, mib: int, counts: Sequence[int]) -> list[dict[str, int]]:
    state = bench.scratch / f"density-{mib}.mig"
    saved = await baseline.boot_and_save(bench, mib, state)
    vms: list[baseline.BaselineVm] = []

    try:
        say("density: QEMU-restored VMs")
        base = mem_available()
        have, points = 0, []
        for n in counts:
            for _ in range(n - have):
                vms.append(await baseline.restore(bench, mib, saved["ident"], state))
            have = n
            m = await asyncio.to_thread(_measure, [v.proc.pid for v in vms if v.proc.pid], base)
            points.append({"n": n, **m})
            say(f"  N={n}: PSS sum {m['pss_bytes'] / MIB:.0f} MiB, MemAvailable drop {m['memavailable_drop_bytes'] / MIB:.0f} MiB")
        return points
    finally:
        await asyncio.gather(*(v.proc.stop() for v in vms), return_exceptions=True)
        state.unlink(missing_ok=True)


def run(bench: Bench, mib: int = 256, counts: Sequence[int] = (1, 2, 4, 8)) -> dict[str, Any]:
    facts = bench.facts()
    say(f"density: {mib} MiB guests, N = {list(counts)}")
    clone = _fit(_clones(bench, mib, counts))
    cold = _fit(_cold(bench, mib, counts))
    restored = _fit(asyncio.run(_restored(bench, mib, counts)))
    mc, mk, mr = clone["marginal_pss_bytes"], cold["marginal_pss_bytes"], restored["marginal_pss_bytes"]
    return {
        "bench": "density",
        "accelerator": facts.accelerator,
        "memory_mib": mib,
        "counts": list(counts),
        "marginal_clone_bytes": mc,
        "marginal_cold_bytes": mk,
        "marginal_qemu_restore_bytes": mr,
        "density_ratio": ratio(mk, mc, 2),
        "density_ratio_vs_qemu_restore": ratio(mr, mc, 2),
        "density_ratio_memavailable": ratio(cold["marginal_memavailable_bytes"], clone["marginal_memavailable_bytes"], 2),
        "clone": clone,
        "cold": cold,
        "qemu_restore": restored,
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    kinds = [("cold boot", "cold"), ("QEMU restore", "qemu_restore"), ("vmstream clone", "clone")]
    c = res["clone"]
    rows = [[label, fmt_mib(res[k]["marginal_pss_bytes"]), fmt_mib(res[k]["marginal_memavailable_bytes"]),
             fmt_x(ratio(res[k]["marginal_pss_bytes"], c["marginal_pss_bytes"])),
             fmt_mib(res[k]["points"][-1]["pss_bytes"])] for label, k in kinds]
    md = (
        f"{res['memory_mib']} MiB guests, idle after start, N = {', '.join(map(str, res['counts']))}; marginal bytes per VM are "
        f"the least-squares slope of the total against N ({res['accelerator']}).\n\n"
        + md_table(["VM kind", "marginal PSS per VM", "marginal MemAvailable drop per VM", "vs clone",
                    f"PSS sum at N={res['counts'][-1]}"], rows)
        + f"\nDensity ratio (cold boot / clone, PSS): **{fmt_x(res['density_ratio'])}** (target >= {TARGET_RATIO:.0f}x); "
        f"by MemAvailable: {fmt_x(res['density_ratio_memavailable'])}; QEMU restore / clone: "
        f"{fmt_x(res['density_ratio_vs_qemu_restore'])}.\n"
    )
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"cold": "#999999", "qemu_restore": "#d98c3f", "clone": "#3f7fd9"}
    for label, k in kinds:
        pts = res[k]["points"]
        ns = [p["n"] for p in pts]
        ax1.plot(ns, [p["pss_bytes"] / MIB for p in pts], "o-", color=colors[k], label=label)
        ax2.plot(ns, [p["memavailable_drop_bytes"] / MIB for p in pts], "o-", color=colors[k], label=label)
    ax1.set_title("sum of QEMU PSS")
    ax2.set_title("drop in host MemAvailable")
    for ax in (ax1, ax2):
        ax.set_xlabel("VMs running (N)")
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Host memory vs number of {res['memory_mib']} MiB VMs ({res['accelerator']})")
    return md, fig
