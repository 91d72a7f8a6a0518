"""Host side of the in-guest agent: one JSON line per command over the
virtio console, which QEMU exposes as the VM's agent.sock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmstream.errors import QemuError


async def ask_guest(
    socket_path: Path, command: str, timeout: float = 10.0, expect: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """Send one command line to the in-guest agent and return its JSON answer.

    expect: skip answers it rejects. A clone's channel can still hold an answer its
    source VM's agent wrote just before the capture (e.g. to a hooks query)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
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
    except TimeoutError as exc:
        raise QemuError(f"the guest agent did not answer '{command}' within {timeout:.0f}s") from exc
    except OSError as exc:
        raise QemuError(f"cannot reach the guest agent at {socket_path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise QemuError(f"the guest agent answered '{command}' with bad JSON: {exc}") from exc
