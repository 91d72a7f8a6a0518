"""`bench memfs-kill`: memfs's serving daemon killed (SIGKILL) under clones that fault.

Host A (the bench's agent) boots a VM, fills a 48 MiB memcheck region with pseudo-random
pages and freezes it into a live image. Host B (a second agent, its store A's agent over
HTTP) starts `clones` clones of it, each verifying its memcheck region over and over. Every
`interval_s` the bench drops B's chunk cache and the image file's page cache (so the clones
fault their pages in from A again) and SIGKILLs B's memfs daemon, `kills` times. memfs's
supervisor keeps the FUSE connection and starts another daemon, which has the kernel resend
what the dead one had read and not answered (docs/memfs.md).

Figures: clones_lost (not running at the end, or whose final check could not run),
memcheck_bad_pages (all checks, final ones included), memcheck_checks and failed_checks
(checks that got no answer), memfs_restarts (as memfs counts them), restart_ms (from the
kill until the new daemon answers: median and max), resent_requests (faults the killed daemons
had read and not answered, which the kernel sent again to the next one), fetched_mib (what B's memfs fetched
from A during the kills: the clones were faulting), and the cold clone start before them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.bench.common import Bench, say
from vmstream.bench.migrate import ask, serial_tail
from vmstream.bench.report import md_table, pyplot
from vmstream.bench.stream import peer_host
from vmstream.errors import VmstreamError
from vmstream.memfs.mount import control_request

FILL_MIB = 48


def _memfs(home: Path, cmd: str, **args: Any) -> dict[str, Any]:
    """Straight to a host's memfs control socket (the bench's own fault injection)."""
    return control_request(home / "memfs.sock", cmd, **args)


def _kill_and_wait(home: Path, resent: list[int], timeout: float = 30.0) -> float:
    """SIGKILL the serving daemon (adding to resent the requests it got from the one before);
    seconds until another answers."""
    stats = _memfs(home, "stats")
    pid = int(stats["pid"])
    resent.append(int(stats["resent"]))
    os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if int(_memfs(home, "stats")["pid"]) != pid:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.005)
    raise VmstreamError(f"memfs did not come back within {timeout:.0f}s of a kill (see {home / 'memfs.log'})")


def _check(client: AgentClient, vm: str, odd: list[dict[str, Any]]) -> int:
    """One memcheck of the clone: its bad pages, or -1 if it gave no result (kept in odd)."""
    try:
        got = ask(client, vm, "memcheck-verify")
    except VmstreamError as exc:
        odd.append({"vm": vm, "error": str(exc), "t": time.strftime("%H:%M:%S")})
        return -1
    result = got.get("result")
    if got.get("ok") and isinstance(result, dict) and isinstance(result.get("bad_pages"), int):
        return int(result["bad_pages"])
    odd.append({"vm": vm, "answer": got, "t": time.strftime("%H:%M:%S")})
    return -1


def run(bench: Bench, clones: int = 10, kills: int = 10, memory_mib: int = 256, interval_s: float = 2.0) -> dict[str, Any]:
    say(f"memfs-kill: {clones} clones of a {memory_mib} MiB image on a host streaming it from another, "
        f"memfs killed {kills} times while they fault")
    src, image = bench.name("src"), bench.name("img")
    bench.boot(src, memory_mib)
    fill = ask(bench.client, src, f"memcheck-fill {FILL_MIB} 31337")
    if not fill.get("ok"):
        raise VmstreamError(f"memcheck-fill failed in {src}: {fill}")
    bench.create_image(src, image)
    bench.destroy(src)
    port = json.loads((bench.data_dir / "agent.json").read_text())["port"]
    with peer_host(bench, f"http://127.0.0.1:{port}") as b:
        home = b.data_dir
        t0 = time.perf_counter()
        names = [v["name"] for v in b.call("POST", f"/v1/live-images/{image}/start",
                                            json={"count": clones, "name": bench.name("c"), "pool": False})["vms"]]
        start_s = time.perf_counter() - t0
        stop = threading.Event()
        checks: dict[str, list[int]] = {n: [] for n in names}  # bad pages per check, -1: no answer
        odd: list[dict[str, Any]] = []  # answers that were not a check's result

        def verify(name: str) -> None:
            own = AgentClient(b.data_dir, env=b.env)
            try:
                while not stop.is_set():
                    checks[name].append(_check(own, name, odd))
            finally:
                own.close()

        threads = [threading.Thread(target=verify, args=(n,), daemon=True) for n in names]
        for t in threads:
            t.start()
        fetched0 = b.call("GET", "/v1/host")["memfs"]["images"][image]["fetched_bytes"]
        restarts: list[float] = []
        resent: list[int] = []  # per daemon: requests the one before it had read and not answered
        try:
            for k in range(kills):
                time.sleep(interval_s)
                _memfs(home, "drop-cache")
                _memfs(home, "invalidate", image=image)
                restarts.append(_kill_and_wait(home, resent))
                say(f"kill {k + 1}/{kills}: another daemon answered after {restarts[-1] * 1000:.0f} ms")
            time.sleep(interval_s)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=300)
        memfs = b.call("GET", "/v1/host")["memfs"]
        slow = int(memfs["slow_requests"])
        resent.append(int(memfs["resent"]))
        states = {v["name"]: v["state"] for v in b.call("GET", "/v1/vms")}
        final: dict[str, int] = {}
        for name in names:
            final[name] = _check(b, name, odd)
        consoles = {n: serial_tail(b, n) for n in names if final[n] < 0}  # why a clone was lost
        for name in names:
            b.call("DELETE", f"/v1/vms/{name}")
        bench.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(home / "memfs.log", bench.out / "memfskill-memfs.log")  # the kills and restarts, as memfs logged them
    all_checks = [c for n in names for c in checks[n]] + list(final.values())
    return {
        "bench": "memfs-kill",
        "memory_mib": memory_mib,
        "clones": clones,
        "kills": kills,
        "clones_lost": sum(1 for n in names if states.get(n) != "running" or final[n] < 0),
        "memcheck_bad_pages": sum(c for c in all_checks if c > 0),
        "memcheck_checks": len(all_checks),
        "failed_checks": sum(1 for c in all_checks if c < 0),
        "memfs_restarts": memfs["restarts"],
        "memfs_errors": memfs["images"][image]["errors"],
        "restart_ms": {"median": round(statistics.median(restarts) * 1000, 1), "max": round(max(restarts) * 1000, 1)} if restarts else None,
        "restarts_ms": [round(r * 1000, 1) for r in restarts],
        "resent_requests": sum(resent[1:]),  # faults in flight at the kills, answered by the next daemon
        "slow_requests": slow,  # FUSE requests of the last daemon answered after 5 s or more (all are in memfskill-memfs.log)
        "fetched_mib": round((memfs["images"][image]["fetched_bytes"] - fetched0) / (1 << 20), 1),
        "clone_start_s": round(start_s, 3),
        "checks_per_clone": {n: len(checks[n]) + 1 for n in names},
        "odd_answers": odd[:20],
        "lost_consoles": consoles,
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    rows = [[k, str(res[k])] for k in ("clones", "kills", "clones_lost", "memcheck_bad_pages", "memcheck_checks",
                                       "failed_checks", "memfs_restarts", "memfs_errors", "restart_ms", "resent_requests",
                                       "fetched_mib")]
    md = (f"memfs killed {res['kills']} times under {res['clones']} clones of a {res['memory_mib']} MiB image that "
          f"fault their memory in from another host.\n\n" + md_table(["figure", "value"], rows))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(1, len(res["restarts_ms"]) + 1), res["restarts_ms"], color="#3f7fd9")
    ax.set_xlabel("kill")
    ax.set_ylabel("until another daemon answered (ms)")
    ax.set_title(f"memfs killed under {res['clones']} faulting clones: {res['clones_lost']} lost, {res['memcheck_bad_pages']} bad pages")
    fig.tight_layout()
    return md, fig
