"""`bench stream`: clones whose memory streams from the store, warm and cold.

Two hosts on one machine: host A (the bench's agent) makes the live images;
host B is a second agent with its own data dir whose store is host A's agent
(`peer:http://127.0.0.1:PORT/v1/store`), so B's memory chunks come over a
real HTTP connection on loopback. Cold runs empty B's chunk cache and the
page cache of the image file first.

- clone_warm_s: B already holds the image.
- clone_cold_s: nothing on B, no prefetch: every page fault may wait for a fetch.
- clone_cold_prefetch_s: nothing on B, but the image's recorded working set is
  fetched in parallel as the clone starts (REAP).
- fetched_fraction: what an idle clone pulled (cold, no prefetch) over the
  image's non-zero bytes.
- clone_256m_s / clone_2g_s: warm clones of a 256 MiB and a 2 GiB image.
- memfs_read_mbps / local_read_mbps: reading a whole image through memfs from
  a cold host cache (chunks from the peer) vs reading the same bytes from a
  local file with its page cache dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.bench.common import Bench, say
from vmstream.bench.report import fmt_s, fmt_x, md_table, pyplot
from vmstream.bench.stats import ratio, summary

IDLE_S = 5.0  # how long an idle clone runs before its fetched bytes are read


@contextlib.contextmanager
def peer_host(bench: Bench) -> Iterator[AgentClient]:
    """Host B: an agent with its own data dir, streaming from host A's agent."""
    port = json.loads((bench.data_dir / "agent.json").read_text())["port"]
    token = (bench.data_dir / "agent.token").read_text().strip()
    home = bench.scratch / "host-b"
    client = AgentClient(home, env={"VMSTREAM_STORE": f"peer:http://127.0.0.1:{port}/v1/store", "VMSTREAM_PEER_TOKEN": token})
    try:
        client.connect()
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.stop_agent(destroy_vms=True)
        client.close()


def _start(client: AgentClient, image: str, prefix: str, prefetch: bool = True) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    res = client.call("POST", f"/v1/live-images/{image}/start", json={"count": 1, "name": prefix, "prefetch": prefetch})
    return res["vms"][0], time.perf_counter() - t0


def _image_stats(client: AgentClient, image: str) -> dict[str, Any]:
    stats: dict[str, Any] = client.call("GET", "/v1/host")["memfs"].get("images", {}).get(image, {})
    return stats


def _read_mbps(path: Path, block: int = 4 << 20) -> float:
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            total += len(data)
    return total / (1 << 20) / (time.perf_counter() - t0)


