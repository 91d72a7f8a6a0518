"""Disk guests' qcow2 files: a VM's overlay, freezing it at capture, an image's disk layer.

    base image (raw/qcow2, never written) <- VM overlay (rundir/disk-N.qcow2)
    at live-image create, in the pause:  blockdev-snapshot-sync -> the VM goes on
    writing to a new overlay; the old one is frozen at the pause instant, matching
    the captured memory, and is converted into the image's disk layer
    (images/NAME/disk.qcow2: the changes over the VM's base). A clone runs on its
    own overlay on that layer, so clones share the image's disk and pay for their writes.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from vmstream.errors import QemuError

LAYER = "disk.qcow2"
SEED = "seed.iso"  # a VM's cloud-init seed (vmstream.guest.cloudinit), in its run dir and its images' dirs


async def _qemu_img(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"qemu-img {args[0]} failed: {err.decode(errors='replace').strip()[-500:]}")
    return out.decode()


async def image_format(path: Path) -> str:
    info = json.loads(await _qemu_img("info", "-U", "--output=json", str(path)))
    return str(info["format"])


async def partitioned(path: Path) -> bool:
    """Whether the image starts with a partition table (an MBR's 55 AA), as a disk
    with its own bootloader does; a bare file system (vmstream's kernel mounts it) does not."""
    with tempfile.TemporaryDirectory(prefix="vmstream-mbr-") as tmp:  # not beside it: its dir may be read-only
        out = Path(tmp) / "mbr"
        await _qemu_img("dd", "-U", "-f", await image_format(path), "-O", "raw", "bs=512", "count=1", f"if={path}", f"of={out}")
        return out.read_bytes()[510:512] == b"\x55\xaa"


async def overlay(base: Path, rundir: Path) -> Path:
    """A new qcow2 overlay in rundir on base (which is never written)."""
    existing = sorted(rundir.glob("disk-*.qcow2"))
    return await overlay_at(base, rundir / f"disk-{len(existing)}.qcow2")


async def overlay_at(base: Path, path: Path) -> Path:
    """A new qcow2 file at path on base (raw or qcow2, never written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    await _qemu_img("create", "-q", "-f", "qcow2", "-F", await image_format(base), "-b", str(base), str(path))
    return path


async def freeze(qmp: Any, rundir: Path, frozen: list[Path]) -> None:
    """In the capture pause: switch the VM to a new overlay; frozen gets [old, new]."""
    info = await qmp.execute("query-block")
    current = next((Path(b["inserted"]["file"]) for b in info if b.get("device") == "disk0" and "inserted" in b), None)
    if current is None:
        raise QemuError("the VM has no disk0 to capture")
    new = rundir / f"disk-{len(list(rundir.glob('disk-*.qcow2')))}.qcow2"
    await qmp.execute("blockdev-snapshot-sync", {"device": "disk0", "snapshot-file": str(new), "format": "qcow2"})
    frozen[:] = [current, new]


async def layer(frozen: Path, base: Path, out: Path) -> None:
    """The image's disk layer: what the frozen overlay chain holds over base, as one qcow2 on base."""
    await _qemu_img("convert", "-U", "-O", "qcow2", "-B", str(base), "-F", await image_format(base), str(frozen), str(out))
