"""What tests check is gone at teardown: QEMU processes of a data dir or test root."""

from __future__ import annotations

from pathlib import Path


def pids_mentioning(root: Path, also: bytes = b"") -> list[int]:
    """Processes whose command line points into root (and holds also, if given)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if also in cmd and str(root).encode() in cmd:
                pids.append(int(entry.name))
    return pids


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose command line points into root (a data dir, a test bed)."""
    return pids_mentioning(root, b"qemu-system")
