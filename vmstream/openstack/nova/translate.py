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
    "stopping": SHUTDOWN,
    "exited": SHUTDOWN,  # the guest powered off or crashed; the row waits for destroy
}

# The Glance image property that marks an image as vmstream's demo guest: the image's bytes
# are never read (upload any small file). `openstack image set --property vmstream_guest=demo`.
GUEST_PROPERTY = "vmstream_guest"
DISK_FORMATS = ("raw", "qcow2")  # what the agent boots a disk guest from


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


def host_resources(host: Mapping[str, Any], cpus: int, disk_total_bytes: int, disk_free_bytes: int,
                   qemu_version: str) -> HostResources:
    """From the agent's GET /v1/host (memory, its VMs' footprint), the CPU count and the file
    system of the agent's data dir. Memory is the host's physical RAM: Placement's allocation
    ratio (nova.conf initial_ram_allocation_ratio) decides how far flavors may overcommit it;
    the VMs' real footprint (PSS, what clones share) goes to the scheduler as stats."""
    mib, gib = 1 << 20, 1 << 30
    total = int(host["mem_total_bytes"])
    stats = {
        "vmstream_mem_available_mb": str(int(host["mem_available_bytes"]) // mib),
        "vmstream_vm_pss_mb": str(int(host.get("vm_pss_bytes", 0)) // mib),
        "vmstream_vms": str(int(host.get("vms", 0))),
    }
    return HostResources(
        vcpus=cpus, memory_mb=total // mib, memory_mb_used=(total - int(host["mem_available_bytes"])) // mib,
        local_gb=disk_total_bytes // gib, local_gb_used=(disk_total_bytes - disk_free_bytes) // gib,
        disk_available_least=disk_free_bytes // gib, qemu_version=qemu_version_int(qemu_version), stats=stats)


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
