"""`bench clone`: cold boot vs clone vs QEMU's own restore, to first HTTP answer.

All three are timed the same way: from the request (for QEMU restore: from
starting the process) to the guest's first HTTP answer. Cold boots and clones
go through the agent's REST API, so the figure includes what a user waits for
(API, database, QEMU start, device load, first answer). The QEMU restore is
driven in-process with no API in the way, which only favours the baseline.

--guest debian measures the Debian disk guest (`boot --disk debian`, systemd, a
status page on port 80) the same way; its QEMU restore runs on an overlay of the
disk as it was saved. Both guests also get a burst: BURST clones started by one
request, timed until all of them answer HTTP.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmstream.bench import baseline
from vmstream.bench.common import CLONE_SPACING_S, Bench, say
from vmstream.bench.report import fmt_s, fmt_x, md_table, pyplot
from vmstream.bench.stats import median, ratio, summary
from vmstream.guest.rootfs import rootfs_path


@dataclass(frozen=True)
class Guest:
    """What `bench clone --guest` boots: the agent's disk argument and the default RAM."""

    disk: str | None
    mib: int
    label: str


GUESTS = {
    "demo": Guest(None, 256, "demo guest (initramfs, busybox)"),
    "debian": Guest("debian", 512, "Debian 12 disk guest (systemd)"),
}
BURST = 10  # clones started by one request for burst10_s (the issue: Debian, all serving within 5 s)
BURST_SETTLE_S = 2.0  # after a burst's clones are gone, before the next: the pool refills, the host calms down


def _base_disk(bench: Bench, guest: Guest) -> Path | None:
    """The disk the agent boots this guest from (built by its first cold boot)."""
    if guest.disk is None:
        return None
    if guest.disk == "debian":
        return rootfs_path(bench.data_dir / "guest" / "rootfs")
    return Path(guest.disk)


def _burst(bench: Bench, image: str, runs: int) -> tuple[list[float], list[float]]:
    """BURST clones by one request, runs times: (until all serve, until the first serves)."""
    totals: list[float] = []
    firsts: list[float] = []
    for r in range(runs):
        time.sleep(BURST_SETTLE_S)
        vms, t = bench.start(image, BURST, bench.name(f"burst{r}"))
        totals.append(t)
        firsts.append(min(v["ready_s"] for v in vms))
        say(f"burst {r + 1}/{runs}: all {BURST} serving after {t:.3f} s (first after {firsts[-1]:.3f} s)")
        bench.destroy(*(v["name"] for v in vms))
    return totals, firsts


