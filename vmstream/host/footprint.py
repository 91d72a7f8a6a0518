"""Memory footprint of one QEMU process, from /proc/PID/smaps.

private/shared follow the kernel's meaning (pages mapped by one process vs
several). 'anonymous' is what the VM alone costs: its copy-on-write guest
pages plus QEMU's own heap. The guest RAM mapping is broken out separately:
for a clone, its file pages are the image's, shared with sibling clones.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

_KB = 1024


class GuestRamUsage(BaseModel):
    resident_bytes: int
    anonymous_bytes: int  # written by this VM (copy-on-write or booted RAM)
    image_bytes: int  # still the image's pages, shared through the page cache


class Footprint(BaseModel):
    resident_bytes: int
    pss_bytes: int
    private_bytes: int
    shared_bytes: int
    anonymous_bytes: int
    guest_ram: GuestRamUsage | None


def _fields(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * _KB
    return out


def _ram_mapping(pid: int, size: int) -> dict[str, int] | None:
    with open(f"/proc/{pid}/smaps") as f:
        block: list[str] = []
        match = False
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                if match:
                    return _fields(block)
                lo, hi = (int(x, 16) for x in head.split("-"))
                match = hi - lo == size
                block = []
            else:
                block.append(line)
        return _fields(block) if match else None


def measure(pid: int, ram_bytes: int) -> Footprint:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        roll = _fields(f.readlines())
    ram = _ram_mapping(pid, ram_bytes)
    guest = None
    if ram is not None:
        guest = GuestRamUsage(
            resident_bytes=ram.get("Rss", 0),
            anonymous_bytes=ram.get("Anonymous", 0),
            image_bytes=ram.get("Rss", 0) - ram.get("Anonymous", 0),
        )
    return Footprint(
        resident_bytes=roll.get("Rss", 0),
        pss_bytes=roll.get("Pss", 0),
        private_bytes=roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0),
        shared_bytes=roll.get("Shared_Clean", 0) + roll.get("Shared_Dirty", 0),
        anonymous_bytes=roll.get("Anonymous", 0),
        guest_ram=guest,
    )


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...)."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (_KB if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def memory_pressure() -> dict[str, float] | None:
    """/proc/pressure/memory's "some" and "full" 10 s averages (percent of time stalled);
    None where the kernel has no PSI."""
    try:
        with open("/proc/pressure/memory") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for field in fields:
            key, _, value = field.partition("=")
            if key == "avg10":
                out[f"{kind}_avg10"] = float(value)
    return out


def rss_anon(pid: int) -> int:
    """A process's resident anonymous memory (/proc/PID/status): a counter, cheap to read
    many times a second, unlike smaps."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * _KB
    return 0


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
