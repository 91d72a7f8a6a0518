"""`bench stream`: clones whose memory streams from the store, warm and cold.

Two hosts on one machine: host A (the bench's agent) makes the live images;
host B is a second agent with its own data dir whose store is host A's agent
(`peer:http://127.0.0.1:PORT/v1/store?bulk=...`) behind a delaying proxy (the kernel
here has no netem), and A's sendfile server behind another (the store spec names it),
so B's memory chunks come over real HTTP connections at a
chosen round-trip time: 0, 2 and 10 ms, interleaved run by run. Cold runs
empty B's chunk cache and the page cache of the image file first.

- clone_warm_s: B already holds the image; the clone starts the way a cold one does (a new
  QEMU, no pooled one), so the two differ only in where the memory comes from.
- clone_warm_pooled_s: B holds the image and a pooled QEMU of it is ready (given time to
  fill between starts): the fastest start, which a host that never ran the image cannot have.
- clone_cold_s_by_rtt_ms: nothing on B, no prefetch: every page fault may wait for a fetch.
- clone_cold_prefetch_s_by_rtt_ms: nothing on B, but the image's recorded working set is
  fetched as the clone starts (REAP); prefetch_speedup_by_rtt_ms is cold / prefetch.
  clone_cold_s, clone_cold_prefetch_s and prefetch_speedup are the 0 ms figures.
- fetched_fraction: what an idle clone pulled (cold, no prefetch) over the
  image's non-zero bytes.
- clone_256m_s / clone_2g_s: warm clones of a 256 MiB and a 2 GiB image.
- peer_serving: host A serving 4 MiB ranges of a pack to one reader, straight (no proxy),
  through its API's router and by sendfile: MB/s and A's agent's CPU-s per GB served.
- memfs_read_mbps: reading a whole image through memfs on B from a cold host
  (chunks from the peer, 0 ms); memfs_warm_read_mbps: again with B's chunk cache
  holding it and the file's page cache dropped; local_read_mbps: the same bytes
  from a local file with its page cache dropped; medians of runs read in turn
  (local_over_warm_read: local MB/s over memfs warm MB/s). The memfs reads go through the
  delaying proxy at 0 ms, a hop of its own that a real network does not add.
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
from vmstream.bench.delay import DelayProxy
from vmstream.bench.report import fmt_s, fmt_x, md_table, pyplot
from vmstream.bench.stats import median, ratio, summary
from vmstream.host.footprint import cpu_seconds
from vmstream.store import PeerBackend

IDLE_S = 5.0  # how long an idle clone runs before its fetched bytes are read
RTTS_MS = (0, 2, 10)  # round trips between host B and host A


@contextlib.contextmanager
def peer_host(bench: Bench, url: str, bulk_url: str | None = None) -> Iterator[AgentClient]:
    """Host B: an agent with its own data dir, streaming from host A's agent at url (and its
    sendfile server at bulk_url: the port A names is not the one behind the proxy)."""
    token = (bench.data_dir / "agent.token").read_text().strip()
    home = bench.scratch / "host-b"
    store = f"peer:{url}/v1/store" + (f"?bulk={bulk_url}" if bulk_url else "?bulk=off")
    client = AgentClient(home, env={"VMSTREAM_STORE": store, "VMSTREAM_PEER_TOKEN": token})
    try:
        client.connect()
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.stop_agent(destroy_vms=True)
        client.close()


def _start(client: AgentClient, image: str, prefix: str, prefetch: bool = True, pool: bool = False) -> tuple[dict[str, Any], float]:
    """One clone, timed; pool=False: a new QEMU even if a pooled one is ready (cold and warm
    clones alike, so they differ only in where the memory comes from)."""
    t0 = time.perf_counter()
    res = client.call("POST", f"/v1/live-images/{image}/start",
                      json={"count": 1, "name": prefix, "prefetch": prefetch, "pool": pool})
    return res["vms"][0], time.perf_counter() - t0


def _pool_ready(client: AgentClient, image: str, timeout: float = 10.0) -> None:
    """Wait until a pooled QEMU of the image is ready on the host."""
    deadline = time.monotonic() + timeout
    while not client.call("GET", "/v1/host")["clone_pool"]["ready"].get(image) and time.monotonic() < deadline:
        time.sleep(0.1)


def _image_stats(client: AgentClient, image: str) -> dict[str, Any]:
    stats: dict[str, Any] = client.call("GET", "/v1/host")["memfs"].get("images", {}).get(image, {})
    return stats


def _read_mbps(path: Path, block: int = 4 << 20, drop_first: bool = False) -> float:
    """A whole-file sequential read; drop_first: its page cache is dropped before."""
    if drop_first:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
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

    port = json.loads((bench.data_dir / "agent.json").read_text())["port"]
    bulk_port = bench.call("GET", "/v1/store/bulk")["port"]  # host A's sendfile server: behind a proxy of its own
    with DelayProxy(port) as proxy, DelayProxy(bulk_port) as bulk_proxy, peer_host(bench, proxy.url, bulk_proxy.url) as b:
        def fresh(r: int, prefetch: bool, label: str) -> tuple[float, dict[str, Any]]:
            b.call("POST", "/v1/host/cache/drop")
            before = _image_stats(b, img).get("fetched_bytes", 0)
            vm, t = _start(b, img, bench.name(label, r), prefetch)
            return t, {"vm": vm["name"], "fetched_before": before}

        # host A's first clone of the image recorded its working set (and put its pack in
        # the store, A's to write); B's first clone fetches the image's files
        profile = bench.data_dir / "images" / img / "workingset.json"
        for _ in range(100):
            if profile.exists():
                break
            time.sleep(0.1)
        ws = json.loads(profile.read_text()) if profile.exists() else {}
        vm, t_first = _start(b, img, bench.name("first"), prefetch=False)
        b.call("DELETE", f"/v1/vms/{vm['name']}")
        say(f"host B: first clone {t_first:.3f} s; working set of {len(ws.get('chunks', []))} chunks"
            + (f", a pack of {ws['pack']['bytes'] >> 10} KiB" if ws.get("pack") else ", no pack"))

        cold: dict[int, list[float]] = {rtt: [] for rtt in RTTS_MS}
        cold_prefetch: dict[int, list[float]] = {rtt: [] for rtt in RTTS_MS}
        prefetched: dict[int, list[dict[str, Any]]] = {rtt: [] for rtt in RTTS_MS}  # memfs's view, as the clone answered
        warm, warm_pooled, fetched = [], [], []
        for r in range(runs):
            for rtt in RTTS_MS:
                proxy.rtt_ms = bulk_proxy.rtt_ms = rtt
                t, info = fresh(r, prefetch=False, label=f"cold{rtt}")
                cold[rtt].append(t)
                if r == 0 and rtt == 0:  # let this one idle and see what it pulled
                    time.sleep(IDLE_S)
                    fetched.append(_image_stats(b, img)["fetched_bytes"] - info["fetched_before"])
                b.call("DELETE", f"/v1/vms/{info['vm']}")
                t, info = fresh(r, prefetch=True, label=f"prefetch{rtt}")
                cold_prefetch[rtt].append(t)
                prefetched[rtt].append(_image_stats(b, img).get("prefetch", {}))
                b.call("DELETE", f"/v1/vms/{info['vm']}")
                say(f"run {r + 1}/{runs}, {rtt} ms round trip: cold {cold[rtt][-1]:.3f} s, "
                    f"cold with prefetch {cold_prefetch[rtt][-1]:.3f} s")
        proxy.rtt_ms = bulk_proxy.rtt_ms = 0
        keep, _ = _start(b, img, bench.name("keep"), pool=True)  # holds the page cache warm; fills the pool
        for r in range(runs):  # interleaved: the same start path as the cold clones, then a pooled QEMU's
            vm, t = _start(b, img, bench.name("warm", r))
            warm.append(t)
            b.call("DELETE", f"/v1/vms/{vm['name']}")
            _pool_ready(b, img)
            vm, t = _start(b, img, bench.name("pooled", r), pool=True)
            warm_pooled.append(t)
            b.call("DELETE", f"/v1/vms/{vm['name']}")
            _pool_ready(b, img)
        b.call("DELETE", f"/v1/vms/{keep['name']}")
        stats = _image_stats(b, img)

        # whole-image reads, interleaved: through memfs from a cold host, then with the
        # chunks in B's host cache but not in the page cache, then from a local copy
        memfs_file = b.data_dir / "memfs" / img
        local = bench.scratch / "local-copy"
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(memfs_file, "rb") as src_f, open(local, "wb") as dst:
            while data := src_f.read(4 << 20):
                dst.write(data)
        reads: dict[str, list[float]] = {"memfs_cold": [], "memfs_warm": [], "local": []}
        for _ in range(runs):
            b.call("POST", "/v1/host/cache/drop")
            os.sync()  # no writeback of earlier runs under the reads
            reads["memfs_cold"].append(_read_mbps(memfs_file))
            os.sync()
            reads["memfs_warm"].append(_read_mbps(memfs_file, drop_first=True))
            reads["local"].append(_read_mbps(local, drop_first=True))
        s_reads = {k: summary(v) for k, v in reads.items()}
        say("reads (MB/s, median): " + ", ".join(f"{k} {s['median']:.0f}" for k, s in s_reads.items()))
        local.unlink()
    serving = _peer_serving(bench, runs)
    say("host A serving 4 MiB ranges (MB/s, its CPU-s per GB; medians): "
        + ", ".join(f"{k} {v['mbps']:.0f} MB/s, {v['cpu_s_per_gb']:.2f}" for k, v in serving.items()))

    for mib in sizes:
        bench.delete_image(images[mib])
    s_cold = {rtt: summary(v) for rtt, v in cold.items()}
    s_pre = {rtt: summary(v) for rtt, v in cold_prefetch.items()}
    s_warm, s_pooled = summary(warm), summary(warm_pooled)
    s_small, s_big = summary(by_size[small]), summary(by_size[big])

    def med(s: dict[str, Any]) -> float:
        return float(s["median"])

    speedup = {str(rtt): ratio(med(s_cold[rtt]), med(s_pre[rtt]), 2) for rtt in RTTS_MS}
    return {
        "bench": "stream",
        "accelerator": facts.accelerator,
        "store": "peer over loopback HTTP through a delaying proxy (host B streams from host A's agent)",
        "runs": runs,
        "clone_warm_s": s_warm["median"],
        "clone_warm_pooled_s": s_pooled["median"],
        "clone_cold_s_by_rtt_ms": {str(rtt): s["median"] for rtt, s in s_cold.items()},
        "clone_cold_prefetch_s_by_rtt_ms": {str(rtt): s["median"] for rtt, s in s_pre.items()},
        "prefetch_speedup_by_rtt_ms": speedup,
        "clone_cold_s": s_cold[0]["median"],
        "clone_cold_prefetch_s": s_pre[0]["median"],
        "prefetch_speedup": speedup["0"],
        "cold_prefetch_over_warm_by_rtt_ms": {str(rtt): ratio(med(s), med(s_warm), 2) for rtt, s in s_pre.items()},
        "cold_prefetch_over_warm_pooled_by_rtt_ms": {str(rtt): ratio(med(s), med(s_pooled), 2) for rtt, s in s_pre.items()},
        "fetched_fraction": round(fetched[0] / stats["nonzero_bytes"], 3),
        "fetched_bytes_idle": fetched[0],
        "image_nonzero_bytes": stats["nonzero_bytes"],
        "chunk_size": stats["chunk_size"],
        "clone_256m_s": s_small["median"],
        "clone_2g_s": s_big["median"],
        "size_flatness": ratio(med(s_big), med(s_small), 2),
        "memfs_read_mbps": round(med(s_reads["memfs_cold"]), 1),
        "memfs_warm_read_mbps": round(med(s_reads["memfs_warm"]), 1),
        "local_read_mbps": round(med(s_reads["local"]), 1),
        "local_over_warm_read": ratio(med(s_reads["local"]), med(s_reads["memfs_warm"]), 2),
        "peer_serving": serving,
        "detail": {"warm": s_warm, "warm_pooled": s_pooled, "cold": {str(k): v for k, v in s_cold.items()},
                   "cold_prefetch": {str(k): v for k, v in s_pre.items()},
                   "by_size": {str(k): summary(v) for k, v in by_size.items()},
                   "host_b_first_clone_s": round(t_first, 3),
                   "working_set_chunks": len(ws.get("chunks", [])), "working_set_pack_bytes": ws.get("pack", {}).get("bytes"),
                   "prefetch_by_rtt_ms": {str(k): v for k, v in prefetched.items()},
                   "reads_mbps": s_reads},
    }


def _peer_serving(bench: Bench, runs: int, total: int = 512 << 20, piece: int = 4 << 20) -> dict[str, dict[str, float]]:
    """Host A serving ranges of its largest pack (over and over, `total` bytes a pass: CPU time
    counts in 10 ms ticks), straight (no proxy), through its API's router and by sendfile,
    interleaved: MB/s for one reader and host A's agent's CPU per GB served."""
    token = (bench.data_dir / "agent.token").read_text().strip()
    port = json.loads((bench.data_dir / "agent.json").read_text())["port"]
    pid = int(bench.call("GET", "/health")["pid"])
    url = f"http://127.0.0.1:{port}/v1/store"
    peers = {"router": PeerBackend(url, token, bulk="off"), "sendfile": PeerBackend(url, token)}
    try:
        pack = max(peers["router"].list("packs/"), key=lambda o: o.size)
        offsets = [off % max(1, pack.size - piece) for off in range(0, total, piece)] if pack.size > piece else [0]
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in peers}
        for _ in range(runs):
            for name, peer in peers.items():
                c0, t0, n = cpu_seconds(pid), time.perf_counter(), 0
                for off in offsets:
                    n += len(peer.get(pack.key, off, piece))
                t, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
                got[name].append((n / t / 1e6, cpu / (n / 1e9)))
        return {k: {"mbps": round(median([m for m, _ in v]), 1), "cpu_s_per_gb": round(median([c for _, c in v]), 3)}
                for k, v in got.items()}
    finally:
        for peer in peers.values():
            peer.close()


def render(res: dict[str, Any]) -> tuple[str, Any]:
    d = res["detail"]
    rtts = list(res["clone_cold_s_by_rtt_ms"])
    rows = [["warm (host holds the image), new QEMU", "-", fmt_s(res["clone_warm_s"]), fmt_s(d["warm"]["p90"]), "-"]]
    if "clone_warm_pooled_s" in res:
        rows.append(["warm, pooled QEMU ready", "-", fmt_s(res["clone_warm_pooled_s"]), fmt_s(d["warm_pooled"]["p90"]), "-"])
    for rtt in rtts:
        rows.append(["cold, no prefetch", f"{rtt} ms", fmt_s(res["clone_cold_s_by_rtt_ms"][rtt]), fmt_s(d["cold"][rtt]["p90"]), "-"])
        rows.append(["cold, working-set prefetch", f"{rtt} ms", fmt_s(res["clone_cold_prefetch_s_by_rtt_ms"][rtt]),
                     fmt_s(d["cold_prefetch"][rtt]["p90"]), fmt_x(res["prefetch_speedup_by_rtt_ms"][rtt])])
    rows += [
        ["256 MiB image (warm, host A)", "-", fmt_s(res["clone_256m_s"]), fmt_s(d["by_size"][str(256)]["p90"]), "-"],
        ["2 GiB image (warm, host A)", "-", fmt_s(res["clone_2g_s"]), fmt_s(d["by_size"][str(2048)]["p90"]), "-"],
    ]
    md = (
        f"Clone start to first HTTP answer, median of {res['runs']} runs ({res['accelerator']}); store: {res['store']}.\n\n"
        + md_table(["clone", "round trip", "median", "p90", "prefetch speed-up"], rows)
        + "\n\n"
        + md_table(
            ["fetched fraction (idle clone)", "size flatness (2 GiB / 256 MiB)", "memfs read, cold (peer)", "memfs read, warm",
             "local read"],
            [[f"{res['fetched_fraction']:.3f} ({res['fetched_bytes_idle'] >> 20} of {res['image_nonzero_bytes'] >> 20} MiB)",
              f"{res['size_flatness']}", f"{res['memfs_read_mbps']} MB/s", f"{res['memfs_warm_read_mbps']} MB/s",
              f"{res['local_read_mbps']} MB/s"]],
        )
    )
    if res.get("peer_serving"):
        md += "\n\nHost A serving 4 MiB ranges to one reader (medians):\n\n" + md_table(
            ["served", "MB/s", "host A's CPU-s per GB"],
            [[k, f"{v['mbps']:.0f}", f"{v['cpu_s_per_gb']:.2f}"] for k, v in res["peer_serving"].items()])
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    xs = range(len(rtts))
    for off, key, label, color in ((-width / 2, "clone_cold_s_by_rtt_ms", "cold", "#d94f3f"),
                                   (width / 2, "clone_cold_prefetch_s_by_rtt_ms", "cold + prefetch", "#3f7fd9")):
        values = [res[key][rtt] for rtt in rtts]
        bars = ax.bar([x + off for x in xs], values, width, label=label, color=color)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", xytext=(0, 3), textcoords="offset points")
    ax.axhline(res["clone_warm_s"], color="#3f9f3f", linestyle="--", label=f"warm {res['clone_warm_s']:.2f} s")
    ax.set_xticks(list(xs), [f"{rtt} ms" for rtt in rtts])
    ax.set_xlabel("round trip to the host holding the image")
    ax.set_ylabel("seconds to first HTTP answer (median)")
    ax.set_title(f"Clones on a cold host ({res['accelerator']})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    names = ["memfs cold\n(peer)", "memfs warm", "local file"]
    values = [res["memfs_read_mbps"], res["memfs_warm_read_mbps"], res["local_read_mbps"]]
    bars = ax2.bar(names, values, color=["#d94f3f", "#7fbf7f", "#8f8f8f"])
    for bar, v in zip(bars, values, strict=True):
        ax2.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", xytext=(0, 3), textcoords="offset points")
    ax2.set_ylabel("MB/s, sequential whole-image read")
    ax2.set_title("Reading an image's memory")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return md, fig
