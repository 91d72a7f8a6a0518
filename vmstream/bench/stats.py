"""Pure statistics for the benches: no I/O, so unit tests can pin them down."""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1].

    With 5 runs p90 lies between the two slowest, so one outlier shows but
    does not dominate the way max() would.
    """
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def p90(values: Sequence[float]) -> float:
    return quantile(values, 0.9)


def summary(values: Sequence[float], digits: int = 4) -> dict[str, float | list[float]]:
    """median, p90, min, max and the runs themselves, rounded for JSON."""
    return {
        "median": round(median(values), digits),
        "p90": round(p90(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs.

    Marginal bytes per VM are the slope of total memory against N: what every
    VM shares (QEMU's binary, the image's page cache) is a constant and cancels.
    """
    if len(xs) != len(ys):
        raise ValueError("slope needs as many x as y values")
    if len(xs) < 2:
        raise ValueError("slope needs at least two points")
    mx = sum(xs) / len(xs)
    my = sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope needs at least two different x values")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def ratio(num: float | None, den: float | None, digits: int = 1) -> float | None:
    """num / den rounded, or None when either is missing or den is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, digits)
