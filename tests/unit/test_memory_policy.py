"""The memory policy's decisions over made-up samples: limits, bursts, deflation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vmstream.policy import MIN_GUEST_BYTES, Control, MemoryPolicy, Sample, steer

MIB = 1 << 20
RAM = 512 * MIB


def sample(t: float, private_mib: int, balloon_mib: int = 512, free_mib: int | None = 200) -> Sample:
    return Sample(t=t, private_bytes=private_mib * MIB, ram_bytes=RAM, balloon_bytes=balloon_mib * MIB,
                  guest_free_bytes=None if free_mib is None else free_mib * MIB)


def test_no_limit_leaves_the_guest_all_its_ram() -> None:
    step = steer(MemoryPolicy(), sample(0, 400), Control())
    assert step.allowed_bytes is None and step.target_bytes == RAM


def test_the_balloon_leaves_the_guest_no_more_room_than_the_limit_allows() -> None:
    """Guest uses 312 MiB of 512 (200 free); the VM costs 100 MiB of a 128 MiB limit: the
    guest may take ~28 MiB more, so the balloon leaves it ~312 + 28 MiB."""
    step = steer(MemoryPolicy(limit_bytes=128 * MIB), sample(0, 100), Control())
    assert step.allowed_bytes == 128 * MIB
    assert 335 * MIB <= step.target_bytes <= 340 * MIB
    # over the limit: the balloon takes the excess back from what the guest uses
    over = steer(MemoryPolicy(limit_bytes=128 * MIB), sample(1, 160, balloon_mib=340, free_mib=10), Control())
    assert over.target_bytes <= (340 - 10 - 32) * MIB


def test_without_stats_only_the_excess_is_taken() -> None:
    policy = MemoryPolicy(limit_bytes=128 * MIB)
    assert steer(policy, sample(0, 100, free_mib=None), Control()).target_bytes == RAM
    assert steer(policy, sample(0, 160, free_mib=None), Control()).target_bytes < RAM - 32 * MIB


def test_never_below_the_floor_nor_above_the_ram() -> None:
    policy = MemoryPolicy(limit_bytes=32 * MIB)
    assert steer(policy, sample(0, 400, balloon_mib=100, free_mib=0), Control()).target_bytes == MIN_GUEST_BYTES
    assert steer(MemoryPolicy(limit_bytes=4096 * MIB), sample(0, 10), Control()).target_bytes == RAM


def test_deflation_is_gradual() -> None:
    step = steer(MemoryPolicy(limit_bytes=400 * MIB), sample(0, 50, balloon_mib=100, free_mib=90), Control())
    assert step.target_bytes == 164 * MIB


def test_a_burst_lasts_its_time_then_the_limit_holds_until_rested() -> None:
    policy = MemoryPolicy(limit_bytes=128 * MIB, burst_bytes=64 * MIB, burst_s=10)
    c = Control()
    assert steer(policy, sample(0, 100), c).allowed_bytes == 192 * MIB, "an unused burst is room"
    first = steer(policy, sample(1, 150), c)
    assert first.bursting and first.allowed_bytes == 192 * MIB
    assert steer(policy, sample(10.5, 150), c).bursting
    late = steer(policy, sample(11.5, 150), c)
    assert not late.bursting and late.allowed_bytes == 128 * MIB, "the burst's time is up"
    assert steer(policy, sample(12, 100), c).allowed_bytes == 128 * MIB, "no new burst before resting"
    assert steer(policy, sample(21, 100), c).allowed_bytes == 128 * MIB
    assert steer(policy, sample(22.5, 100), c).allowed_bytes == 192 * MIB, "rested a burst's length: armed again"
    again = steer(policy, sample(23, 150), c)
    assert again.bursting and again.allowed_bytes == 192 * MIB


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"limit_bytes": 1 * MIB}, "too small"),
    ({"burst_bytes": 64 * MIB, "burst_s": 5}, "needs a memory limit"),
    ({"limit_bytes": 128 * MIB, "burst_bytes": 64 * MIB}, "both its size and its length"),
])
def test_bad_policies_say_what_to_give(kwargs: dict[str, int], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        MemoryPolicy(**kwargs)


def test_admission_counts_limits_or_first_costs_and_names_the_shortfall() -> None:
    from vmstream.errors import Conflict, InvalidInput
    from vmstream.policy import CLONE_START_BYTES, check_room, parse_floor, start_cost

    assert start_cost(RAM, None, clone=False) == RAM
    assert start_cost(RAM, None, clone=True) == CLONE_START_BYTES
    assert start_cost(RAM, MemoryPolicy(limit_bytes=128 * MIB, burst_bytes=64 * MIB, burst_s=5), clone=False) == 192 * MIB
    assert start_cost(RAM, MemoryPolicy(limit_bytes=40 * MIB), clone=True) == 40 * MIB
    check_room(1000 * MIB, 100 * MIB, [450 * MIB, 450 * MIB], "two")
    with pytest.raises(Conflict, match=r"2 VM\(s\) counted for 901 MiB.*1 MiB short.*lower the floor"):
        check_room(1000 * MIB, 100 * MIB, [450 * MIB, 451 * MIB], "two")
    assert parse_floor("5%", 2000 * MIB) == 100 * MIB and parse_floor("512M", 0) == 512 * MIB and parse_floor("0", 1) == 0
    with pytest.raises(InvalidInput, match="share of the RAM"):
        parse_floor("150%", 1)


def test_bench_policy_figures_from_samples() -> None:
    """bench policy's figures over made-up samples: limits outside bursts, bursts cut short."""
    from vmstream.bench import policy as bp

    limit = 100 * MIB

    def s(t: float, private_mib: float, bursting: bool = False) -> dict[str, object]:
        return {"t": t, "private": {"a": int(private_mib * MIB)}, "bursting": {"a": bursting}, "allowed": {"a": None}}

    on = {"limits": {"a": limit}, "samples": [s(0, 90), s(1, 104), s(2, 130, True), s(3, 130, True), s(4, 110)]}
    assert bp._within(on) == round(2 / 3, 4), "104 is within 5%, 110 outside a burst is not; burst samples aside"
    # a burst of 8 s allowed that lasted 2 s and ended over the limit: 0.25; one that ended back under: 1
    assert bp._bursts(on) == 0.25
    on["samples"] = [s(0, 130, True), s(1, 90)]
    assert bp._bursts(on) == 1.0
