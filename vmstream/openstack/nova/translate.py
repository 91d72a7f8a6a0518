"""Nova's terms in the agent's: VM names, power states, boot requests, a host's resources.

Pure functions over plain values, so they are unit-tested in the project's venv, where Nova
is not installed; driver.py feeds them Nova's objects and the agent's answers.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vmstream.errors import InvalidInput

# A Nova server's VM is named after the instance's uuid (36 characters of [0-9a-f-]: a valid
# vmstream name). The prefix tells Nova's VMs from any other VM the same agent runs (an
# operator's `vmstream boot`), so list_instances reports only Nova's.
VM_PREFIX = "nova-"

# nova.compute.power_state's codes (copied: this module imports without Nova).
NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED = 0, 1, 3, 4, 6, 7

# The agent's VM states (vmstream.host.state.VmState) as Nova power states. A VM being
# captured or moved still runs; one starting or arriving has no state Nova should act on.
POWER_STATES: dict[str, int] = {
    "starting": NOSTATE,
    "running": RUNNING,
    "capturing": RUNNING,
    "migrating": RUNNING,
    "incoming": NOSTATE,
    "paused": PAUSED,
    "stopping": SHUTDOWN,
    "exited": SHUTDOWN,  # the guest powered off or crashed; the row waits for destroy
}

# The Glance image property that marks an image as vmstream's demo guest: the image's bytes
# are never read (upload any small file). `openstack image set --property vmstream_guest=demo`.
GUEST_PROPERTY = "vmstream_guest"
DISK_FORMATS = ("raw", "qcow2")  # what the agent boots a disk guest from


# The Glance properties of a live image's Glance image, set by the driver's snapshot(). The
# image's bytes are a small JSON record; its memory stays in vmstream's store.
LIVE_IMAGE_PROPERTY = "vmstream_live_image"  # the vmstream live image's name: marks a live image
FLAVOR_PROPERTY = "vmstream_flavor"  # the source server's flavor id: what clones default to
SOURCE_PROPERTY = "vmstream_source_server"
MEMORY_PROPERTY = "vmstream_memory_mb"  # the image's guest memory: a flavor for its clones needs as much
HELD_STAT = "vmstream_live_images"  # compute node stat: Glance ids of the live images a host holds
LIVE_IMAGE_PREFIX = "glance-"  # a live image made by Nova is named after its Glance image


def vm_name(instance_uuid: str) -> str:
    return VM_PREFIX + instance_uuid


def instance_uuid(name: str) -> str | None:
    """The instance uuid a VM name stands for; None for a VM that is not Nova's."""
    return name[len(VM_PREFIX):] if name.startswith(VM_PREFIX) and len(name) == len(VM_PREFIX) + 36 else None


def power_state(vm_state: str) -> int:
    return POWER_STATES.get(vm_state, NOSTATE)


@dataclass(frozen=True)
class GuestSource:
    """What a server boots: the demo guest, or a disk image Glance holds (fetched to a file)."""

    kind: Literal["demo", "disk"]
    image_id: str
    disk_format: str | None = None


def guest_source(system_metadata: Mapping[str, str], image_id: str, disk_format: str | None) -> GuestSource:
    """The guest an image stands for. Custom Glance properties reach the driver only as the
    instance's system_metadata['image_<key>'] (Nova drops them from image_meta.properties)."""
    marker = system_metadata.get(f"image_{GUEST_PROPERTY}")
    if marker == "demo":
        return GuestSource("demo", image_id)
    if marker:
        raise InvalidInput(f"Glance image {image_id} has {GUEST_PROPERTY}={marker!r}: the only value is 'demo' (vmstream's "
                           f"demo guest); remove the property to boot the image's own disk")
    if disk_format not in DISK_FORMATS:
        raise InvalidInput(f"Glance image {image_id} is disk_format {disk_format!r}: vmstream boots {' or '.join(DISK_FORMATS)} "
                           f"disk images, or its demo guest (property {GUEST_PROPERTY}=demo)")
    return GuestSource("disk", image_id, disk_format)