def run(bench: Bench, runs: int = 5, sizes: tuple[int, int] = (256, 2048)) -> dict[str, Any]:
    facts = bench.facts()
    small, big = sizes
    say(f"stream: images of {small} and {big} MiB, {runs} runs per figure")
    images = {}
    for mib in sizes:
        src = bench.name("src", mib)
        bench.boot(src, mib)
        images[mib] = bench.name("img", mib)
        bench.create_image(src, images[mib])
        bench.destroy(src)
    img = images[small]

    # clone time vs RAM size, on host A with the image cached
    by_size: dict[int, list[float]] = {}
    for mib in sizes:
        bench.start(images[mib], 1, bench.name("warmup", mib))  # fills host A's cache
        times = []
        for r in range(runs):
            vms, t = bench.start(images[mib], 1, bench.name("size", mib, r))
            times.append(t)
            bench.destroy(vms[0]["name"])
        by_size[mib] = times
        say(f"{mib} MiB image: clone {summary(times)['median']:.3f} s (median)")
    bench.destroy(*(v["name"] for v in bench.call("GET", "/v1/vms") if v["name"].startswith(bench.name("warmup"))))

    with peer_host(bench) as b:
        def fresh(r: int, prefetch: bool, label: str) -> tuple[float, dict[str, Any]]:
            b.call("POST", "/v1/host/cache/drop")
            before = _image_stats(b, img).get("fetched_bytes", 0)
            vm, t = _start(b, img, bench.name(label, r), prefetch)
            return t, {"vm": vm["name"], "fetched_before": before}

        # the first clone on B records the image's working set (kept with the image)
        vm, t_first = _start(b, img, bench.name("record"), prefetch=False)
        time.sleep(3.0)
        b.call("DELETE", f"/v1/vms/{vm['name']}")
        say(f"host B: first clone {t_first:.3f} s; working set recorded")

        cold, cold_prefetch, warm, fetched = [], [], [], []
        for r in range(runs):
            t, info = fresh(r, prefetch=False, label="cold")
            cold.append(t)
            if r == 0:  # let this one idle and see what it pulled
                time.sleep(IDLE_S)
                fetched.append(_image_stats(b, img)["fetched_bytes"] - info["fetched_before"])
            b.call("DELETE", f"/v1/vms/{info['vm']}")
            t, info = fresh(r, prefetch=True, label="prefetch")
            cold_prefetch.append(t)
            b.call("DELETE", f"/v1/vms/{info['vm']}")
            say(f"run {r + 1}/{runs}: cold {cold[-1]:.3f} s, cold with prefetch {cold_prefetch[-1]:.3f} s")
        keep, _ = _start(b, img, bench.name("keep"))  # holds the page cache warm
        for r in range(runs):
            vm, t = _start(b, img, bench.name("warm", r))
            warm.append(t)
            b.call("DELETE", f"/v1/vms/{vm['name']}")
        b.call("DELETE", f"/v1/vms/{keep['name']}")
        stats = _image_stats(b, img)

        # whole-image reads: through memfs from a cold host cache, and from a local file
        b.call("POST", "/v1/host/cache/drop")
        memfs_file = b.data_dir / "memfs" / img
        memfs_mbps = _read_mbps(memfs_file)
        local = bench.scratch / "local-copy"
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(memfs_file, "rb") as src_f, open(local, "wb") as dst:
            while data := src_f.read(4 << 20):
                dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        with open(local, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        local_mbps = _read_mbps(local)
        local.unlink()

    for mib in sizes:
        bench.delete_image(images[mib])
    s_cold, s_pre, s_warm = summary(cold), summary(cold_prefetch), summary(warm)
    s_small, s_big = summary(by_size[small]), summary(by_size[big])
    med = {k: float(v["median"]) for k, v in {"cold": s_cold, "pre": s_pre, "small": s_small, "big": s_big}.items()}  # type: ignore[arg-type]
    return {
        "bench": "stream",
        "accelerator": facts.accelerator,
        "store": "peer over loopback HTTP (host B streams from host A's agent)",
        "runs": runs,
        "clone_warm_s": s_warm["median"],
        "clone_cold_s": s_cold["median"],
        "clone_cold_prefetch_s": s_pre["median"],
        "prefetch_speedup": ratio(med["cold"], med["pre"], 2),
        "fetched_fraction": round(fetched[0] / stats["nonzero_bytes"], 3),
        "fetched_bytes_idle": fetched[0],
        "image_nonzero_bytes": stats["nonzero_bytes"],
        "chunk_size": stats["chunk_size"],
        "clone_256m_s": s_small["median"],
        "clone_2g_s": s_big["median"],
        "size_flatness": ratio(med["big"], med["small"], 2),
        "memfs_read_mbps": round(memfs_mbps, 1),
        "local_read_mbps": round(local_mbps, 1),
        "detail": {"warm": s_warm, "cold": s_cold, "cold_prefetch": s_pre, "by_size": {str(k): summary(v) for k, v in by_size.items()},
                   "host_b_first_clone_s": round(t_first, 3)},
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    d = res["detail"]
    rows = [
        ["warm (host holds the image)", fmt_s(res["clone_warm_s"]), fmt_s(d["warm"]["p90"])],
        ["cold, no prefetch", fmt_s(res["clone_cold_s"]), fmt_s(d["cold"]["p90"])],
        ["cold, working-set prefetch", fmt_s(res["clone_cold_prefetch_s"]), fmt_s(d["cold_prefetch"]["p90"])],
        ["256 MiB image (warm, host A)", fmt_s(res["clone_256m_s"]), fmt_s(d["by_size"][str(256)]["p90"])],
        ["2 GiB image (warm, host A)", fmt_s(res["clone_2g_s"]), fmt_s(d["by_size"][str(2048)]["p90"])],
    ]
    md = (
        f"Clone start to first HTTP answer, median of {res['runs']} runs ({res['accelerator']}); store: {res['store']}.\n\n"
        + md_table(["clone", "median", "p90"], rows)
        + "\n\n"
        + md_table(
            ["prefetch speed-up", "fetched fraction (idle clone)", "size flatness (2 GiB / 256 MiB)", "memfs read", "local read"],
            [[fmt_x(res["prefetch_speedup"]), f"{res['fetched_fraction']:.3f} ({res['fetched_bytes_idle'] >> 20} of "
              f"{res['image_nonzero_bytes'] >> 20} MiB)", f"{res['size_flatness']}", f"{res['memfs_read_mbps']} MB/s",
              f"{res['local_read_mbps']} MB/s"]],
        )
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["warm", "cold", "cold +\nprefetch", "256 MiB", "2 GiB"]
    values = [res["clone_warm_s"], res["clone_cold_s"], res["clone_cold_prefetch_s"], res["clone_256m_s"], res["clone_2g_s"]]
    bars = ax.bar(labels, values, color=["#7fbf7f", "#d94f3f", "#3f7fd9", "#bfbfbf", "#8f8f8f"])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.2f} s", (bar.get_x() + bar.get_width() / 2, v), ha="center", xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("seconds to first HTTP answer (median)")
    ax.set_title(f"Streaming clones ({res['accelerator']}): cache state and RAM size")
    ax.grid(axis="y", alpha=0.3)
    return md, fig
