"""Request and response bodies of the agent's REST API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from vmstream.guest.identity import MAX_GUEST_COMMAND
from vmstream.host.footprint import Footprint
from vmstream.host.state import VmState
from vmstream.policy import MemoryPolicy


@dataclass(frozen=True)
class BootSource:
    """How a disk guest boots: 'auto' (vmstream's kernel for a bare file system or the
    built Debian guest, else the disk's own bootloader), 'firmware', 'vmstream', or a
    given kernel (with initrd and command line)."""

    mode: Literal["auto", "firmware", "vmstream"] = "auto"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None


class BootRequest(BaseModel):
    name: str
    memory: str = "256M"
    cpus: int = Field(1, ge=1, le=16)
    guest_agent: Literal["native", "portable"] = "native"
    disk: str | None = Field(None, description="boot a disk guest: a raw/qcow2 image path, or 'debian' for the built one")
    ready: str | None = Field(None, description="when the VM is ready: status, agent, none, tcp:PORT or http:PORT/PATH; "
                              "default: status for the demo and 'debian' guests, agent for another disk image")
    timeout: float = Field(240.0, gt=0, le=3600, description="seconds to wait for it to be ready; then it is stopped, its logs kept")
    publish: list[str] = Field(default_factory=list, description="guest ports to forward from 127.0.0.1: HOST:GUEST or GUEST "
                               "(any free host port); a clone gets its own host ports for them")
    boot: Literal["auto", "firmware", "vmstream"] = Field(
        "auto", description="a disk guest: 'firmware' (its own bootloader, BIOS), 'vmstream' (vmstream's kernel, root file "
        "system on /dev/vda or /dev/vda1), 'auto' (firmware if the disk has a partition table, except the built Debian guest)")
    kernel: str | None = Field(None, description="a disk guest: boot this kernel (a file on the agent's host) instead")
    memory_policy: MemoryPolicy | None = Field(None, description="a limit on what the VM alone may cost the host, and bursts above it")
    initrd: str | None = Field(None, description="with kernel: its initrd")
    append: str | None = Field(None, description="with kernel: its command line (default: root=/dev/vda1 ro console=ttyS0)")
    user_data: str | None = Field(None, description="cloud-init user-data, handed to the guest in a NoCloud seed at first boot")


class VmMemoryInfo(BaseModel):
    """A VM's memory policy and what the agent's controller last saw of it."""

    policy: MemoryPolicy | None = None
    private_bytes: int | None = None  # what the VM alone costs the host now (its QEMU's anonymous memory)
    balloon_bytes: int | None = None  # the guest RAM the balloon leaves it now
    guest_free_bytes: int | None = None  # free memory the guest last reported
    allowed_bytes: int | None = None  # its limit now (with a burst's allowance while one is open)
    target_bytes: int | None = None  # the balloon size the controller asked for
    bursting: bool = False
    sampled_at: float | None = None  # host time of that look


class VmInfo(BaseModel):
    name: str
    state: VmState
    endpoint: str
    pid: int | None
    memory_bytes: int
    cpus: int
    accel: str
    parent_image: str | None
    ready_s: float | None
    created_at: datetime
    hostname: str
    mac: str
    vmgenid: str
    identity_applied_s: float | None = None  # request to new identity applied in the guest
    hooks: dict[str, Any] | None = None  # clone hook results, once they have run
    phases: dict[str, float] | None = None  # start-up phases, seconds since the request
    clock: dict[str, Any] | None = None  # a clone's clock, once set: offset found, steps, offset left
    footprint: Footprint | None = None
    migrated_from: str | None = None  # the peer this VM came from, if it arrived by migration
    disk: str | None = None  # a disk guest's current qcow2 overlay
    ready: str = "status"  # its readiness check (vmstream.guest.readiness)
    ports: dict[str, int] = Field(default_factory=dict)  # published guest port -> host port on 127.0.0.1 (besides 80: endpoint)
    boot: str = "vmstream"  # how it booted: vmstream (its kernel), firmware (the disk's bootloader), kernel PATH
    cloud_init_seed: bool = False  # it has a cloud-init NoCloud seed attached (booted with user-data, or a clone of such a VM)
    balloon: bool = False  # its machine has a virtio balloon: the host can take memory back (VMs and images from before have none)
    memory: VmMemoryInfo | None = None  # its memory policy and the controller's last look (show only)


class CreateImageRequest(BaseModel):
    vm: str
    name: str
    flatten: bool | None = None  # None: delta unless large


class ImageInfo(BaseModel):
    name: str
    created_at: datetime
    source_vm: str
    parent_image: str | None
    memory_bytes: int
    memory_bytes_stored: int
    devstate_bytes: int
    pause_ms: float
    clones: int
    layout: str
    memory_root: str | None
    source_private_bytes: int


class WarmResult(BaseModel):
    image: str
    memory_bytes_read: int
    elapsed_s: float


class StartRequest(BaseModel):
    count: int = Field(1, ge=1, le=256)
    name: str | None = Field(None, description="the clones' name prefix: they are PREFIX-1, PREFIX-2, ... (default: the image's name)")
    names: list[str] | None = Field(None, min_length=1, max_length=256,
                                    description="the clones' exact names instead (count must then be their number or 1)")
    params: dict[str, str] = Field(default_factory=dict)
    user_data_b64: str | None = None
    prefetch: bool = True  # fetch the image's recorded working set if this host lacks it
    pool: bool = True  # take the image's pooled QEMUs if ready (False: start every QEMU anew)
    memory_policy: MemoryPolicy | None = Field(None, description="each clone's memory limit and bursts")


class StartResult(BaseModel):
    image: str
    vms: list[VmInfo]
    elapsed_s: float


class QgaCommand(BaseModel):
    execute: str
    arguments: dict[str, Any] | None = None
    timeout: float = Field(10.0, ge=1, le=600)


class ClockReading(BaseModel):
    """A guest's wall clock against the host's, from the shortest of a few round trips."""

    vm: str
    source: Literal["agent", "qga"]  # the vmstream agent's 'time', or qemu-guest-agent's guest-get-time
    offset_s: float  # guest minus host
    error_s: float  # the most offset_s can be off: half the round trip
    guest_time: float
    host_time: float  # the round trip's midpoint


class GuestCommand(BaseModel):
    # one line for the in-guest agent: printable, a verb and its arguments (see `vmstream guest ask`)
    command: str = Field(min_length=1, max_length=MAX_GUEST_COMMAND, pattern=r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*$",
                         description="a command line for the in-guest agent: printable characters, not only spaces")
    timeout: float = Field(30.0, ge=1, le=600)


class ErrorBody(BaseModel):
    """Every error the agent answers: the error's kind and what to do about it."""

    error: str
    message: str


class GuestBuildRequest(BaseModel):
    kernel: str | None = None
    force: bool = False


class HostInfo(BaseModel):
    version: str
    data_dir: str
    qemu_version: str
    accelerator: str
    accelerator_reason: str
    guest: dict[str, Any] | None
    settings: dict[str, Any] = Field(default_factory=dict)  # the values this agent runs with (secrets masked)


class PeerRequest(BaseModel):
    url: str = Field(description="the peer agent's base URL, e.g. http://10.0.0.2:8400")
    token: str = Field(min_length=1)


class PeerInfo(BaseModel):
    name: str
    url: str
    added_at: datetime


class LentAddress(BaseModel):
    """An address of this host's range kept for a VM that migrated to a peer."""

    ip: str
    vm: str
    to_host: str = Field(description="the peer it moved to (it may have moved on since)")
    lent_at: datetime


class MigrateRequest(BaseModel):
    to: str = Field(description="a peer host's name (see 'vmstream peer list')")
    mode: Literal["auto", "live", "delta"] = "auto"
    max_bandwidth_mbps: float | None = Field(None, gt=0, description="live mode: cap the stream at this many MB/s")


class MigrationInfo(BaseModel):
    """One migration as the source host sees it; kept after it ends."""

    vm: str
    to: str
    requested_mode: str
    mode: str | None = None  # the one chosen, once the destination answered
    state: Literal["preparing", "running", "completed", "failed", "cancelled"]
    progress: dict[str, Any] | None = None  # the latest vmstream.migrate.Progress
    result: dict[str, Any] | None = None  # vmstream.migrate.MigrationResult once completed
    error: str | None = None
    started_at: datetime
    elapsed_s: float


class IncomingRequest(BaseModel):
    """Source agent -> destination agent: get ready to receive this VM."""

    name: str
    from_host: str
    mode: Literal["auto", "live", "delta"]
    machine: dict[str, Any]  # the source's MachineSpec fields (JSON-safe), see host.migration
    send_configuration: bool
    parent_image: str | None
    identity: dict[str, str]  # hostname, mac, vmgenid: the VM keeps them when it moves
    guest_key: str  # the guest build's key (a hash of its inputs): both hosts must have the same guest
    ready: str | None = None  # its readiness check; published guest ports come with the machine's forwards


class IncomingAnswer(BaseModel):
    mode: Literal["live", "delta"]
    uri: str | None = None  # live: QEMU's migration URI
    host: str | None = None  # delta: where the delta receiver listens
    port: int | None = None


class IncomingStatus(BaseModel):
    name: str
    state: str
    alive: bool
    running: bool = Field(False, description="its QEMU runs the guest: the migration reached its end here")
    reason: str = ""


class GroupUpdate(BaseModel):
    """What a group's owner may change while it runs; the scaler goes by it from its next look."""

    min_size: int | None = Field(None, ge=0, le=256)
    max_size: int | None = Field(None, ge=1, le=256)
    target_inflight: float | None = Field(None, gt=0, le=10_000, description="requests in service or waiting, per member")
    scale_in_delay_s: float | None = Field(None, ge=0, le=86_400, description="load must stay low this long before members leave")


class GroupRequest(BaseModel):
    name: str
    image: str = Field(description="the live image whose clones are the members")
    min_size: int = Field(1, ge=0, le=256)
    max_size: int = Field(10, ge=1, le=256)
    target_inflight: float = Field(4.0, gt=0, le=10_000, description="requests in service or waiting, per member")
    port: int = Field(ge=1024, le=65535, description="HAProxy listens on 127.0.0.1:port")
    member_port: int = Field(80, ge=1, le=65535, description="the guest port members serve on")
    health_path: str = Field("/", pattern=r"^/[A-Za-z0-9._~!$&()*+,;=:@/%?-]*$", max_length=200,
                             description="HAProxy checks GET path (2xx/3xx: up)")
    member_maxconn: int | None = Field(None, ge=1, le=10_000,
                                       description="at most this many requests at a member at once; the rest wait in HAProxy")
    scale_in_delay_s: float = Field(10.0, ge=0, le=86_400, description="load must stay low this long before members leave")
    start: Literal["clone", "boot"] = Field("clone", description="members are clones of the image, or cold-booted VMs (a baseline)")
    hosts: list[str] = Field(["local"], min_length=1, max_length=16,
                             description="where members run: 'local' (this host) and peer names; each new member goes to the one "
                                         "with the fewest")


class GroupMember(BaseModel):
    name: str
    host: str  # 'local' or the peer it runs on
    state: str  # starting | serving | leaving
    since: datetime
    balancer_status: str | None  # HAProxy's: UP, DOWN, DRAIN, MAINT...
    in_service: int  # requests at it now
    served: int  # requests HAProxy sent it


class GroupEvent(BaseModel):
    at: datetime
    action: str  # scale-out | scale-in | start-failed | lost
    vms: list[str]
    detail: str = ""


class GroupInfo(BaseModel):
    name: str
    image: str
    min_size: int
    max_size: int
    target_inflight: float
    port: int
    endpoint: str
    member_port: int
    health_path: str
    member_maxconn: int | None
    scale_in_delay_s: float
    start: str
    hosts: list[str]
    created_at: datetime
    balancer_pid: int | None
    members: list[GroupMember]
    serving: int
    load: int  # requests in service or waiting in HAProxy, at the scaler's last look
    queued: int  # of which waiting in HAProxy's queue
    wanted: int  # members the scaler wants
    last_error: str | None
    events: list[GroupEvent]
