"""qemu-guest-agent over its virtio-serial channel (disk guests have it).

The protocol is QMP-like JSON without a greeting; guest-sync with a random id
first discards anything a previous client left unread in the channel.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

from vmstream.errors import QemuError
from vmstream.guest.channel import channel_errors

LINE_LIMIT = 64 << 20  # qemu-guest-agent's guest-file-read returns at most 48 MB, as base64


async def qga(socket_path: Path, execute: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Run one qemu-guest-agent command; its 'return' value, or QemuError."""
    with channel_errors("qemu-guest-agent", socket_path, execute, timeout, " (is it installed and running?)"):
        async with asyncio.timeout(timeout):
            # one answer is one line: a guest-file-read of 64 KiB is ~87 KB of base64 (asyncio's default limit is 64 KiB)
            reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=LINE_LIMIT)
            try:
                sync_id = secrets.randbelow(1 << 31)
                writer.write(json.dumps({"execute": "guest-sync", "arguments": {"id": sync_id}}).encode() + b"\n")
                await writer.drain()
                while True:  # skip stale answers until our sync comes back
                    line = await reader.readline()
                    if not line:
                        raise QemuError("qemu-guest-agent closed the channel")
                    try:
                        if json.loads(line).get("return") == sync_id:
                            break
                    except (ValueError, AttributeError):
                        continue
                cmd: dict[str, Any] = {"execute": execute}
                if arguments:
                    cmd["arguments"] = arguments
                writer.write(json.dumps(cmd).encode() + b"\n")
                await writer.drain()
                if execute in ("guest-shutdown", "guest-suspend-disk", "guest-suspend-ram"):
                    return None  # these do not answer on success
                answer = json.loads(await reader.readline())
            finally:
                writer.close()
    if "error" in answer:
        raise QemuError(f"qemu-guest-agent {execute}: {answer['error'].get('desc', answer['error'])}")
    return answer.get("return")
