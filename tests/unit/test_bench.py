"""Unit tests of the benches' pure logic: quantiles, marginal-bytes fit, target checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmstream.bench import targets
from vmstream.bench.report import md_table
from vmstream.bench.stats import median, p90, quantile, ratio, slope, summary


def test_median_odd_and_even() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_p90_interpolates_between_the_slowest_runs() -> None:
    # numpy's default (linear) method: position (n - 1) * 0.9 = 3.6 between 4.0 and 5.0
    assert p90([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(4.6)
    assert p90([7.0]) == 7.0


def test_quantile_bounds() -> None:
    assert quantile([5.0, 1.0], 0.0) == 1.0
    assert quantile([5.0, 1.0], 1.0) == 5.0
    with pytest.raises(ValueError, match="no values"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match="outside"):
        quantile([1.0], 1.5)


def test_summary_rounds_and_keeps_runs() -> None:
    s = summary([0.123456, 0.2, 0.3], digits=3)
    assert s["median"] == 0.2
    assert s["min"] == 0.123
    assert s["runs"] == [0.123, 0.2, 0.3]


def test_slope_cancels_fixed_cost() -> None:
    # 100 MiB shared by all VMs plus 40 MiB each: the slope is the 40 MiB
    ns = [1, 2, 4, 8]
    totals = [100 + 40 * n for n in ns]
    assert slope(ns, totals) == pytest.approx(40.0)


def test_slope_least_squares_with_noise() -> None:
    assert slope([1, 2, 3], [10.0, 21.0, 30.0]) == pytest.approx(10.0)


@pytest.mark.parametrize(("xs", "ys", "msg"), [([1], [1.0], "two points"), ([2, 2], [1.0, 3.0], "different x"),
                                               ([1, 2], [1.0], "as many")])
def test_slope_rejects_degenerate_input(xs: list[int], ys: list[float], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        slope(xs, ys)


def test_ratio() -> None:
    assert ratio(9.0, 0.3) == 30.0
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None


def test_md_table_aligns_first_column_left() -> None:
    text = md_table(["a", "b"], [[1, 2]])
    assert text.splitlines() == ["| a | b |", "| --- | --: |", "| 1 | 2 |"]


def _results() -> dict:
    size = {"filled": {"speedup_vs_qemu_restore": 6.0, "fill_mib": 768}, "idle": {"speedup_vs_qemu_restore": 1.2}}
    return {
        "clone": {"speedup_vs_boot": 35.0, "speedup_vs_qemu_restore": 1.1, "memory_mib": 256},
        "scale": {"sizes": [{"mib": 1024, **size}, {"mib": 4096, **size}]},
        "burst": {"all_serving_s": {"1": 0.2, "10": 2.5, "32": 8.5}},
        "density": {"density_ratio": 4.4, "memory_mib": 256},
        "capture": {"pause_ms_booted_256m": 25.0, "pause_ms_clone": 8.0, "pause_ms_clone_mib": 256},
    }


def test_targets_met_and_missed() -> None:
    rows = {r["what"]: r for r in targets.check(_results(), total_s=600)}
    assert rows["`bench all` wall time"]["met"] is True
    assert rows["clone: speed-up vs cold boot"]["met"] is True
    assert rows["scale: speed-up vs QEMU restore at 1 GiB, 768 MiB filled"]["met"] is True
    assert rows["scale: speed-up vs QEMU restore at 4 GiB, 768 MiB filled"]["met"] is False
    assert rows["scale: speed-up vs QEMU restore at 1 GiB, freshly booted"]["met"] is False
    assert rows["burst: 10 clones all serving"]["met"] is True
    assert rows["burst: 32 clones all serving"]["met"] is False
    assert rows["density: ratio cold / clone (256 MiB)"]["met"] is False
    assert rows["capture: pause, booted 256 MiB VM"]["met"] is True


def test_targets_missing_benches_and_sizes() -> None:
    rows = targets.check({"scale": {"sizes": [{"mib": 256, "idle": {"speedup_vs_qemu_restore": 1.0}}]}}, total_s=None)
    assert all(r["value"] is None and r["met"] is None for r in rows)
    assert "**missed**" not in targets.markdown(rows)


def test_a_guest_lost_after_a_move_misses_the_migration_target() -> None:
    from vmstream.bench import migrate

    ok = {"downtime_ms": 5.0, "client_gap_ms": 90.0, "total_s": 1.0, "bytes_sent": 1 << 20, "private_bytes": 1 << 20,
          "failed_requests": 0, "reset_connections": 0, "memcheck_bad_pages": 0, "guest_error": None, "serial_tail": None}
    lost = {**ok, "memcheck_bad_pages": None, "guest_error": "did not answer", "serial_tail": "Kernel panic - not syncing"}
    rows = {r["what"]: r for r in targets.check({"migrate": {"max_client_gap_ms": 90.0, "guests_lost": 1}}, total_s=None)}
    row = rows["migrate: failed requests + reset connections + guests lost"]
    assert row["met"] is False
    md, _ = migrate.render({"modes": {"live": {"idle": ok, "write20": lost}}, "memory_mib": 256, "accelerator": "tcg"})
    assert "guest lost" in md and "Kernel panic - not syncing" in md


def test_a_failed_bench_is_named_in_the_doc(tmp_path: Path) -> None:
    from vmstream.bench import suite

    summary = {"command": "vmstream bench all", "source": "abc", "started_at": "now", "total_s": 60.0,
               "durations_s": {"clone": 1.0}, "targets": [], "results": {}, "errors": {"clone": "QemuError: it broke"},
               "host": {"cpus": 2, "mem_total_bytes": 1 << 30, "kernel": "k", "qemu": "7.2", "accelerator": "tcg",
                        "accelerator_reason": "r"}}
    doc = tmp_path / "docs" / "benchmarks.md"
    suite.write_doc(doc, tmp_path / "out", summary)
    assert "**This bench failed in this run:** QemuError: it broke" in doc.read_text()


def test_a_separate_bench_in_the_out_dir_goes_into_the_doc(tmp_path: Path) -> None:
    from vmstream.bench import suite

    summary = {"command": "vmstream bench all", "source": "abc", "started_at": "now", "total_s": 60.0,
               "durations_s": {}, "targets": [], "results": {}, "errors": {},
               "host": {"cpus": 2, "mem_total_bytes": 1 << 30, "kernel": "k", "qemu": "7.2", "accelerator": "tcg",
                        "accelerator_reason": "r"}}
    doc, out = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "bench"
    suite.write_doc(doc, out, summary)
    assert "Debian" not in doc.read_text()
    out.mkdir(parents=True)
    (out / "clone-debian.md").write_text("| start | median |\n| --- | --: |\n| clone | 0.080 s |\n")
    suite.write_doc(doc, out, summary)
    text = doc.read_text()
    assert "`vmstream bench clone --guest debian --out docs/bench`: a separate run" in text and "| clone | 0.080 s |" in text
    assert "(bench/clone-debian.png)" in text
