"""The live-image manifest: what a clone needs to continue from the snapshot.

Immutable once committed. In this version memory is one local sparse file;
the chunk store replaces that with a chunk map behind the same
`ImageRepository.memory_path` seam.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class GuestConfig(BaseModel):
    """The machine a clone must recreate for the device state to load."""

    model_config = ConfigDict(frozen=True)

    memory_bytes: int
    cpus: int
    kernel: str  # "": the disk's own bootloader booted it (firmware boot)
    initrd: str  # "": none
    accel: str
    hostname: str
    mac: str
    vmgenid: str
    qemu_version: str
    disk: bool = False  # a disk guest: the image has a disk layer (disk.qcow2) clones run on
    guest_announce: bool = True  # the NIC's (MachineSpec.guest_announce); images made before it was off have it on
    ready: str = "status"  # when a clone is ready (vmstream.guest.readiness); images from before it: the demo status page
    append: str | None = None  # a given kernel's command line; None: vmstream's own
    seed: bool = False  # booted with a cloud-init seed: the image keeps it (seed.iso), clones attach it
    guest_ports: tuple[int, ...] = ()  # guest ports published besides 80; each clone gets its own host ports for them
    balloon: bool = False  # the machine has a virtio balloon (MachineSpec.balloon); images made before it have none


class LiveImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: int = 1
    name: str
    created_at: datetime
    source_vm: str
    parent_image: str | None  # the image the source VM was cloned from, if any
    # "full": this image's own memory.raw. "delta": the root image's memory.raw
    # with this image's delta pages applied on top (see capture.delta).
    layout: str = "full"
    memory_root: str | None = None  # for "delta": the image whose memory.raw clones map
    guest: GuestConfig
    devstate_file: str = "devstate.bin"
    memory_ref: str | None = None  # store ref of a "full" image's memory
    pause_ms: float
    devstate_bytes: int
    memory_bytes_stored: int
    source_private_bytes: int