def run(bench: Bench, mib: int | None = None, runs: int = 5, clone_runs: int = 10, guest: str = "demo",
        burst_runs: int = 3, spacing: float = CLONE_SPACING_S) -> dict[str, Any]:
    g = GUESTS[guest]
    mib = mib or g.mib
    facts = bench.facts()
    say(f"clone: accelerator {facts.accelerator}, {g.label}, {mib} MiB, {runs} cold boots, {clone_runs} clones, "
        f"{runs} QEMU restores, {burst_runs} bursts of {BURST}")
    base = _base_disk(bench, g)
    if base is not None and not base.exists():  # the agent builds it on a first boot: not a boot to time
        say(f"building the {g.label} image first (its boot is not timed)")
        bench.boot(bench.name("build"), mib, disk=g.disk)
        bench.destroy(bench.name("build"))
    cold: list[float] = []
    source = ""
    for i in range(runs):
        name = bench.name("cold", i)
        _, t = bench.boot(name, mib, disk=g.disk)
        cold.append(t)
        say(f"cold boot {i + 1}/{runs}: {t:.2f} s")
        if source:
            bench.destroy(source)
        source = name  # keep the last one: it becomes the live image
    image = bench.name("img")
    img = bench.create_image(source, image)
    bench.destroy(source)
    say(f"live image {image}: pause {img['pause_ms']:.1f} ms")
    load = {"before_clones": os.getloadavg()[0]}  # the host is shared: what else ran shows here

    clones: list[float] = []
    agent_ready: list[float] = []
    phases: dict[str, list[float]] = {}
    pooled = 0
    for i in range(clone_runs):  # as a user gets them: the agent's clone pool on (after the first)
        time.sleep(spacing if i else 0)
        vms, t = bench.start(image, 1, bench.name("clone", i))
        clones.append(t)
        agent_ready.append(vms[0]["ready_s"])
        pooled += "pool_taken" in (vms[0].get("phases") or {})
        for phase, at in (vms[0].get("phases") or {}).items():
            phases.setdefault(phase, []).append(at)
        bench.destroy(vms[0]["name"])
        say(f"clone {i + 1}/{clone_runs}: {t:.3f} s")
    unpooled: list[float] = []
    unpooled_phases: dict[str, list[float]] = {}
    for i in range(runs):  # every QEMU started anew: what the pool saves
        time.sleep(spacing)
        vms, t = bench.start(image, 1, bench.name("nopool", i), pool=False)
        unpooled.append(t)
        for phase, at in (vms[0].get("phases") or {}).items():
            unpooled_phases.setdefault(phase, []).append(at)
        bench.destroy(vms[0]["name"])
        say(f"clone without the pool {i + 1}/{runs}: {t:.3f} s")
    load["after_clones"] = os.getloadavg()[0]
    bursts, burst_firsts = _burst(bench, image, burst_runs)
    load["after_bursts"] = os.getloadavg()[0]
    bench.delete_image(image)

    state = bench.scratch / f"save-{mib}.mig"
    saved = asyncio.run(baseline.boot_and_save(bench, mib, state, _base_disk(bench, g)))
    say(f"QEMU save of a booted {mib} MiB VM: {saved['save_s']:.2f} s, {saved['state_bytes'] >> 20} MiB")
    restores = asyncio.run(baseline.restore_times(bench, mib, saved["ident"], state, runs, saved["disk"]))
    say(f"QEMU restores: {', '.join(f'{t:.3f}' for t in restores)} s")
    state.unlink(missing_ok=True)

    c, b, r, u, bu = summary(clones), summary(cold), summary(restores), summary(unpooled), summary(bursts)
    return {
        "bench": "clone",
        "guest": guest,
        "accelerator": facts.accelerator,
        "memory_mib": mib,
        "cold_boot_s": b["median"],
        "cold_boot_p90_s": b["p90"],
        "clone_s": c["median"],
        "clone_p90_s": c["p90"],
        "qemu_restore_s": r["median"],
        "qemu_restore_p90_s": r["p90"],
        "speedup_vs_boot": ratio(median(cold), median(clones)),
        "speedup_vs_qemu_restore": ratio(median(restores), median(clones)),
        "cold_boot": b,
        "clone": c,
        "clone_agent_ready": summary(agent_ready),
        "clone_pooled_runs": pooled,
        "clone_spacing_s": spacing,
        "clone_no_pool_s": u["median"],
        "clone_no_pool": u,
        "speedup_vs_boot_no_pool": ratio(median(cold), median(unpooled)),
        "clone_no_pool_phases_s": {k: round(median(v), 4) for k, v in unpooled_phases.items()},
        # The agent's own start-up phases, seconds since it took the request (median over the clones).
        "clone_phases_s": {k: round(median(v), 4) for k, v in phases.items()},
        "qemu_restore": r,
        "qemu_save_s": round(saved["save_s"], 4),
        "qemu_state_bytes": saved["state_bytes"],
        "image_pause_ms": img["pause_ms"],
        "image_stored_bytes": img["memory_bytes_stored"],
        # BURST clones started by one request (`live-image start --count 10`): until all serve HTTP
        "burst10_s": bu["median"],
        "burst10_p90_s": bu["p90"],
        "burst10": bu,
        "burst10_first_serving": summary(burst_firsts),
        "host_cpus": facts.cpus,
        "host_load_1m": {k: round(v, 2) for k, v in load.items()},
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    rows = [
        ["cold boot", len(res["cold_boot"]["runs"]), fmt_s(res["cold_boot_s"]), fmt_s(res["cold_boot_p90_s"]), "1.0x"],
        ["QEMU save/restore (migrate to file, -incoming)", len(res["qemu_restore"]["runs"]), fmt_s(res["qemu_restore_s"]),
         fmt_s(res["qemu_restore_p90_s"]), fmt_x(ratio(res["cold_boot_s"], res["qemu_restore_s"]))],
        ["vmstream clone (live-image start)", len(res["clone"]["runs"]), fmt_s(res["clone_s"]), fmt_s(res["clone_p90_s"]),
         fmt_x(res["speedup_vs_boot"])],
    ]
    if "clone_no_pool" in res:
        rows.append(["vmstream clone, clone pool off (every QEMU started anew)", len(res["clone_no_pool"]["runs"]),
                     fmt_s(res["clone_no_pool_s"]), fmt_s(res["clone_no_pool"]["p90"]), fmt_x(res["speedup_vs_boot_no_pool"])])
    if "burst10" in res:
        rows.append([f"vmstream burst: {BURST} clones by one request, until all serve", len(res["burst10"]["runs"]),
                     fmt_s(res["burst10_s"]), fmt_s(res["burst10_p90_s"]), "-"])
    guest = GUESTS[res.get("guest", "demo")]
    md = (
        f"Time from request to the guest's first HTTP answer, {guest.label}, {res['memory_mib']} MiB, {res['accelerator']}.\n\n"
        + md_table(["start", "runs", "median", "p90", "speed-up vs boot"], rows)
        + f"\nClone vs QEMU restore: **{fmt_x(res['speedup_vs_qemu_restore'])}**; clone vs cold boot: "
        f"**{fmt_x(res['speedup_vs_boot'])}**. QEMU's saved state: {res['qemu_state_bytes'] >> 20} MiB "
        f"(save took {fmt_s(res['qemu_save_s'])}); the live image's pause: {res['image_pause_ms']:.1f} ms.\n"
    )
    if res.get("clone_phases_s"):
        md += ("\nWhere a clone's time goes (the agent's phases, median, seconds after it took the request): "
               + ", ".join(f"{k} {v:.3f}" for k, v in res["clone_phases_s"].items())
               + f"; the client saw {res['clone_s']:.3f} s. {res.get('clone_pooled_runs', 0)} of the "
               f"{len(res['clone']['runs'])} clones took a QEMU from the agent's clone pool (started ahead, "
               f"state loaded, paused; the first clone of an image fills it). Clones were started one at a time, "
               f"{res.get('clone_spacing_s', 0):g} s apart (the pool refills in between), with and without the pool.\n")
    if res.get("clone_no_pool_phases_s"):
        md += ("Without the pool: " + ", ".join(f"{k} {v:.3f}" for k, v in res["clone_no_pool_phases_s"].items()) + ".\n")
    if res.get("host_load_1m"):
        md += (f"Host load average (1 min, {res['host_cpus']} cores): "
               + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in res["host_load_1m"].items()) + ".\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["cold boot", "QEMU restore", "vmstream clone"]
    keys = ["cold_boot", "qemu_restore", "clone"]
    meds = [res[k]["median"] for k in keys]
    p90s = [res[k]["p90"] for k in keys]
    bars = ax.bar(labels, meds, color=["#999999", "#d98c3f", "#3f7fd9"])
    ax.errorbar(labels, meds, yerr=[[0] * 3, [p - m for p, m in zip(p90s, meds, strict=True)]], fmt="none", ecolor="black", capsize=4)
    for bar, m in zip(bars, meds, strict=True):
        ax.annotate(f"{m:.3f} s", (bar.get_x() + bar.get_width() / 2, m), ha="center", va="bottom", xytext=(0, 3),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylabel("seconds to first HTTP answer (median, bar to p90)")
    ax.set_title(f"Start the {res.get('guest', 'demo')} guest, {res['memory_mib']} MiB ({res['accelerator']})")
    return md, fig
