"""`bench capture`: how long live-image create pauses the VM, vs guest RAM size.

For a booted VM the pause covers reading its private pages (all it wrote
since boot); for a clone only the pages it changed since its image, so the
pause should stay small whatever the RAM size. The figure is the agent's own
pause measurement (QMP stop to QMP cont), reported in each ImageInfo.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from vmstream.bench.common import Bench, say
from vmstream.bench.report import md_table, pyplot
from vmstream.bench.stats import summary

TARGETS_MS = {"booted_256": 100.0, "clone": 30.0}  # from the issue


def _pauses(bench: Bench, vm: str, runs: int, tag: str, keep_first: bool) -> tuple[list[float], list[int], str | None]:
    pauses, stored, kept = [], [], None
    for r in range(runs):
        name = bench.name("img", tag, r)
        img = bench.create_image(vm, name)
        pauses.append(float(img["pause_ms"]))
        stored.append(int(img["memory_bytes_stored"]))
        if keep_first and kept is None:
            kept = name
        else:
            bench.delete_image(name)
    return pauses, stored, kept


def run(bench: Bench, sizes: Sequence[int] = (256, 1024, 2048, 4096), runs: int = 3) -> dict[str, Any]:
    facts = bench.facts()
    say(f"capture: sizes {list(sizes)} MiB, {runs} captures of a booted VM and of a clone per size")
    rows = []
    for mib in sizes:
        vm = bench.name("vm", mib)
        _, boot_s = bench.boot(vm, mib)
        time.sleep(1.0)
        booted, booted_stored, image = _pauses(bench, vm, runs, f"{mib}b", keep_first=True)
        assert image is not None
        bench.destroy(vm)
        vms, _ = bench.start(image, 1, bench.name("cl", mib))
        clone = vms[0]["name"]
        time.sleep(1.0)
        cloned, _, _ = _pauses(bench, clone, runs, f"{mib}c", keep_first=False)
        bench.destroy(clone)
        bench.delete_image(image)
        b, c = summary(booted, 2), summary(cloned, 2)
        say(f"{mib} MiB: pause booted {b['median']:.1f} ms, clone {c['median']:.1f} ms")
        rows.append({"mib": mib, "booted_pause_ms": b["median"], "clone_pause_ms": c["median"], "booted": b, "clone": c,
                     "booted_stored_bytes": booted_stored[0], "cold_boot_s": round(boot_s, 3)})
    by_mib = {r["mib"]: r for r in rows}
    first = by_mib.get(256, rows[0])
    return {
        "bench": "capture",
        "accelerator": facts.accelerator,
        "pause_ms_booted_256m": by_mib[256]["booted_pause_ms"] if 256 in by_mib else None,
        "pause_ms_clone": first["clone_pause_ms"],
        "pause_ms_clone_mib": first["mib"],
        "sizes": rows,
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    rows = [[f"{r['mib']} MiB", f"{r['booted_pause_ms']:.1f} ms", f"{r['booted']['p90']:.1f} ms", f"{r['booted_stored_bytes'] >> 20} MiB",
             f"{r['clone_pause_ms']:.1f} ms", f"{r['clone']['p90']:.1f} ms"] for r in res["sizes"]]
    md = (
        f"VM pause during live-image create (QMP stop to cont, as the agent measures it), median and p90 of "
        f"{len(res['sizes'][0]['booted']['runs'])} captures, {res['accelerator']}. Targets: booted 256 MiB "
        f"<= {TARGETS_MS['booted_256']:.0f} ms, clone <= {TARGETS_MS['clone']:.0f} ms.\n\n"
        + md_table(["guest RAM", "booted VM", "p90", "its image data", "clone", "p90"], rows)
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    mibs = [r["mib"] for r in res["sizes"]]
    ax.plot(mibs, [r["booted_pause_ms"] for r in res["sizes"]], "o-", color="#d98c3f", label="booted VM")
    ax.plot(mibs, [r["clone_pause_ms"] for r in res["sizes"]], "s-", color="#3f7fd9", label="clone")
    ax.axhline(TARGETS_MS["booted_256"], color="#d98c3f", ls=":", lw=1, label="target, booted 256 MiB")
    ax.axhline(TARGETS_MS["clone"], color="#3f7fd9", ls=":", lw=1, label="target, clone")
    ax.set_xscale("log", base=2)
    ax.set_xticks(mibs, [f"{m} MiB" if m < 1024 else f"{m // 1024} GiB" for m in mibs])
    ax.set_xlabel("guest RAM")
    ax.set_ylabel("pause (ms, median)")
    ax.set_title(f"Live-image create pause ({res['accelerator']})")
    ax.grid(alpha=0.3)
    ax.legend()
    return md, fig
