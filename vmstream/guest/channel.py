"""Host side of the in-guest agent: one JSON line per command over the
virtio console, which QEMU exposes as the VM's agent.sock."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmstream.errors import QemuError

ANSWER_LIMIT = 1 << 20  # the longest answer line read (the in-guest agent writes at most 256 KiB)


@contextlib.contextmanager
def channel_errors(who: str, socket_path: Path, what: str, timeout: float, hint: str = "") -> Iterator[None]:
    """A guest channel's timeout or socket error as a QemuError naming the channel and command."""
    try:
        yield
    except TimeoutError as exc:
        raise QemuError(f"{who} did not answer {what} within {timeout:.0f}s{hint}") from exc
    except OSError as exc:
        raise QemuError(f"cannot reach {who} at {socket_path}: {exc}") from exc


async def ask_guest(
    socket_path: Path, command: str, timeout: float = 10.0, expect: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """Send one command line to the in-guest agent and return its JSON answer.

    expect: skip answers it rejects. A clone's channel can still hold an answer its
    source VM's agent wrote just before the capture (e.g. to a hooks query)."""
    try:
        with channel_errors("the guest agent", socket_path, f"'{command}'", timeout):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=ANSWER_LIMIT)
                try:
                    writer.write(command.encode() + b"\n")
                    await writer.drain()
                    while True:
                        line = await reader.readline()
                        if not line:
                            raise QemuError(f"the guest agent closed the channel during '{command}'")
                        text = line.decode(errors="replace").strip()
                        if text.startswith("{"):
                            answer: dict[str, Any] = json.loads(text)
                            if expect is None or expect(answer):
                                return answer
                finally:
                    writer.close()
    except json.JSONDecodeError as exc:
        raise QemuError(f"the guest agent answered '{command}' with bad JSON: {exc}") from exc
