"""`bench scale`: start time vs guest RAM size, clone vs QEMU's full restore.

Per size, one agent VM and one directly driven QEMU VM boot side by side.
Both are measured twice: freshly booted (idle: about 100 MiB of the RAM holds
data, whatever the size) and after the guest filled 75% of its RAM
with memcheck (a VM that has used its memory: heap, page cache). QEMU's restore
must read and place every non-zero page; a clone maps the image's memory file
and faults in only what the guest touches, so its time should stay flat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.bench import baseline
from vmstream.bench.common import CLONE_SPACING_S, Bench, say
from vmstream.bench.report import fmt_s, fmt_x, md_table, pyplot
from vmstream.bench.stats import median, ratio, summary

TARGETS_X = {1024: 5.0, 4096: 20.0}  # from the issue: speed-up over QEMU restore at least


def fill_mib(mib: int) -> int:
    """75% of guest RAM, leaving the 256 MiB guest's kernel about 96 MiB."""
    return min(mib * 3 // 4, mib - 96)


CLONE_EXTRA_RUNS = 2


async def _clone_times(bench: Bench, image: str, runs: int, prefix: str) -> list[float]:
    times = []
    for r in range(runs):
        await asyncio.sleep(CLONE_SPACING_S if r else 0)
        vms, t = await asyncio.to_thread(bench.start, image, 1, bench.name(prefix, r))
        times.append(t)
        await asyncio.to_thread(bench.destroy, vms[0]["name"])
    return times


async def _one_size(bench: Bench, mib: int, runs: int, fill: bool) -> dict[str, Any]:
    vm_name = bench.name("vm", mib)
    side = AgentClient(bench.data_dir)  # own connection for the boot running in a thread
    try:
        (_, agent_boot_s), bvm = await asyncio.gather(asyncio.to_thread(bench.boot, vm_name, mib, side), baseline.boot(bench, mib))
    finally:
        side.close()
    say(f"{mib} MiB: booted (agent {agent_boot_s:.1f} s, direct QEMU {bvm.boot_s:.1f} s)")
    variants: dict[str, dict[str, Any]] = {}
    images: dict[str, str] = {}
    try:
        await asyncio.sleep(1.0)
        for variant in ("idle", "filled") if fill else ("idle",):
            if variant == "filled":
                n = fill_mib(mib)
                cmd = f"memcheck-fill {n} 7"
                ask = {"command": cmd, "timeout": 300}
                a, b = await asyncio.gather(
                    asyncio.to_thread(AgentClient(bench.data_dir).call, "POST", f"/v1/vms/{vm_name}/guest", json=ask),
                    baseline.ask_guest(bvm.proc, cmd, 300),
                )
                if not (a.get("ok") and b.get("ok")):
                    raise RuntimeError(f"memcheck-fill {n} failed: agent VM {a}, direct VM {b}")
                say(f"{mib} MiB: both guests filled {n} MiB")
            images[variant] = bench.name("img", mib, variant)
            img = await asyncio.to_thread(bench.create_image, vm_name, images[variant])
            state = bench.scratch / f"{mib}-{variant}.mig"
            saved = await baseline.save(bvm, state, resume=True)
            variants[variant] = {
                "fill_mib": fill_mib(mib) if variant == "filled" else 0, "state": state, "saved": saved, "image": img,
            }
            say(f"{mib} MiB {variant}: image pause {img['pause_ms']:.1f} ms, {img['memory_bytes_stored'] >> 20} MiB stored; "
                f"QEMU save {saved['save_s']:.2f} s, {saved['state_bytes'] >> 20} MiB")
    finally:
        await bvm.proc.stop()
        await asyncio.to_thread(bench.destroy, vm_name)
    out: dict[str, Any] = {"mib": mib, "cold_boot_s": round(agent_boot_s, 3)}
    try:
        for variant, v in variants.items():
            # more clone runs than restores: the first clone of a new image is the cold one (it
            # fills the host's page cache and the agent's clone pool), the median shows the rest
            clones = await _clone_times(bench, images[variant], runs + CLONE_EXTRA_RUNS, f"c{mib}{variant[0]}")
            restores = await baseline.restore_times(bench, mib, v["saved"]["ident"], v["state"], runs)
            c, r = summary(clones), summary(restores)
            out[variant] = {
                "fill_mib": v["fill_mib"],
                "clone_s": c["median"], "clone_p90_s": c["p90"],
                "qemu_restore_s": r["median"], "qemu_restore_p90_s": r["p90"],
                "speedup_vs_qemu_restore": ratio(median(restores), median(clones)),
                "clone": c, "qemu_restore": r,
                "qemu_save_s": round(v["saved"]["save_s"], 3), "qemu_state_bytes": v["saved"]["state_bytes"],
                "image_pause_ms": v["image"]["pause_ms"], "image_stored_bytes": v["image"]["memory_bytes_stored"],
            }
            say(f"{mib} MiB {variant}: clone {c['median']:.3f} s, QEMU restore {r['median']:.3f} s "
                f"({out[variant]['speedup_vs_qemu_restore']}x)")
    finally:
        for variant, v in variants.items():
            v["state"].unlink(missing_ok=True)
            await asyncio.to_thread(bench.delete_image, images[variant])
    return out


def run(bench: Bench, sizes: Sequence[int] = (256, 1024, 2048, 4096), runs: int = 3, fill: bool = True) -> dict[str, Any]:
    facts = bench.facts()
    say(f"scale: sizes {list(sizes)} MiB, {runs + CLONE_EXTRA_RUNS} clones and {runs} QEMU restores per size and state")
    rows, errors = [], {}
    for mib in sizes:
        try:
            rows.append(asyncio.run(_one_size(bench, mib, runs, fill)))
        except Exception as exc:  # one size failing must not lose the others' figures
            say(f"{mib} MiB failed: {exc}")
            errors[str(mib)] = str(exc)
    if not rows:
        raise RuntimeError(f"every size failed: {errors}")
    head = "filled" if fill else "idle"
    sizes_out = []
    for row in rows:
        h = row[head]
        sizes_out.append({
            "mib": row["mib"], "state": head, "clone_s": h["clone_s"], "qemu_restore_s": h["qemu_restore_s"],
            "speedup_vs_qemu_restore": h["speedup_vs_qemu_restore"], **{k: row[k] for k in row if k != "mib"},
        })
    return {
        "bench": "scale",
        "accelerator": facts.accelerator,
        "headline_state": head,
        "sizes": sizes_out,
        "speedup_vs_qemu_restore": {str(s["mib"]): s["speedup_vs_qemu_restore"] for s in sizes_out},
        "speedup_vs_qemu_restore_idle": {str(s["mib"]): s["idle"]["speedup_vs_qemu_restore"] for s in sizes_out},
        "errors": errors,
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    rows = []
    for s in res["sizes"]:
        for variant in ("idle", "filled"):
            if variant not in s:
                continue
            v = s[variant]
            label = "freshly booted" if variant == "idle" else f"{v['fill_mib']} MiB filled"
            target = TARGETS_X.get(s["mib"]) if variant == res["headline_state"] else None
            rows.append([f"{s['mib']} MiB", label, fmt_s(v["clone_s"]), fmt_s(v["qemu_restore_s"]),
                         f"**{fmt_x(v['speedup_vs_qemu_restore'])}**", f">= {target:.0f}x" if target else "-",
                         f"{v['qemu_state_bytes'] >> 20} MiB", f"{v['image_stored_bytes'] >> 20} MiB"])
    md = (
        f"Time from request (clone) or process start (QEMU restore) to the first HTTP answer, median of "
        f"{len(res['sizes'][0]['idle']['clone']['runs'])} clone runs ({CLONE_SPACING_S} s apart; the first of each image "
        f"is cold) and {len(res['sizes'][0]['idle']['qemu_restore']['runs'])} restores, {res['accelerator']}. "
        "'Freshly booted': the guest right after "
        "boot (about 100 MiB of its RAM holds data, whatever its size). 'Filled': the guest first wrote 75% of its RAM "
        "(memcheck), as a VM that has used its memory would have.\n\n"
        + md_table(["guest RAM", "guest state", "clone", "QEMU restore", "speed-up", "target", "QEMU state file",
                    "image data"], rows)
    )
    for mib, err in res.get("errors", {}).items():
        md += f"\n{mib} MiB failed: `{err}`\n"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    mibs = [s["mib"] for s in res["sizes"]]
    styles = {"idle": ("--", "freshly booted"), "filled": ("-", "filled")}
    for variant, (ls, label) in styles.items():
        if all(variant in s for s in res["sizes"]):
            ax.plot(mibs, [s[variant]["qemu_restore_s"] for s in res["sizes"]], "o" + ls, color="#d98c3f",
                    label=f"QEMU restore, {label}")
            ax.plot(mibs, [s[variant]["clone_s"] for s in res["sizes"]], "s" + ls, color="#3f7fd9",
                    label=f"vmstream clone, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(mibs, [f"{m} MiB" if m < 1024 else f"{m // 1024} GiB" for m in mibs])
    ax.set_xlabel("guest RAM")
    ax.set_ylabel("seconds to first HTTP answer (median)")
    ax.set_title(f"Start time vs guest RAM ({res['accelerator']})")
    ax.grid(alpha=0.3)
    ax.legend()
    return md, fig
