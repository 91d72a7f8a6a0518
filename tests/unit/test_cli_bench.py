"""`vmstream bench ...` options and output, without QEMU: the bench itself is replaced."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vmstream.cli.main import app

BENCHES = ["clone", "capture", "burst", "scale", "density", "stream", "migrate", "all"]


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_takes_json(name: str) -> None:
    r = CliRunner().invoke(app, ["bench", name, "--help"])
    assert r.exit_code == 0 and "--json" in r.output, r.output


@pytest.mark.parametrize("args", [["clone", "--runs", "0"], ["burst", "--counts", "abc"], ["scale", "--sizes", "0"],
                                  ["density", "--counts", ","], ["all", "--sizes", "x"], ["clone", "--json", "--no-such-option"]])
def test_a_bad_option_value_exits_2_before_any_agent_starts(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSTREAM_HOME", str(tmp_path))
    r = CliRunner().invoke(app, ["bench", *args])
    assert r.exit_code == 2, r.output
    assert not (tmp_path / "agent.json").exists() and not (tmp_path / "agent.log").exists()


@pytest.fixture
def fake_clone_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`bench clone` with its run replaced: writes the files a bench writes and returns a result; no agent is called."""
    from vmstream.bench import common, report

    monkeypatch.setenv("VMSTREAM_HOME", str(tmp_path / "home"))

    @contextlib.contextmanager
    def session(self: Any) -> Iterator[Any]:
        yield self

    def run_and_write(module: Any, bench: Any, out: Path, **kw: Any) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        (out / "clone.md").write_text("| start | median |\n| --- | --: |\n| clone | 0.050 s |\n")
        return {"bench": "clone", "clone_s": 0.05, "kw": kw, "files": {"markdown": str(out / "clone.md")}}

    monkeypatch.setattr(common.Bench, "session", session)
    monkeypatch.setattr(report, "run_and_write", run_and_write)
    yield tmp_path / "out"


def test_bench_json_prints_exactly_one_json_document(fake_clone_bench: Path) -> None:
    r = CliRunner().invoke(app, ["bench", "clone", "--out", str(fake_clone_bench), "--runs", "2", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["bench"] == "clone" and res["kw"] == {"mib": None, "runs": 2, "clone_runs": 10, "guest": "demo", "burst_runs": 3,
                                                     "spacing": 0.25, "output_name": "clone"}


def test_bench_clone_debian_writes_its_own_files(fake_clone_bench: Path) -> None:
    r = CliRunner().invoke(app, ["bench", "clone", "--guest", "debian", "--out", str(fake_clone_bench), "--json"])
    assert r.exit_code == 0, r.output
    kw = json.loads(r.stdout)["kw"]
    assert kw["guest"] == "debian" and kw["output_name"] == "clone-debian"


def test_bench_clone_refuses_an_unknown_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSTREAM_HOME", str(tmp_path))
    r = CliRunner().invoke(app, ["bench", "clone", "--guest", "windows"])
    assert r.exit_code == 2, r.output


def test_bench_without_json_prints_its_table(fake_clone_bench: Path) -> None:
    r = CliRunner().invoke(app, ["bench", "clone", "--out", str(fake_clone_bench)])
    assert r.exit_code == 0, r.output
    assert "0.050 s" in r.stdout and "wrote " in r.stdout and not r.stdout.lstrip().startswith("{")
