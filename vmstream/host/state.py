"""A VM's state, and which operations each state allows.

Like qemu.qmp's run-state guard: an operation asks for the states it needs
and gets a Conflict (exit 4) that names the state and what to do, before it
changes anything. Transient states (starting, stopping, capturing,
migrating, incoming) belong to the one operation that set them.
"""

from __future__ import annotations

from enum import StrEnum

from vmstream.errors import Conflict


class VmState(StrEnum):
    STARTING = "starting"  # its QEMU is being started (boot, clone start)
    RUNNING = "running"
    CAPTURING = "capturing"  # being captured into a live image; it keeps running
    MIGRATING = "migrating"  # moving to another host; it runs here until the switch-over
    STOPPING = "stopping"  # being destroyed
    EXITED = "exited"  # its QEMU is gone (the guest powered off or crashed); the row waits for destroy
    INCOMING = "incoming"  # migrating to this host
    POOLED = "pooled"  # a clone pool's paused QEMU, not a VM anybody named
    PAUSED = "paused"  # its vCPUs stopped (vmstream pause): memory and devices kept, no CPU used


class Op(StrEnum):
    DESTROY = "destroy"
    CAPTURE = "live-image create"
    MIGRATE = "migrate"
    ASK = "guest ask"
    QGA = "qga"
    PAUSE = "pause"
    UNPAUSE = "unpause"


# Where the guest runs (its agents answer).
GUEST_RUNS = frozenset({VmState.RUNNING, VmState.CAPTURING, VmState.MIGRATING})
# Where a VM's QEMU runs as the VM (a process to watch).
LIVE = GUEST_RUNS | {VmState.PAUSED}

ALLOWED: dict[Op, frozenset[VmState]] = {
    Op.DESTROY: frozenset({VmState.RUNNING, VmState.PAUSED, VmState.EXITED}),
    Op.CAPTURE: frozenset({VmState.RUNNING}),
    Op.MIGRATE: frozenset({VmState.RUNNING}),
    Op.ASK: GUEST_RUNS,
    Op.QGA: GUEST_RUNS,
    Op.PAUSE: frozenset({VmState.RUNNING}),
    Op.UNPAUSE: frozenset({VmState.PAUSED}),
}

_WHY: dict[VmState, str] = {
    VmState.STARTING: "wait for its start to finish",
    VmState.CAPTURING: "wait for 'live-image create' to finish",
    VmState.MIGRATING: "wait for the migration to end, or cancel it with 'vmstream migrate {name} --cancel'",
    VmState.STOPPING: "it is being destroyed",
    VmState.EXITED: "its QEMU has exited: 'vmstream destroy {name}' removes it",
    VmState.INCOMING: "it is migrating to this host: wait for it to arrive",
    VmState.PAUSED: "'vmstream unpause {name}' runs it again",
    VmState.RUNNING: "it runs already",
}


def check(name: str, state: str, op: Op) -> None:
    """Raise Conflict unless a VM in this state may undergo op."""
    if VmState(state) in ALLOWED[op]:
        return
    hint = _WHY.get(VmState(state), "")
    raise Conflict(f"VM {name} is {state}: '{op}' is not possible now" + (f"; {hint.format(name=name)}" if hint else ""))
