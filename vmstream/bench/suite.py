"""`bench all`: every bench in one invocation, and docs/benchmarks.md from the results.

Order matters on a 2-core host: the clone bench (cold boot timing) runs
first on a quiet host; the memory-heavy scale bench (4 GiB guests) and the
density bench run last.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.bench import burst, capture, clone, density, migrate, policy, scale, stream, targets
from vmstream.bench.common import Bench, meminfo, say
from vmstream.bench.report import command_line, run_and_write

SECTIONS = [
    ("clone", "Cold boot vs clone vs QEMU save/restore", clone),
    ("capture", "Live-image create pause", capture),
    ("burst", "Burst: N clones at once", burst),
    ("scale", "Start time vs guest RAM size", scale),
    ("density", "Density: host memory per VM", density),
    ("stream", "Streaming memory: cold and warm hosts, prefetch, RAM size", stream),
    ("migrate", "Migration between hosts", migrate),
    ("policy", "Memory policy: limits, bursts, what comes back", policy),
]
# Benches `bench all` does not run (the Debian guest needs debootstrap and adds ~5 min; autoscale brings
# OpenStack up), but whose
# latest output in the same out dir goes into the document, under the command that wrote it.
SEPARATE = [
    ("clone-debian", "Debian disk guest: cold boot vs clone vs QEMU save/restore, burst of 10",
     "vmstream bench clone --guest debian --out docs/bench"),
    ("autoscale", "Autoscaling: a load step on a group of clones behind HAProxy, vs cold-booted members, and through Nova",
     "vmstream bench autoscale --openstack --out docs/bench"),
]


def source_revision() -> str:
    """git commit of the vmstream source being measured (where vmstream.qemu is), '+dirty' if it has uncommitted changes."""
    import vmstream.qemu

    src = Path(vmstream.qemu.__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_all(client: AgentClient, out: Path, doc: Path, runs: int | None, sizes: list[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    source = source_revision()  # before the run writes its own outputs into the tree
    results: dict[str, Any] = {}
    durations: dict[str, float] = {}
    errors: dict[str, str] = {}
    for key, _, mod in SECTIONS:
        bench = Bench(out, client)
        kw: dict[str, Any] = {}
        if key in ("scale", "capture"):
            kw["sizes"] = sizes
        if runs is not None and key not in ("density", "migrate", "policy"):
            kw["runs"] = runs
        t = time.perf_counter()
        try:
            with bench.session():
                results[key] = run_and_write(mod, bench, out, **kw)
        except Exception as exc:  # one bench failing must not throw away the others' figures
            errors[key] = f"{type(exc).__name__}: {exc}"
            say(f"{key} FAILED: {errors[key]}")
        durations[key] = round(time.perf_counter() - t, 1)
        say(f"{key} took {durations[key]:.0f} s")
    total = time.perf_counter() - t0
    rows = targets.check(results, total)
    facts = Bench(out, client).facts()
    summary = {
        "bench": "all",
        "command": command_line(),
        "source": source,
        "started_at": started.isoformat(timespec="seconds"),
        "total_s": round(total, 1),
        "durations_s": durations,
        "host": {"cpus": facts.cpus, "mem_total_bytes": meminfo()["MemTotal"], "kernel": platform.release(),
                 "qemu": facts.qemu_version, "accelerator": facts.accelerator, "accelerator_reason": facts.accelerator_reason},
        "targets": rows,
        "results": results,
        "errors": errors,
    }
    write_doc(doc, out, summary)
    return summary


def write_doc(doc: Path, out: Path, s: dict[str, Any]) -> None:
    h = s["host"]
    parts = [
        "# Benchmarks\n",
        "Written by `vmstream bench all`; every figure below comes from one run of it, baselines included. "
        "Do not edit by hand: run it again.\n",
        f"- command: `{s['command']}`",
        f"- source: {s['source']}, started {s['started_at']}, took {s['total_s'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in s['durations_s'].items())})",
        f"- host: {h['cpus']} cores, {h['mem_total_bytes'] / (1 << 30):.0f} GiB, Linux {h['kernel']}, QEMU {h['qemu']}, "
        f"accelerator **{h['accelerator']}** ({h['accelerator_reason']})",
        *(["- PYTHONPATH points the command at a clean `git clone` of the source revision above, so the figures belong "
            "to that commit and not to uncommitted edits in a shared working tree."] if "PYTHONPATH=" in s["command"] else []),
        "- clones and cold boots go through the agent's REST API (what a user waits for); QEMU's own save/restore is "
        "driven directly (QMP `migrate` to `exec:cat > FILE` of a stopped VM, then a new QEMU with "
        "`-incoming exec:cat FILE`), timed from process start to the first HTTP answer, with no API in the way.",
        "- Raw JSON of each bench sits beside its plot in "
        f"[{os.path.relpath(out, doc.parent)}/]({os.path.relpath(out, doc.parent)}/).\n",
        "## Targets\n",
        targets.markdown(s["targets"]),
    ]
    for key, title, _ in SECTIONS:
        res = s["results"].get(key)
        if key in s.get("errors", {}):
            parts += [f"## {title}\n", f"`vmstream bench {key}`\n", f"**This bench failed in this run:** {s['errors'][key]}\n"]
        if not res:
            continue
        files = res["files"]
        md = Path(files["markdown"]).read_text()
        png = os.path.relpath(files["plot"], doc.parent)
        parts += [f"## {title}\n", f"`vmstream bench {key}`\n", md, f"![{title}]({png})\n"]
    for name, title, command in SEPARATE:
        md_file, png_file, json_file = out / f"{name}.md", out / f"{name}.png", out / f"{name}.json"
        if md_file.exists():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                command = json.loads(json_file.read_text()).get("command") or command  # as it was run
            parts += [f"## {title}\n", f"`{command}`: a separate run, not part of `bench all` (its raw JSON: "
                      f"[{name}.json]({os.path.relpath(out / f'{name}.json', doc.parent)})).\n",
                      md_file.read_text(), f"![{title}]({os.path.relpath(png_file, doc.parent)})\n"]
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, doc)
    say(f"wrote {doc}")
