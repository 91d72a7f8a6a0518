"""Where vmstream keeps its files, and parsing of user-given values."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from vmstream.errors import InvalidInput

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

MIN_MEMORY = 64 << 20
MAX_MEMORY = 64 << 30


def parse_size(text: str | int) -> int:
    """'256M', '1G', '512MiB' or a bare number of MiB, to bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidInput(
            f"'{text}' is not a memory size: use a number with an optional unit, like 256M or 1G"
        )
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_memory(text: str | int) -> int:
    """A guest RAM size in bytes, checked to be whole MiB and in range."""
    size = parse_size(text)
    if size % (1 << 20) or not MIN_MEMORY <= size <= MAX_MEMORY:
        raise InvalidInput(
            f"memory size '{text}' is out of range: give whole MiB between "
            f"{MIN_MEMORY >> 20}M and {MAX_MEMORY >> 30}G"
        )
    return size


def check_name(name: str, what: str = "VM") -> str:
    """Names become hostnames, file names and URL parts, so keep them DNS-safe."""
    if not _NAME_RE.match(name):
        raise InvalidInput(
            f"'{name}' is not a valid {what} name: use 1-63 lowercase letters, digits "
            "and '-', starting with a letter or digit"
        )
    return name


def private_dir(path: Path) -> Path:
    """The data dir, made or kept reachable by its owner only (0700): it holds the token, VM
    state, guests' memory images and QEMU's control sockets, which no other user may read."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def agent_token(data_dir: Path) -> str:
    """The secret the CLI sends the agent; created (mode 0600) on first use."""
    path = data_dir / "agent.token"
    if not path.exists():
        private_dir(data_dir)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        os.replace(tmp, path)
    return path.read_text().strip()
