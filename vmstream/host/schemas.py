"""Request and response bodies of the agent's REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from vmstream.host.footprint import Footprint


class BootRequest(BaseModel):
    name: str
    memory: str = "256M"
    cpus: int = Field(1, ge=1, le=16)
    guest_agent: Literal["native", "portable"] = "native"


class VmInfo(BaseModel):
    name: str
    state: str
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
    footprint: Footprint | None = None


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


class StartRequest(BaseModel):
    count: int = Field(1, ge=1, le=256)
    name: str | None = None
    params: dict[str, str] = Field(default_factory=dict)
    user_data_b64: str | None = None
    prefetch: bool = True  # fetch the image's recorded working set if this host lacks it


class StartResult(BaseModel):
    image: str
    vms: list[VmInfo]
    elapsed_s: float


class GuestCommand(BaseModel):
    command: str
    timeout: float = Field(30.0, gt=0, le=600)


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