def boot_request(name: str, memory_mb: int, vcpus: int, source: GuestSource, *, disk_path: str | None = None,
                 user_data_b64: str | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    """The agent's POST /v1/vms body for a server. The server's user data goes to a disk
    guest's cloud-init (the demo guest has none)."""
    body: dict[str, Any] = {"name": name, "memory": f"{memory_mb}M", "cpus": vcpus, "timeout": timeout_s}
    if source.kind == "disk":
        if disk_path is None:
            raise ValueError("a disk guest needs the path of its image file")
        body["disk"] = disk_path
        if user_data_b64:
            try:
                body["user_data"] = base64.b64decode(user_data_b64, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise InvalidInput(f"the server's user data is not base64 of UTF-8 text: {exc}") from exc
    return body


def live_image_name(glance_image_id: str) -> str:
    return LIVE_IMAGE_PREFIX + glance_image_id


def glance_image_id(live_image: str) -> str | None:
    """The Glance image a live image was made for; None for one not made through Nova."""
    rest = live_image[len(LIVE_IMAGE_PREFIX):]
    return rest if live_image.startswith(LIVE_IMAGE_PREFIX) and len(rest) == 36 else None


def live_image_of(system_metadata: Mapping[str, str]) -> str | None:
    """The live image a server boots from, if its Glance image is one: the property reaches
    the driver as system_metadata['image_vmstream_live_image']."""
    return system_metadata.get(f"image_{LIVE_IMAGE_PROPERTY}") or None


def clone_request(name: str, flavor_memory_mb: int, system_metadata: Mapping[str, str], metadata: Mapping[str, str],
                  user_data_b64: str | None, image_id: str) -> dict[str, Any]:
    """The agent's POST /v1/live-images/{live}/start body for one server: its VM gets the
    server's VM name; the server's metadata become the clone's guest params (the clone hooks
    see them) and its user data the clone's. A clone's memory is its image's: a flavor with
    less would let Placement count less than the clone uses, so it is refused."""
    image_mb = system_metadata.get(f"image_{MEMORY_PROPERTY}")
    if image_mb and image_mb.isdigit() and flavor_memory_mb < int(image_mb):
        # short: Nova keeps 255 characters of a fault, after its own "Build of instance ... Image ... is unacceptable: "
        raise InvalidInput(f"its clones need a flavor with at least {image_mb} MB of RAM (this one: {flavor_memory_mb} MB; "
                           f"see the image's {FLAVOR_PROPERTY})")
    body: dict[str, Any] = {"names": [name], "params": dict(metadata)}
    if user_data_b64:
        body["user_data_b64"] = user_data_b64
    return body


def snapshot_image(live: Mapping[str, Any], source_uuid: str, flavor_id: str, memory_mb: int) -> tuple[dict[str, Any], bytes]:
    """The Glance image update for a live image (metadata and its bytes, a small JSON record
    of what identifies it), from the agent's ImageInfo. Properties inherited from the
    source server's image (a clone's carries its parent's vmstream_live_image) are
    overwritten: this image is the new live image."""
    meta = {
        "disk_format": "raw", "container_format": "bare",
        "properties": {LIVE_IMAGE_PROPERTY: live["name"], FLAVOR_PROPERTY: flavor_id, SOURCE_PROPERTY: source_uuid,
                       MEMORY_PROPERTY: str(memory_mb)},
    }
    record = {"vmstream_live_image": live["name"], "memory_bytes": live["memory_bytes"],
              "memory_bytes_stored": live["memory_bytes_stored"], "parent_image": live.get("parent_image"),
              "created_at": str(live["created_at"]), "source_server": source_uuid}
    return meta, json.dumps(record, indent=1).encode() + b"\n"


def qemu_version_int(version: str) -> int:
    """'7.2.15' (or 'QEMU emulator version 7.2.15 (Debian ...)') -> 7002015, as Nova stores it."""
    for word in version.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts[:3]):
            nums = [int(p) for p in parts[:3]] + [0] * (3 - len(parts[:3]))
            return nums[0] * 1_000_000 + nums[1] * 1_000 + nums[2]
    return 0


@dataclass(frozen=True)
class HostResources:
    """What one compute (one agent's host) offers, in Nova's units."""

    vcpus: int
    memory_mb: int
    memory_mb_used: int
    local_gb: int
    local_gb_used: int
    disk_available_least: int
    qemu_version: int
    stats: dict[str, str]
    memory_density: float | None = None  # the RAM the host's VMs were given over their real footprint (PSS)


def held_live_images(images: list[Mapping[str, Any]], memfs_images: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The Glance ids of the live images whose memory this host holds: memfs has served their
    memory (root) file here since the host's caches were last dropped, so its chunks are in
    the host's chunk cache, its pages likely in the page cache. From the agent's GET /v1/live-images and GET /v1/host's memfs images."""
    read = {name for name, st in memfs_images.items() if st.get("held", int(st.get("read_bytes") or 0) > 0)}
    held = (glance_image_id(i["name"]) for i in images if (i.get("memory_root") or i["name"]) in read)
    return sorted(h for h in held if h)


def host_resources(host: Mapping[str, Any], cpus: int, disk_total_bytes: int, disk_free_bytes: int,
                   qemu_version: str, held: list[str] | None = None) -> HostResources:
    """From the agent's GET /v1/host (memory, its VMs' footprint), the CPU count and the file
    system of the agent's data dir. Memory is the host's physical RAM; how far flavors may
    overcommit it follows the VMs' density (ram_allocation_ratio); their real footprint (PSS,
    what clones share) goes to the scheduler as stats too."""
    mib, gib = 1 << 20, 1 << 30
    total = int(host["mem_total_bytes"])
    pss, given = int(host.get("vm_pss_bytes", 0)), int(host.get("vm_memory_bytes", 0))
    density = round(given / pss, 2) if pss > 0 and given > 0 else None
    stats = {
        "vmstream_mem_available_mb": str(int(host["mem_available_bytes"]) // mib),
        "vmstream_vm_pss_mb": str(int(host.get("vm_pss_bytes", 0)) // mib),
        "vmstream_vms": str(int(host.get("vms", 0))),
        HELD_STAT: ",".join(held or []),
        "vmstream_memory_density": str(density or ""),
    }
    return HostResources(
        vcpus=cpus, memory_mb=total // mib, memory_mb_used=(total - int(host["mem_available_bytes"])) // mib,
        local_gb=disk_total_bytes // gib, local_gb_used=(disk_total_bytes - disk_free_bytes) // gib,
        disk_available_least=disk_free_bytes // gib, qemu_version=qemu_version_int(qemu_version), stats=stats,
        memory_density=density)


def ram_allocation_ratio(configured: float | None, initial: float, density: float | None, cap: float) -> float:
    """MEMORY_MB's allocation ratio. The operator's [DEFAULT] ram_allocation_ratio if set; else
    how densely this host's VMs really use the RAM their flavors give them (their RAM over their
    PSS: clones share the image's pages and pay for what they write), kept between
    initial_ram_allocation_ratio and cap ([vmstream] footprint_ram_ratio_max; <= 1: off), so
    Placement packs clones as densely as they run. A start the host cannot hold after all is
    refused by the agent's admission control (VMSTREAM_HOST_MEMORY_FLOOR), and Nova tries
    another host. Not read back from the inventory: that would keep a ratio once reached."""
    if configured:
        return configured
    if density is None or cap <= 1:
        return initial
    return round(max(initial, min(cap, density)), 2)


def available_resource(res: HostResources, nodename: str, arch: str = "x86_64") -> dict[str, Any]:
    """get_available_resource()'s dict: the compute node row. hypervisor_type must be one Nova
    knows (HVType): 'qemu', which vmstream runs."""
    return {
        "vcpus": res.vcpus, "memory_mb": res.memory_mb, "local_gb": res.local_gb,
        "vcpus_used": 0, "memory_mb_used": res.memory_mb_used, "local_gb_used": res.local_gb_used,
        "hypervisor_type": "qemu", "hypervisor_version": res.qemu_version, "hypervisor_hostname": nodename,
        "cpu_info": json.dumps({"arch": arch}), "disk_available_least": res.disk_available_least,
        "supported_instances": [(arch, "qemu", "hvm")], "numa_topology": None, "stats": dict(res.stats),
    }


def inventory(res: HostResources, ratios: Mapping[str, float], reserved: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """The node's Placement inventory (update_provider_tree). ratios and reserved by resource
    class, from Nova's config (the base driver's helpers read them)."""
    totals = {"VCPU": res.vcpus, "MEMORY_MB": res.memory_mb, "DISK_GB": res.local_gb}
    return {rc: {"total": total, "min_unit": 1, "max_unit": total, "step_size": 1,
                 "allocation_ratio": ratios[rc], "reserved": reserved.get(rc, 0)}
            for rc, total in totals.items() if total > 0}


def cache_weight(image_id: str | None, held_stat: str, running_image_refs: list[str], spare_mb: int, flavor_mb: int) -> float:
    """LiveImageCacheWeigher's raw weight of one host for one server: 1.0 if servers of the
    image run there now (its pages are in the host's page cache, shared at once), 0.5 if the
    host holds its memory in the chunk cache (the compute's HELD_STAT), else 0; and 0 for a
    host without the flavor's memory to spare (MemAvailable as last reported, or Placement's
    free RAM, whichever is less). The running servers come from the scheduler's instance
    tracking, which computes update as servers start and go: fresher than the stats."""
    if not image_id or spare_mb < flavor_mb:
        return 0.0
    if image_id in running_image_refs:
        return 1.0
    return 0.5 if image_id in held_stat.split(",") else 0.0


class LazyAllocations(Mapping[str, Any]):
    """A mapping that asks for its contents only when first read (see driver.lazy_allocations)."""

    def __init__(self, fetch: Any) -> None:
        self._fetch = fetch
        self._data: Mapping[str, Any] | None = None

    def _loaded(self) -> Mapping[str, Any]:
        if self._data is None:
            self._data = self._fetch()
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._loaded()[key]

    def __iter__(self) -> Any:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    @property
    def fetched(self) -> bool:
        return self._data is not None
