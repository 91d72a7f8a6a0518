"""Admission: a boot or clone start that would take the host below its memory floor is
refused before anything starts, with the shortfall named.

What a new VM is counted for: its memory limit (and burst) where it has one, else what such
a VM costs at first: a booted VM its RAM (a cold boot touches most of it), a clone what clones
cost when they start (QEMU's own memory and the guest's first writes; its image's pages are
shared, and already on the host or streamed into the page cache, which the kernel can drop).
Growth after the start is the controller's to handle, through the balloons.
"""

from __future__ import annotations

from vmstream.config import parse_size
from vmstream.errors import Conflict, InvalidInput
from vmstream.policy.memory import MemoryPolicy

MIB = 1 << 20
CLONE_START_BYTES = 48 * MIB
"""A clone at its start: ~26 MiB of QEMU's own memory (bench density's marginal PSS) and the
first tens of MiB its guest writes."""


def parse_floor(text: str, total_bytes: int) -> int:
    """VMSTREAM_HOST_MEMORY_FLOOR: a size ('512M') or a share of the host's RAM ('5%')."""
    text = text.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = -1.0
        if not 0 <= share < 100:
            raise InvalidInput(f"host memory floor '{text}' is not a share of the RAM: give e.g. 5% or a size like 512M")
        return int(total_bytes * share / 100)
    return parse_size(text)


def start_cost(ram_bytes: int, policy: MemoryPolicy | None, clone: bool) -> int:
    """What a new VM is counted for when it starts."""
    first = min(CLONE_START_BYTES, ram_bytes) if clone else ram_bytes
    if policy is not None and policy.limit_bytes is not None:
        return min(first, policy.limit_bytes + policy.burst_bytes)
    return first


def check_room(available_bytes: int, floor_bytes: int, costs: list[int], what: str) -> None:
    """Conflict naming the shortfall if starting VMs of these costs would leave less than
    floor_bytes of MemAvailable."""
    need = sum(costs)
    if available_bytes - need >= floor_bytes:
        return
    short = need - (available_bytes - floor_bytes)
    raise Conflict(
        f"not enough memory on this host to start {what}: {len(costs)} VM(s) counted for {need / MIB:.0f} MiB "
        f"(their memory limits, or their RAM for a boot and {CLONE_START_BYTES >> 20} MiB for a clone), MemAvailable is "
        f"{available_bytes / MIB:.0f} MiB and the host keeps {floor_bytes / MIB:.0f} MiB free (VMSTREAM_HOST_MEMORY_FLOOR): "
        f"{short / MIB:.0f} MiB short. Stop or shrink running VMs, start fewer, give them a lower --memory-limit, "
        "or lower the floor"
    )
