"""What tests check is gone at teardown: QEMU processes of a data dir or test root."""

from __future__ import annotations

from pathlib import Path


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose command line points into root (a data dir, a test bed)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and str(root).encode() in cmd:
                pids.append(int(entry.name))
    return pids
