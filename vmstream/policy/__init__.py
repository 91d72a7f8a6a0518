"""Memory policy: what each VM may cost the host, and how to steer it there.

Pure decisions over samples (no QEMU, no /proc): the host agent samples its VMs,
asks `steer` what balloon size each should have, and applies it.
"""

from vmstream.policy.admission import CLONE_START_BYTES, check_room, parse_floor, start_cost
from vmstream.policy.memory import MIN_GUEST_BYTES, Control, MemoryPolicy, Sample, Step, steer

__all__ = ["CLONE_START_BYTES", "MIN_GUEST_BYTES", "Control", "MemoryPolicy", "Sample", "Step", "check_room", "parse_floor",
           "start_cost", "steer"]
