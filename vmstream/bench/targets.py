"""The issue's "done when" lines, checked against bench results (pure, for unit tests)."""

from __future__ import annotations

from typing import Any

LIMIT_ALL_S = 20 * 60


def _row(what: str, target: str, value: float | None, ok: bool | None, unit: str = "") -> dict[str, Any]:
    return {"what": what, "target": target, "value": value, "unit": unit, "met": ok}


def _size(scale: dict[str, Any], mib: int) -> dict[str, Any] | None:
    return next((s for s in scale.get("sizes", []) if s["mib"] == mib), None)


def check(results: dict[str, Any], total_s: float | None) -> list[dict[str, Any]]:
    """One row per target; value None (and met None) where the bench did not run or the size is missing."""
    rows = []
    if total_s is not None:
        rows.append(_row("`bench all` wall time", "< 20 min", round(total_s / 60, 1), total_s < LIMIT_ALL_S, "min"))
    clone = results.get("clone")
    if clone:
        v = clone.get("speedup_vs_boot")
        rows.append(_row("clone: speed-up vs cold boot", ">= 30x", v, v is not None and v >= 30, "x"))
        v = clone.get("speedup_vs_qemu_restore")
        rows.append(_row(f"clone: speed-up vs QEMU restore ({clone['memory_mib']} MiB, freshly booted)", "(no target)", v, None, "x"))
    scale = results.get("scale")
    if scale:
        for mib, need in ((1024, 5.0), (4096, 20.0)):
            s = _size(scale, mib)
            for state in ("filled", "idle"):
                v = s[state]["speedup_vs_qemu_restore"] if s and state in s else None
                label = "freshly booted" if state == "idle" else f"{s[state]['fill_mib']} MiB filled" if s and state in s else state
                rows.append(_row(f"scale: speed-up vs QEMU restore at {mib // 1024} GiB, {label}", f">= {need:.0f}x", v,
                                 None if v is None else v >= need, "x"))
    burst = results.get("burst")
    if burst:
        for n, limit in ((10, 3.0), (32, 8.0)):
            v = burst["all_serving_s"].get(str(n))
            rows.append(_row(f"burst: {n} clones all serving", f"<= {limit:.0f} s", v, None if v is None else v <= limit, "s"))
    density = results.get("density")
    if density:
        v = density.get("density_ratio")
        rows.append(_row(f"density: ratio cold / clone ({density['memory_mib']} MiB)", ">= 6x", v,
                         None if v is None else v >= 6, "x"))
    capture = results.get("capture")
    if capture:
        v = capture.get("pause_ms_booted_256m")
        rows.append(_row("capture: pause, booted 256 MiB VM", "<= 100 ms", v, None if v is None else v <= 100, "ms"))
        v = capture.get("pause_ms_clone")
        rows.append(_row(f"capture: pause, clone ({capture['pause_ms_clone_mib']} MiB)", "<= 30 ms", v,
                         None if v is None else v <= 30, "ms"))
    stream = results.get("stream")
    if stream:  # the streaming issue's targets
        for key, what, op, limit in (("size_flatness", "stream: clone 2 GiB / 256 MiB", "<=", 1.3),
                                     ("fetched_fraction", "stream: bytes an idle clone fetched / image", "<=", 0.3),
                                     ("memfs_read_mbps", "stream: memfs cold sequential read from a peer", ">=", 500)):
            v = stream.get(key)
            ok = None if v is None else (v <= limit if op == "<=" else v >= limit)
            rows.append(_row(what, f"{op} {limit}", v, ok))
        over = stream.get("cold_prefetch_over_warm_by_rtt_ms", {})
        for rtt in ("0", "2"):
            v = over.get(rtt)
            rows.append(_row(f"stream: cold clone with prefetch / warm (both a new QEMU), {rtt} ms round trip", "<= 1.3x", v,
                             None if v is None else v <= 1.3, "x"))
        v = stream.get("prefetch_speedup_by_rtt_ms", {}).get("10")
        rows.append(_row("stream: cold start speed-up from prefetch, 10 ms round trip", ">= 3.7x", v,
                         None if v is None else v >= 3.7, "x"))
        warm, local = stream.get("memfs_warm_read_mbps"), stream.get("local_read_mbps")
        v = None if not warm or not local else round(local / warm, 2)
        rows.append(_row("stream: local file read / memfs warm read", "<= 2x", v, None if v is None else v <= 2, "x"))
    mig = results.get("migrate")
    if mig:  # the migration issue's targets
        v = mig.get("max_client_gap_ms")
        rows.append(_row("migrate: largest client gap (all modes and loads)", "<= 100 ms", v, None if v is None else v <= 100, "ms"))
        v = mig.get("failed_requests", 0) + mig.get("reset_connections", 0) + mig.get("guests_lost", 0)
        rows.append(_row("migrate: failed requests + reset connections + guests lost", "0", v, v == 0))
        v = mig.get("delta_sent_over_private")
        rows.append(_row("migrate: delta bytes sent / clone's private bytes", "<= 2x", v, None if v is None else v <= 2, "x"))
    pol = results.get("policy")
    if pol:  # the memory policy issue's targets
        for key, what, op, limit in (
            ("within_limit_fraction", "policy: samples within limit + 5% (bursts aside)", ">=", 1.0),
            ("burst_honoured_fraction", "policy: bursts honoured, of their allowed time", ">=", 0.9),
            ("freed_returned_15s_fraction", "policy: freed memory back on the host within 15 s", ">=", 0.9),
            ("host_memory_saving", "policy: host memory saved vs static allocation", ">=", 0.3),
            ("admitted_ratio", "policy: VMs a fixed budget admits, vs static", ">=", 2.0),
            ("slowdown", "policy: guest slowdown (ops/s)", "<=", 0.05),
            ("oom_kills", "policy: OOM kills", "<=", 0),
            ("memcheck_bad_pages", "policy: memcheck bad pages", "<=", 0),
            ("controller_cpu_fraction", "policy: controller CPU, of one core", "<=", 0.02),
        ):
            v = pol.get(key)
            rows.append(_row(what, f"{op} {limit}", v, None if v is None else (v <= limit if op == "<=" else v >= limit)))
        v = pol.get("all_workloads_finished")
        rows.append(_row("policy: every workload finished", "yes", None if v is None else int(bool(v)), v))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    from vmstream.bench.report import md_table

    def cell(r: dict[str, Any]) -> str:
        if r["value"] is None:
            return "-"
        v = float(r["value"])
        return f"{v:.3g} {r['unit']}".strip() if v < 100 else f"{v:.0f} {r['unit']}".strip()

    verdict = {True: "met", False: "**missed**", None: "-"}
    return md_table(["done when", "target", "measured", ""], [[r["what"], r["target"], cell(r), verdict[r["met"]]] for r in rows])
