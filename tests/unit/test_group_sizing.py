"""How many members a scaling group wants for the loads its scaler saw (pure logic)."""

from __future__ import annotations

import pytest

from vmstream.lb.scaling import Sizer, wanted


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


def _look(sizer: Sizer, now: float, load: float, members: int, starting: int = 0) -> int:
    return sizer.look(now, load, members, starting, target=2, min_size=1, max_size=10, scale_in_delay_s=5)


def test_a_step_starts_the_gap_at_once_and_scale_in_waits_for_the_delay() -> None:
    sizer = Sizer()
    assert _look(sizer, 0.0, 1, 1) == 0
    assert _look(sizer, 0.2, 1, 1) == 0
    assert _look(sizer, 0.4, 60, 1) == 9  # mean 20.7 / 2 -> 11, at most 10: nine more
    assert _look(sizer, 0.6, 60, 10, starting=9) == 0
    # the load falls: nothing leaves while members start, nor within 5 s of the last change
    assert _look(sizer, 1.0, 2, 10, starting=9) == 0
    for t in (2.0, 3.0, 4.0, 5.0):
        assert _look(sizer, t, 2, 10) == 0
    # the looks averaged with the step's (up to 2.0 s) still wanted 10 within the last 5 s...
    assert _look(sizer, 6.9, 2, 10) == 0
    # ... and once they have aged out, the group goes to what the last 5 s wanted
    assert _look(sizer, 7.1, 2, 10) == -9
    assert _look(sizer, 7.3, 2, 1) == 0  # at the minimum
