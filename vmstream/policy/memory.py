"""A VM's memory policy (vmspolicyd's limit, burst size and burst time) and the balloon
size that keeps the VM inside it.

What a VM costs the host alone is its QEMU's anonymous memory: the guest RAM it wrote
(a clone's copy-on-write pages; all of a booted VM's) and QEMU's own heap. Its image's
pages are shared and not counted. The lever is the balloon: the guest may use only the
RAM the balloon leaves it, so the controller keeps what the guest can still take (its
free memory under the balloon) no larger than what the VM may still grow by. A guest
that frees memory hands it back by free page reporting, and the balloon then lets it
have that much again.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1 << 20
MIN_GUEST_BYTES = 64 * MIB
"""The least RAM the balloon ever leaves a guest: below it a Linux guest thrashes or
kills its own processes, which no limit is worth."""

MIN_LIMIT_BYTES = 32 * MIB
MARGIN = 0.02  # the controller aims this share of the allowance below it: a guest moves between samples
MAX_DEFLATE_BYTES = 64 * MIB  # the most the balloon gives back per step (a guest's page cache refills it at once)


class MemoryPolicy(BaseModel):
    """Per-VM limits. limit_bytes None: no limit (the host may still reclaim)."""

    model_config = ConfigDict(frozen=True)

    limit_bytes: int | None = Field(None, description="The most memory the VM alone may cost the host (private: written guest RAM "
                                    "and QEMU's own), bursts aside.")
    burst_bytes: int = Field(0, ge=0, description="How far above the limit the VM may go in a burst.")
    burst_s: float = Field(0.0, ge=0, description="How long a burst may last; the next one is allowed after as long under the limit.")

    @model_validator(mode="after")
    def _sane(self) -> MemoryPolicy:
        if self.limit_bytes is not None and self.limit_bytes < MIN_LIMIT_BYTES:
            raise ValueError(f"a memory limit of {self.limit_bytes >> 20} MiB is too small: give at least {MIN_LIMIT_BYTES >> 20} MiB")
        if (self.burst_bytes or self.burst_s) and self.limit_bytes is None:
            raise ValueError("a burst needs a memory limit to burst above: give --memory-limit too")
        if bool(self.burst_bytes) != bool(self.burst_s):
            raise ValueError("a burst needs both its size and its length (--burst SIZE:SECONDS, e.g. 64M:10)")
        return self


@dataclass(frozen=True)
class Sample:
    """One look at a VM."""

    t: float  # monotonic seconds
    private_bytes: int  # its QEMU's anonymous memory (RssAnon)
    ram_bytes: int  # the guest's RAM size
    balloon_bytes: int  # the RAM the balloon leaves the guest now (query-balloon "actual")
    guest_free_bytes: int | None = None  # free memory the guest reported (balloon stats); None: no stats yet


@dataclass
class Control:
    """What the controller remembers of one VM between samples."""

    burst_started: float | None = None  # when the current (or last, not yet re-armed) burst began
    under_since: float | None = None  # since when the VM has been within its limit (a burst re-arms after burst_s of it)
    target_bytes: int | None = None  # the balloon size last asked for


@dataclass(frozen=True)
class Step:
    allowed_bytes: int | None  # what the VM may cost now (limit, or limit + burst in a burst window); None: no limit
    target_bytes: int  # the balloon size to ask for (the guest RAM to leave it)
    bursting: bool


def steer(policy: MemoryPolicy, s: Sample, c: Control) -> Step:
    """The balloon size for the VM now, and the allowance it is held to.

    The guest can grow the VM's cost by at most the memory still free under its balloon,
    so the balloon is set to what the guest uses now plus the room the VM has left:
    (balloon - free) + (allowed - private), less a margin, between MIN_GUEST_BYTES and
    the guest's RAM. Without balloon stats yet, the balloon only shrinks by the excess.
    Deflation is gradual (MAX_DEFLATE_BYTES a step)."""
    if policy.limit_bytes is None:
        c.burst_started = c.under_since = None
        return Step(None, s.ram_bytes, False)
    limit = policy.limit_bytes
    if s.private_bytes > limit:
        c.under_since = None
        if policy.burst_bytes and c.burst_started is None:
            c.burst_started = s.t  # a burst begins
    else:
        if c.under_since is None:
            c.under_since = s.t
        if c.burst_started is not None and s.t - c.under_since >= policy.burst_s:
            c.burst_started = None  # rested as long as a burst may last: the next may burst again
    in_window = c.burst_started is not None and s.t - c.burst_started < policy.burst_s
    bursting = in_window and s.private_bytes > limit
    # a burst not yet used is room too: the guest may go over the limit, which starts its clock
    allowed = limit + (policy.burst_bytes if in_window or c.burst_started is None else 0)
    room = allowed - int(allowed * MARGIN) - s.private_bytes  # what the VM may still grow by (negative: over)
    if s.guest_free_bytes is not None:
        used = max(0, s.balloon_bytes - s.guest_free_bytes)
        target = used + room
    else:
        target = s.balloon_bytes + min(room, 0)
    target = min(target, s.balloon_bytes + MAX_DEFLATE_BYTES)
    target = max(MIN_GUEST_BYTES, min(s.ram_bytes, target))
    c.target_bytes = target
    return Step(allowed, target, bursting)
