"""migrate(): move one VM from a source QemuProcess to a new destination one.

Both halves run in this process here (tests, bench); a host agent splits
them: the destination agent calls prepare_live_target / DeltaTarget, the
source agent migrate_live / migrate_delta with the address it got back.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmstream.errors import InvalidInput
from vmstream.migrate.delta import DeltaTarget, migrate_delta
from vmstream.migrate.live import LiveOptions, migrate_live, prepare_live_target
from vmstream.migrate.target import IncomingSpec, LocalTarget, live_target_spec
from vmstream.migrate.types import MigrationResult, NetworkSwitch, ProgressCallback
from vmstream.qemu.machine import MachineSpec, QemuProcess, TapNic

MODES = ("auto", "live", "delta")


def choose_mode(spec: MachineSpec, mode: str = "auto", dest_has_image: Callable[[Path], bool] | None = None) -> str:
    """delta for a VM mapping an image memory file the destination also has; else live.

    A forced mode is checked: delta needs an image-backed VM.
    """
    if mode not in MODES:
        raise InvalidInput(f"unknown migration mode {mode!r}: choose one of {', '.join(MODES)}")
    has = dest_has_image or (lambda p: p.exists())
    if mode == "delta":
        if spec.memory_file is None:
            raise InvalidInput("delta migration needs a VM started from a live image (it maps the image's memory)")
        if not has(spec.memory_file):
            raise InvalidInput(f"delta migration needs the image memory {spec.memory_file} on the destination")
        return "delta"
    if mode == "live":
        return "live"
    return "delta" if spec.memory_file is not None and has(spec.memory_file) else "live"


@dataclass(frozen=True)
class Destination:
    """Where the VM goes: its QEMU owner, the host's address and namespace, the VM's tap there."""

    proc: QemuProcess
    listen_ip: str
    netns: str | None = None
    tap: TapNic | None = None  # the VM's NIC on the destination (same MAC and IP, the host's tap)


async def migrate(
    src: QemuProcess, spec: MachineSpec, dest: Destination, *, mode: str = "auto",
    switch: NetworkSwitch | None = None, progress: ProgressCallback | None = None,
    cancel: asyncio.Event | None = None, options: LiveOptions | None = None, stop_source: bool = True,
    dest_has_image: Callable[[Path], bool] | None = None,
) -> tuple[MigrationResult, MachineSpec]:
    """Move the VM; returns the result and the VM's spec on the destination.

    On failure (MigrationError) the VM runs on the source, the destination
    QEMU is stopped and its run dir removed.
    """
    chosen = choose_mode(spec, mode, dest_has_image)
    if chosen == "delta":
        # a plain MachineSpec even if the VM arrived by a live move (an IncomingSpec)
        base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(MachineSpec)}
        base.update(incoming=True, vm_id=dest.proc.vm_id, tap=dest.tap)
        dspec: MachineSpec = MachineSpec(**base)
        target = DeltaTarget(dest.proc, dspec, dest.listen_ip, dest.netns)
        addr = await target.prepare()
        try:
            result = await migrate_delta(src, spec.memory_bytes, addr, netns=spec.tap.netns if spec.tap else None,
                                         switch=switch, progress=progress, cancel=cancel, on_failure=target.abort)
            if target.task is not None:
                await target.task  # the destination's own errors, if any, surface here
        finally:
            target.close()
    else:
        opts = options or LiveOptions()
        # the destination receives every page: it needs no image (anonymous RAM) unless it has it
        keep_file = spec.memory_file is not None and (dest_has_image or (lambda p: p.exists()))(spec.memory_file)
        dspec = live_target_spec(spec, vm_id=dest.proc.vm_id, tap=dest.tap,
                                 memory_file=spec.memory_file if keep_file else None)
        postcopy = (opts.postcopy is None or opts.postcopy) and dspec.memory_file is None
        assert isinstance(dspec, IncomingSpec)
        uri = await prepare_live_target(dest.proc, dspec, dest.listen_ip, dest.netns, postcopy)
        result = await migrate_live(src, LocalTarget(dest.proc), uri, postcopy=postcopy, switch=switch, options=opts,
                                    progress=progress, cancel=cancel)
    if stop_source:
        await src.stop()
    return result, dspec
