"""How many members a scaling group wants for the loads its scaler saw (pure logic)."""

from __future__ import annotations

import pytest

from vmstream.host.groups import wanted


@pytest.mark.parametrize(("loads", "target", "lo", "hi", "want"), [
    ([], 4, 1, 10, 1),  # nothing seen yet: the minimum
    ([0, 0, 0], 4, 1, 10, 1),
    ([4, 4, 4], 4, 1, 10, 1),  # exactly the target per member: no more
    ([5, 4, 4], 4, 1, 10, 2),  # a little above on average: one more
    ([0, 0, 30], 2, 1, 10, 5),  # a step, averaged over the last looks
    ([300, 300, 300], 2, 1, 10, 10),  # a backlog: at most the maximum
    ([0, 0, 0], 2, 3, 10, 3),
    ([2.5], 0.5, 0, 10, 5),
])
def test_wanted_is_the_mean_load_over_the_target_within_the_bounds(loads: list[float], target: float, lo: int, hi: int,
                                                                   want: int) -> None:
    assert wanted(loads, target, lo, hi) == want
