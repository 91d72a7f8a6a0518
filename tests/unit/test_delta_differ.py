"""_differ: which pages changed between the two rounds of a delta migration."""

from __future__ import annotations

import numpy as np

from vmstream.migrate.delta import _differ


def test_differ_matches_a_plain_comparison_for_any_row_pairing() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    a = rng.integers(0, 2**63, size=(n, 512), dtype=np.uint64)
    b = a.copy()
    b[rng.choice(n, 37, replace=False), 5] += 1
    same = np.arange(n)
    assert (_differ(a, b, same, same) == (a != b).any(axis=1)).all()
    rows1 = np.sort(rng.choice(n, 700, replace=False))
    rows2 = np.sort(rng.choice(n, 700, replace=False))
    assert (_differ(a, b, rows1, rows2) == (a[rows1] != b[rows2]).any(axis=1)).all()
    assert _differ(a, b, same[:0], same[:0]).shape == (0,)
