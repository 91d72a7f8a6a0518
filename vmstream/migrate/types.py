"""What a migration reports: progress while it runs, a result when it ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from vmstream.errors import QemuError


class MigrationError(QemuError):
    """The migration did not happen; the message says why and where the VM runs now."""


class MigrationCancelled(MigrationError):
    """Cancelled on request; the VM runs on the source."""


@dataclass(frozen=True)
class Progress:
    """One sample of a running migration (from QEMU's query-migrate, or the delta sender)."""

    mode: str  # "live" or "delta"
    status: str  # QEMU's: setup, active, postcopy-active, device, completed, ...; delta: copying, paused, ...
    elapsed_s: float
    bytes_sent: int
    remaining_bytes: int
    rounds: int  # live: dirty-sync-count; delta: copy rounds (1 before the pause, 2 during)
    expected_downtime_ms: float | None = None
    dirty_pages_rate: int | None = None
    mbps: float | None = None
    postcopy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


@dataclass
class MigrationResult:
    mode: str
    total_s: float
    downtime_ms: float  # live: as QEMU reports it; delta: the source's measured pause
    bytes_sent: int
    rounds: int
    postcopy: bool = False
    private_bytes: int | None = None  # delta: the clone's private pages when paused
    setup_ms: float | None = None
    switch_ms: float | None = None  # destination running -> network committed, announce sent
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NetworkSwitch(Protocol):
    """The network side of a move (see vmstream.net.FabricSwitch).

    open() runs just before the source stops, so frames sent during the
    switch-over also reach the destination; commit() once the destination
    runs; abort() when the VM stays on the source.
    """

    def open(self) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Target(Protocol):
    """The destination QEMU of a live migration, as the source side sees it.

    LocalTarget wraps a QemuProcess in this process; a host agent migrating to
    another host uses one that asks the destination's agent over HTTP.
    """

    async def alive(self) -> bool: ...

    async def exit_reason(self) -> str: ...

    async def wait_running(self, timeout: float) -> None: ...

    async def announce(self) -> None: ...

    async def claim_network(self) -> None:
        """The source has stopped: frames for the VM should wait at the destination now."""
        ...

    async def remove(self) -> None: ...


class NoSwitch:
    """For VMs whose network needs no moving (slirp, or QEMU's announce is enough)."""

    def open(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass
