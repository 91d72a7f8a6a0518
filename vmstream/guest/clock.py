"""A guest's wall clock against the host's: read it, and set it exactly.

A time the host stamps and sends is late by however long it takes to be
applied: a clone's identity is stamped before the guest even runs, and the
shell agent forks before it sets anything (2.4-5.5 s behind, #15). So a
clone's clock is measured after it starts and stepped by the offset: the
agent adds the step in the kernel (clock_adjtime ADJ_SETOFFSET), which is
right however late the command arrives. A reading is taken from several round
trips, and the shortest one is kept: the guest read its clock somewhere inside
it, so half of it bounds the error (as NTP does).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vmstream.errors import QemuError
from vmstream.guest.channel import ask_guest
from vmstream.guest.qga import qga

SAMPLES = 4  # round trips per reading; the shortest is kept
TOLERANCE_S = 0.002  # no step for an offset this small (or smaller than the reading's error)
READINGS = 6  # readings after the first at most: after a step, or for a tighter bound


@dataclass(frozen=True)
class ClockSample:
    """One round trip: host wall time before asking and after the answer, and the guest's time in it."""

    sent: float
    received: float
    guest: float

    @property
    def offset_s(self) -> float:
        """Guest minus host, taking the guest's reading to be at the round trip's midpoint."""
        return self.guest - (self.sent + self.received) / 2

    @property
    def error_s(self) -> float:
        """The most the offset can be wrong: the guest read its clock inside the round trip."""
        return (self.received - self.sent) / 2


def best(samples: list[ClockSample]) -> ClockSample:
    """The sample with the shortest round trip (the tightest bound)."""
    if not samples:
        raise ValueError("no clock samples")
    return min(samples, key=lambda s: s.received - s.sent)


def step_text(seconds: float) -> str:
    """A step as the agents take it: explicit sign, nanoseconds, no exponent."""
    return f"{seconds:+.9f}"


ReadClock = Callable[[], Awaitable[float]]


async def read(read_guest: ReadClock, samples: int = SAMPLES) -> ClockSample:
    """The guest's clock against the host's, from the shortest of `samples` round trips."""
    taken = []
    for _ in range(samples):
        sent = time.time()
        guest = await read_guest()
        taken.append(ClockSample(sent, time.time(), guest))
    return best(taken)


@dataclass(frozen=True)
class ClockSync:
    """What setting a clone's clock did: the offset it found, its steps, and what is left."""

    offset_before_s: float
    offset_s: float  # after the last step
    error_s: float  # of that last reading
    steps: int
    method: str  # "step" (measured and stepped), or "set" (an agent without clock-step: a time sent ahead)

    def as_dict(self) -> dict[str, float | int | str]:
        return {"offset_before_s": round(self.offset_before_s, 6), "offset_s": round(self.offset_s, 6),
                "error_s": round(self.error_s, 6), "steps": self.steps, "method": self.method}


async def sync(read_guest: ReadClock, step: Callable[[float], Awaitable[bool]],
               readings: int = READINGS, tolerance_s: float = TOLERANCE_S) -> ClockSync:
    """Measure the guest's offset and step its clock by it until it is within the
    tolerance (or within what the reading can tell); step() False: the agent cannot step."""
    first = sample = await read(read_guest)
    steps = 0
    for _ in range(readings):
        if abs(sample.offset_s) <= tolerance_s:
            break
        if abs(sample.offset_s) > sample.error_s:  # else the reading cannot tell: read again
            if not await step(-sample.offset_s):
                return ClockSync(first.offset_s, sample.offset_s, sample.error_s, steps, "set")
            steps += 1
        sample = await read(read_guest)
    return ClockSync(first.offset_s, sample.offset_s, sample.error_s, steps, "step")


# ---- the two guest channels that can read a clock ------------------------------------


def agent_clock(socket: Path, timeout: float = 10.0) -> ReadClock:
    """Read the guest's clock through the vmstream agent ('time')."""
    async def read_guest() -> float:
        answer = await ask_guest(socket, "time", timeout, expect=lambda a: "time" in a)
        return float(answer["time"])
    return read_guest


def qga_clock(socket: Path, timeout: float = 10.0) -> ReadClock:
    """Read the guest's clock through qemu-guest-agent (guest-get-time, disk guests)."""
    async def read_guest() -> float:
        return int(await qga(socket, "guest-get-time", timeout=timeout)) / 1e9
    return read_guest


async def sync_agent_clock(socket: Path, timeout: float = 10.0) -> ClockSync:
    """Set a clone's clock exactly through its vmstream agent. An agent from before
    clock-step gets the host's time sent ahead instead ('clock S.N', as before)."""
    async def step(seconds: float) -> bool:
        answer = await ask_guest(socket, f"clock-step {step_text(seconds)}", timeout)
        if answer.get("ok"):
            return True
        if "unknown command" not in str(answer.get("error", "")):
            raise QemuError(f"the guest agent could not step the clock: {answer.get('error')}")
        await ask_guest(socket, f"clock {time.time():.9f}", timeout)
        return False
    return await sync(agent_clock(socket, timeout), step)
