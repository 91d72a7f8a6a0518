"""How many members a group behind a balancer should have: the decision, apart from how members
start and go (clones on this host, or Nova servers), so both kinds of group size alike.

Each look (every ~200 ms) gives the load: requests in service at members plus those waiting in
HAProxy's queue (BackendStats.load). The group wants ceil(load / target) members, averaged over
the last few looks so that one busy instant at low load does not add a VM, kept within
[min_size, max_size]. More wanted than there are (serving + starting): the gap starts at once,
in one batch. Fewer wanted for scale_in_delay_s on end, and nothing starting: the extra leave.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

SMOOTH_LOOKS = 3  # looks averaged for the size wanted (0.6 s at 200 ms)


def wanted(loads: Sequence[float], target: float, min_size: int, max_size: int) -> int:
    """The members a group wants for its recent loads (requests in service or waiting)."""
    if not loads:
        return min_size
    need = math.ceil(sum(loads) / len(loads) / target - 1e-9)
    return max(min_size, min(max_size, need))


@dataclass
class Sizer:
    """A group's sizing from look to look: what it saw, and when it last changed size."""

    loads: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=SMOOTH_LOOKS))
    history: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)  # (time, wanted)
    last_change: float = 0.0

    def wanted(self, target: float, min_size: int, max_size: int) -> int:
        return wanted(self.loads, target, min_size, max_size)

    def look(self, now: float, load: float, members: int, starting: int, *, target: float, min_size: int, max_size: int,
             scale_in_delay_s: float) -> int:
        """One look: how many members to start (> 0), to let go (< 0), or 0. members counts
        those starting and serving, not those leaving."""
        self.loads.append(load)
        want = self.wanted(target, min_size, max_size)
        self.history.append((now, want))
        while self.history and self.history[0][0] < now - scale_in_delay_s:
            self.history.popleft()
        if want > members:
            self.last_change = now
            return want - members
        if starting or members <= min_size or now - self.last_change < scale_in_delay_s:
            return 0
        keep = max(min_size, max(w for _, w in self.history))
        if keep >= members:
            return 0
        self.last_change = now
        return keep - members
