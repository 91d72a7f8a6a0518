"""bench_migrate(): the figures for `vmstream bench migrate --json`.

For each mode (QEMU live migration of a booted VM, delta migration of an
image-backed clone) and each load (idle guest; guest rewriting memory at
20 MB/s with `memcheck dirty`), one move from host a to host b of a fresh
network test bed, with the LoadClient talking to the VM throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

from vmstream.errors import QemuError
from vmstream.guest import build_guest
from vmstream.migrate.bed import BedVm, Fleet
from vmstream.migrate.client import LoadClient
from vmstream.net import TestBed, namespaces_with_prefix, unique_prefix

LOADS = {"idle": 0, "write20": 20}
GUEST_ANSWER_S = 30.0  # a moved guest's agent answers within this, or the guest counts as lost


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no serial log: {exc})"


async def _one(fleet: Fleet, vm: BedVm, mode: str, rate: int) -> dict[str, Any]:
    if rate:
        answer = await vm.ask(f"memcheck-dirty 64 {rate}")
        if not answer.get("ok"):
            raise RuntimeError(f"cannot start the memory writer: {answer}")
        await asyncio.sleep(1.0)
    try:
        with LoadClient(vm.ip, fleet.bed.client) as client:
            await asyncio.sleep(1.0)
            client.reset_gaps()
            to = "b" if vm.host == "a" else "a"
            result = await fleet.move(vm, to, mode=mode)
            await asyncio.sleep(1.0)
        stats = client.stop()
    except BaseException:
        if rate:
            with contextlib.suppress(Exception):
                await vm.ask("memcheck-dirty-stop", timeout=10)
        raise
    # A guest that stops answering after its move is a result of this run (counted,
    # with its console), not the end of the whole bench.
    guest_error, verify = None, {}
    try:
        if rate:
            await vm.ask("memcheck-dirty-stop", timeout=GUEST_ANSWER_S)
        verify = await vm.ask("memcheck-verify", timeout=GUEST_ANSWER_S)
    except QemuError as exc:
        guest_error = str(exc)
    broken = guest_error or not verify.get("ok") or verify.get("result", {}).get("bad_pages") or stats.client_gap_ms > 2000
    return {
        "guest_error": guest_error,
        # a guest that failed after the move: its console, to see why (a panic shows here)
        "serial_tail": _tail(vm.proc.serial_path) if broken else None,
        "downtime_ms": result.downtime_ms, "client_gap_ms": stats.client_gap_ms, "total_s": result.total_s,
        "bytes_sent": result.bytes_sent, "failed_requests": stats.failed_requests,
        "reset_connections": stats.reset_connections, "requests": stats.requests, "rounds": result.rounds,
        "postcopy": result.postcopy, "private_bytes": result.private_bytes,
        "memcheck_bad_pages": verify.get("result", {}).get("bad_pages") if verify.get("ok") else None,
        "pause_breakdown_ms": result.details.get("pause_ms"),
    }


async def _loads(fleet: Fleet, vm: BedVm, mode: str, loads: tuple[str, ...]) -> dict[str, Any]:
    """One move per load, in turn; a guest lost after a move ends its series."""
    out: dict[str, Any] = {}
    for load in loads:
        out[load] = await _one(fleet, vm, mode, LOADS[load])
        if out[load]["guest_error"]:
            break
    return out


async def bench_migrate(work_dir: Path, modes: tuple[str, ...] = ("live", "delta"),
                        loads: tuple[str, ...] = ("idle", "write20"), memory_mib: int = 256) -> dict[str, Any]:
    """Run the migration benchmark in a throw-away test bed under work_dir; returns the figures."""
    t0 = time.monotonic()
    guest = await asyncio.to_thread(build_guest, work_dir / "guest")
    prefix = unique_prefix("vb")
    out: dict[str, Any] = {"meta": {"memory_mib": memory_mib, "host": platform.node(), "cpus": os.cpu_count(),
                                    "accel": os.environ.get("VMSTREAM_ACCEL", "tcg"), "loads_mb_s": LOADS}}
    with TestBed(prefix) as bed:
        fleet = Fleet(bed, guest, work_dir / "run", accel=out["meta"]["accel"])
        try:
            if "live" in modes:
                vm = await fleet.boot("live", 0, memory_mib=memory_mib)
                await vm.ask("memcheck-fill 32 7")
                out["live"] = await _loads(fleet, vm, "live", loads)
                await fleet.destroy(vm)
            if "delta" in modes:
                src = await fleet.boot("imgsrc", 1, memory_mib=memory_mib)
                await src.ask("memcheck-fill 32 7")
                image = await fleet.capture(src, work_dir / "image")
                await fleet.destroy(src)
                clone = await fleet.clone("clone", image, src)
                out["delta"] = await _loads(fleet, clone, "delta", loads)
                await fleet.destroy(clone)
        finally:
            await fleet.close()
    out["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    out["meta"]["left_behind"] = namespaces_with_prefix(prefix)
    return out


if __name__ == "__main__":  # python -m vmstream.migrate.bench DIR
    import json
    import sys
    import tempfile

    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="vmstream-bench-migrate-"))
    print(json.dumps(asyncio.run(bench_migrate(base)), indent=2))
