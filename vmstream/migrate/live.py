"""QEMU live migration between two QemuProcess objects, over TCP.

Pre-copy runs with QEMU's own convergence (downtime limit). The controller
watches query-migrate and
  - opens the network switch shortly before QEMU can switch over (remaining
    RAM within a margin of what fits in the downtime limit), so frames sent
    while the VM is stopped wait at the destination instead of being lost;
  - switches to post-copy (migrate-start-postcopy) when pre-copy does not
    converge: more than max_rounds dirty-sync rounds or max_precopy_s;
  - cancels (migrate_cancel) on request or when the destination dies.
After the switch-over it waits for the destination to run, commits the
network switch and sends announce-self. On any failure before the
switch-over the destination QEMU is stopped and its files removed, and the
source is checked to be running (cont if QEMU left it paused).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPError

from vmstream.migrate.target import IncomingSpec, free_port, remove_target, status
from vmstream.migrate.types import (
    MigrationCancelled,
    MigrationError,
    MigrationResult,
    NetworkSwitch,
    NoSwitch,
    Progress,
    ProgressCallback,
    Target,
)
from vmstream.qemu.machine import QemuProcess


@dataclass(frozen=True)
class LiveOptions:
    downtime_limit_ms: int = 30  # QEMU switches over once the rest fits in this
    max_bandwidth: int = 8 << 30  # bytes/s; QEMU's default (128 MiB/s) would make every move slow
    # Post-copy switch when pre-copy does not converge (needs anonymous RAM on the
    # destination). Off by default: with the postcopy-ram capability on, about 1 in 40
    # moves ended in a guest kernel panic here, most likely QEMU 7.2's lost TCG writes
    # (see guest_ram_bytes; post-copy not re-measured since); without it, QEMU's
    # auto-converge (vCPU throttling) makes pre-copy converge instead.
    postcopy: bool | None = False
    max_rounds: int = 6  # dirty-sync rounds after which pre-copy counts as not converging
    max_precopy_s: float = 20.0
    open_margin_bytes: int = 48 << 20  # open the network switch once this little RAM remains
    poll_s: float = 0.005
    alive_check_s: float = 0.0  # how often the destination is checked (each poll; a remote one less often)
    timeout_s: float = 300.0


async def prepare_live_target(dst: QemuProcess, spec: IncomingSpec, listen_ip: str, netns: str | None,
                              postcopy: bool) -> str:
    """Start the destination QEMU listening for the VM; returns the URI for the source.

    postcopy-ram must be enabled on both sides for a post-copy switch.
    """
    dst.start(spec)
    try:
        async with dst.qmp() as qmp:
            await qmp.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "postcopy-ram", "state": postcopy}]})
            uri = f"tcp:{listen_ip}:{free_port(listen_ip, netns)}"
            await qmp.execute("migrate-incoming", {"uri": uri})
    except BaseException as exc:
        await remove_target(dst)
        if isinstance(exc, QMPError):
            raise MigrationError(f"the destination QEMU could not be prepared: {exc}") from exc
        raise
    return uri


def _progress(info: dict[str, Any], elapsed: float, postcopy: bool) -> Progress:
    ram = info.get("ram", {})
    return Progress(
        mode="live", status=str(info.get("status", "")), elapsed_s=round(elapsed, 3),
        bytes_sent=int(ram.get("transferred", 0)), remaining_bytes=int(ram.get("remaining", 0)),
        rounds=int(ram.get("dirty-sync-count", 0)), expected_downtime_ms=info.get("expected-downtime"),
        dirty_pages_rate=ram.get("dirty-pages-rate"), mbps=ram.get("mbps"),
        postcopy=postcopy or info.get("status") == "postcopy-active",
    )


async def migrate_live(
    src: QemuProcess, dst: Target, uri: str, *, postcopy: bool, switch: NetworkSwitch | None = None,
    options: LiveOptions | None = None, progress: ProgressCallback | None = None,
    cancel: asyncio.Event | None = None,
) -> MigrationResult:
    """Move the VM from src to dst (already waiting on uri). On return the VM
    runs on dst and src is paused (postmigrate); the caller stops src.

    On failure: MigrationError, dst stopped and removed, src running.
    """
    opts = options or LiveOptions()
    switch = switch or NoSwitch()
    t0 = time.perf_counter()
    opened = started_postcopy = False
    open_round = 0
    open_time = 0.0
    last: dict[str, Any] = {}
    switched_over = False  # from here on the VM's state lives on the destination
    next_alive_check = 0.0
    try:
        async with src.qmp() as sq:
            await sq.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "postcopy-ram", "state": postcopy},
                                                {"capability": "auto-converge", "state": not postcopy}]})
            await sq.execute("migrate-set-parameters",
                             {"downtime-limit": opts.downtime_limit_ms, "max-bandwidth": opts.max_bandwidth})
            await sq.execute("migrate", {"uri": uri})
            while True:
                info = await sq.execute("query-migrate")
                assert isinstance(info, dict)
                last = info
                state = str(info.get("status", ""))
                elapsed = time.perf_counter() - t0
                if progress:
                    progress(_progress(info, elapsed, started_postcopy))
                if state in ("failed", "cancelled"):
                    why = f"QEMU migration {state}: {info.get('error-desc', 'no reason given')}"
                    if not await dst.alive():  # say which side broke
                        why = f"the destination QEMU exited during the migration ({await dst.exit_reason()}); {why}"
                    raise MigrationError(why)
                if state in ("device", "completed", "postcopy-active"):
                    switched_over = True
                    break
                if cancel is not None and cancel.is_set():
                    raise MigrationCancelled("migration cancelled on request")
                if time.perf_counter() >= next_alive_check:
                    if not await dst.alive():
                        raise MigrationError(f"the destination QEMU exited during the migration: {await dst.exit_reason()}")
                    next_alive_check = time.perf_counter() + opts.alive_check_s
                if elapsed > opts.timeout_s:
                    raise MigrationError(f"the migration did not finish within {opts.timeout_s:.0f}s")
                ram = info.get("ram", {})
                remaining, rounds = int(ram.get("remaining", 1 << 62)), int(ram.get("dirty-sync-count", 0))
                mbps = float(ram.get("mbps", 0.0) or 0.0)
                fits = mbps * 1e6 / 8 * opts.downtime_limit_ms / 1000  # what QEMU would send while stopped
                if not opened and state == "active" and remaining <= max(opts.open_margin_bytes, 3 * fits):
                    await asyncio.to_thread(switch.open)
                    opened, open_round, open_time = True, rounds, time.perf_counter()
                if opened and postcopy and not started_postcopy and (
                    rounds - open_round >= opts.max_rounds or elapsed > opts.max_precopy_s
                    or time.perf_counter() - open_time > 2.0
                ):
                    await sq.execute("migrate-start-postcopy")
                    started_postcopy = True
                await asyncio.sleep(opts.poll_s)
            claim = start_side_task(dst.claim_network())  # the source is stopped: frames wait at the destination
            if not opened:  # QEMU switched over before the window opened: open it at once
                await asyncio.to_thread(switch.open)
                opened = True
            t_switch = time.monotonic()
            await dst.wait_running(60.0)
            t_run = time.perf_counter()
            t_running = time.monotonic()
            await asyncio.to_thread(switch.commit)
            await dst.announce()
            switch_ms = (time.perf_counter() - t_run) * 1000
            claim_error = await side_task_outcome(claim)
            # post-copy: the source keeps serving page requests until every page is over
            while (state := str(last.get("status", ""))) != "completed":
                if state in ("failed", "postcopy-paused", "cancelled"):
                    raise MigrationError(f"the migration failed after the switch-over ({state}): "
                                         f"{last.get('error-desc', '')}; the VM runs on the destination only "
                                         "if the post-copy phase finished")
                if time.perf_counter() - t0 > opts.timeout_s:
                    raise MigrationError("post-copy did not finish in time")
                await asyncio.sleep(opts.poll_s)
                info = await sq.execute("query-migrate")
                assert isinstance(info, dict)
                last = info
            if progress:
                progress(_progress(last, time.perf_counter() - t0, started_postcopy))
    except BaseException as exc:
        if switched_over:
            raise
        await _roll_back(src, dst, switch, opened)
        if isinstance(exc, (QMPError, OSError, EOFError)):
            raise MigrationError(f"the migration failed: {exc}; the VM keeps running on the source") from exc
        if isinstance(exc, MigrationError) and not isinstance(exc, MigrationCancelled):
            raise MigrationError(f"{exc}; the VM keeps running on the source") from exc
        raise
    ram = last.get("ram", {})
    return MigrationResult(
        mode="live", total_s=round(time.perf_counter() - t0, 3), downtime_ms=float(last.get("downtime", 0)),
        bytes_sent=int(ram.get("transferred", 0)), rounds=int(ram.get("dirty-sync-count", 0)),
        postcopy=started_postcopy, setup_ms=last.get("setup-time"), switch_ms=round(switch_ms, 2),
        details={"claim_error": claim_error,
                 "t_switch_seen": t_switch, "t_running_seen": t_running, "total_time_ms": last.get("total-time"),
                 "ram_total": ram.get("total"), "postcopy_requests": ram.get("postcopy-requests"), "mbps": ram.get("mbps")},
    )


def start_side_task(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A side task of the switch-over, its error retrieved even if the move fails before
    side_task_outcome waits for it."""
    task = asyncio.create_task(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def side_task_outcome(task: asyncio.Task[None]) -> str | None:
    """Wait for a side task of the switch-over; its error as text (it is not worth failing a move
    whose VM already runs on the destination: the guest's own announce follows)."""
    try:
        await task
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


async def _roll_back(src: QemuProcess, dst: Target, switch: NetworkSwitch, opened: bool) -> None:
    """The VM stays on the source: cancel, remove the destination, make sure the source runs."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            async with src.qmp() as sq:
                info = await sq.execute("query-migrate")
                if isinstance(info, dict) and info.get("status") not in ("failed", "cancelled", "completed", None):
                    await sq.execute("migrate_cancel")
                    while True:
                        info = await sq.execute("query-migrate")
                        if not isinstance(info, dict) or info.get("status") in ("failed", "cancelled", "completed"):
                            break
                        await asyncio.sleep(0.01)
    with contextlib.suppress(Exception):
        await dst.remove()
    if opened:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(switch.abort)
    await ensure_running(src)


async def ensure_running(src: QemuProcess) -> None:
    """Verify the source runs again after a failed move; cont if QEMU left it paused."""
    try:
        async with asyncio.timeout(10):
            async with src.qmp() as sq:
                state = await status(src, sq)
                if state in ("paused", "postmigrate", "finish-migrate"):
                    await sq.execute("cont")
                    state = await status(src, sq)
    except Exception as exc:
        raise MigrationError(f"the migration failed and the source VM does not answer QMP: {exc}") from exc
    if state != "running":
        raise MigrationError(f"the migration failed and the source VM is {state}, not running")
