"""A minimal writer for the initramfs 'newc' cpio format.

Written by hand because the initramfs needs a /dev/console device node
and root-owned files, which the cpio tool only gives when run as root with
a staging tree; here entries are built in memory.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _header(ino: int, entry: Entry, namesize: int) -> bytes:
    fields = [
        ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0,
        entry.rdev[0], entry.rdev[1], namesize, 0,
    ]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """Serialise entries (parents before children) into one newc archive."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.path.lstrip("/").encode() + b"\0"
        out += _header(ino, entry, len(name)) + name
        out += _pad(len(out))
        out += entry.data
        out += _pad(len(out))
    return bytes(out)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, executable: bool = False) -> Entry:
    return Entry(path, stat.S_IFREG | (0o755 if executable else 0o644), data)


def char_device(path: str, major: int, minor: int) -> Entry:
    return Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))
