"""When a guest is ready: chosen per VM, kept with its live image.

    status          the demo guest's GET /status.json with a JSON counter (its default)
    agent           the in-guest vmstream agent answers (the default for disk guests)
    tcp:PORT        something listens on the guest's TCP PORT (asked of the in-guest agent on
                    slirp, where the host side of a forward accepts before the guest does;
                    a connection to the VM's own address on a bridge)
    http:PORT/PATH  GET /PATH on the guest's PORT answers 2xx (http:80/ for the root)
    none            do not wait: ready once QEMU runs (a clone: once its identity is applied)
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmstream.errors import InvalidInput, QemuError
from vmstream.guest.channel import ask_guest
from vmstream.guest.status import get_status, open_guest_connection

Kind = Literal["status", "agent", "tcp", "http", "none"]
_SPEC = re.compile(r"^(?:(status|agent|none)|tcp:(\d{1,5})|http:(\d{1,5})(/[\x21-\x7e]*)?)$")
HINT = "use status, agent, none, tcp:PORT or http:PORT/PATH (e.g. tcp:22, http:8080/health)"


@dataclass(frozen=True)
class Readiness:
    kind: Kind
    port: int = 80
    path: str = "/"

    def __str__(self) -> str:
        if self.kind == "tcp":
            return f"tcp:{self.port}"
        if self.kind == "http":
            return f"http:{self.port}{self.path}"
        return self.kind

    @property
    def after_identity(self) -> bool:
        """Whether a clone is ready once its agent has applied its identity (nothing more to probe)."""
        return self.kind in ("agent", "none")

    @property
    def guest_port(self) -> int | None:
        """The guest port the probe connects to (None: it needs no network)."""
        return self.port if self.kind in ("tcp", "http", "status") else None


STATUS = Readiness("status")
AGENT = Readiness("agent")


def parse_readiness(text: str) -> Readiness:
    """A readiness spec, or InvalidInput naming the accepted forms."""
    m = _SPEC.match(text.strip())
    if not m:
        raise InvalidInput(f"'{text}' is not a readiness check: {HINT}")
    word, tcp_port, http_port, path = m.groups()
    if word:
        return Readiness(word)  # type: ignore[arg-type]
    port = int(tcp_port or http_port)
    if not 1 <= port <= 65535:
        raise InvalidInput(f"port {port} in readiness '{text}' is not a TCP port (1-65535)")
    return Readiness("tcp", port) if tcp_port else Readiness("http", port, path or "/")


def parse_publish(specs: list[str]) -> dict[int, int]:
    """--publish values (HOST:GUEST, or GUEST for any free host port) as guest port -> host port (0: any)."""
    out: dict[int, int] = {}
    for spec in specs:
        host, _, guest = spec.strip().rpartition(":")
        try:
            g, h = int(guest), int(host) if host else 0
        except ValueError:
            raise InvalidInput(f"--publish '{spec}' is not HOST:GUEST or GUEST (TCP port numbers, e.g. 8080:80 or 22)") from None
        if not (1 <= g <= 65535 and 0 <= h <= 65535):
            raise InvalidInput(f"--publish '{spec}': ports are 1-65535")
        if g == 80 and not h:
            continue  # guest port 80 always has its own host port (the VM's endpoint)
        if g in out:
            raise InvalidInput(f"--publish names guest port {g} twice")
        out[g] = h
    return out


async def http_status(host: str, port: int, path: str, timeout: float, netns: str | None = None) -> int:
    """The status code of GET path (HTTP/1.0, no client library: cheap right after a resume)."""
    async with asyncio.timeout(timeout):
        reader, writer = await open_guest_connection(host, port, netns)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n".encode())
            line = await reader.readline()
        finally:
            writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {line[:80]!r}")
    return int(parts[1])


async def probe(ready: Readiness, host: str, port: int, agent_path: Path, timeout: float, netns: str | None = None,
                bridged: bool = False) -> bool:
    """One readiness probe; host:port reaches the guest's ready.guest_port (a forward on slirp)."""
    try:
        if ready.kind == "none":
            return True
        if ready.kind == "agent":
            return bool((await ask_guest(agent_path, "ping", timeout)).get("ok"))
        if ready.kind == "status":
            return "counter" in await get_status(port, host, timeout=timeout, netns=netns)
        if ready.kind == "tcp" and not bridged:
            return bool((await ask_guest(agent_path, f"listening {ready.port}", timeout)).get("listening"))
        if ready.kind == "tcp":
            async with asyncio.timeout(timeout):
                _, writer = await open_guest_connection(host, port, netns)
            writer.close()
            return True
        return 200 <= await http_status(host, port, ready.path, timeout, netns) < 300
    except (OSError, TimeoutError, ValueError, QemuError):
        return False
