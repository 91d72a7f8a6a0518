"""Scaling groups on the real agent: clones of the session's image behind a real HAProxy
(Debian's), sized by the load the test puts through it; bad input refused with nothing left;
the group, its balancer and its members kept across an agent restart; delete removes all."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.hosts import Cli, Load, free_port
from tests.integration.conftest import BaseImage
from tests.procs import pids_mentioning


def _haproxies(cli: Cli) -> list[int]:
    return pids_mentioning(cli.home, b"haproxy")


def _wait(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.fixture
def group(cli: Cli, base_image: BaseImage) -> Iterator[tuple[str, int]]:
    """A group of base-img clones, 1..3 members, 1 request in flight per member; deleted after."""
    name, port = "grp", free_port()
    cli.json("group", "create", name, "--image", base_image.name, "--port", str(port), "--min", "1", "--max", "3",
             "--target-inflight", "1", "--member-maxconn", "2", "--scale-in-delay", "2")
    try:
        yield name, port
    finally:
        cli.run("group", "delete", name)


def test_group_scales_out_under_load_and_back_in_without_failed_requests(cli: Cli, group: tuple[str, int]) -> None:
    name, port = group
    g = cli.json("group", "show", name)
    assert g["serving"] == 1 and g["balancer_pid"] in _haproxies(cli), g
    assert [m["name"] for m in g["members"]] == [f"{name}-1"]
    with Load(port, threads=6) as load:
        # 6 requests at once want 3 members (the most); each joins once it answers
        _wait("three members answering through the balancer", lambda: len(load.hosts()) >= 3)
        g = cli.json("group", "show", name)
        assert g["serving"] == 3 and g["wanted"] == 3, g
        assert {m["name"] for m in g["members"]} == load.hosts(), (g, load.hosts())
        assert any(e["action"] == "scale-out" for e in g["events"]), g["events"]
    # the load is gone: after the scale-in delay the group is back at 1, its leavers drained
    g = _wait("the group back at one member", lambda: (g := cli.json("group", "show", name))["members"][1:] == [] and g)
    assert g["serving"] == 1 and any(e["action"] == "scale-in" for e in g["events"]), g
    gone = {f"{name}-2", f"{name}-3"} - {v["name"] for v in cli.json("list")}
    assert gone == {f"{name}-2", f"{name}-3"}, "the members that left were not destroyed"
    assert load.failures() == [], load.failures()[:5]
    with httpx.Client(timeout=10) as http:  # still served by the one left
        assert http.get(f"http://127.0.0.1:{port}/work?ms=1").json()["hostname"] == g["members"][0]["name"]


def test_group_outlives_an_agent_restart_and_serves_meanwhile(cli: Cli, group: tuple[str, int]) -> None:
    name, port = group
    cli.json("group", "set", name, "--min", "2")
    g = _wait("two members serving", lambda: (g := cli.json("group", "show", name))["serving"] == 2 and g)
    members, balancer = {m["name"] for m in g["members"]}, g["balancer_pid"]
    with Load(port, threads=2) as load:
        assert cli.run("agent", "stop").returncode == 0
        time.sleep(1.0)  # no agent: HAProxy and the members keep serving
        during = len(load.answers)
        time.sleep(1.0)
        assert len(load.answers) > during, "nothing was served while the agent was down"
        g = cli.json("group", "show", name)  # a new agent, which finds the group again
    assert g["balancer_pid"] == balancer and {m["name"] for m in g["members"]} == members, g
    assert g["min_size"] == 2 and g["serving"] == 2, g
    assert load.failures() == [], load.failures()[:5]
    _wait("the scaler of the new agent reading HAProxy", lambda: cli.json("group", "show", name)["members"][0]["balancer_status"])


def test_group_delete_removes_its_haproxy_and_members(cli: Cli, base_image: BaseImage) -> None:
    port = free_port()
    g = cli.json("group", "create", "gone", "--image", base_image.name, "--port", str(port), "--min", "2", "--max", "2")
    assert g["serving"] == 2 and g["balancer_pid"] in _haproxies(cli)
    assert cli.json("group", "delete", "gone") == {"deleted": "gone"}
    assert g["balancer_pid"] not in _haproxies(cli)
    names = {v["name"] for v in cli.json("list")}
    assert not names & {m["name"] for m in g["members"]}, names
    assert "gone" not in {x["name"] for x in cli.json("group", "list")}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--min", "3", "--max", "2"], 2, "more than --max"),
    (["--image", "no-such-image"], 3, "no live image named 'no-such-image'"),
    (["--start", "boot", "--max", "256"], 4, "not enough memory"),  # 256 cold-booted 256 MiB VMs
    (["--port", "PORT_IN_USE"], 4, "in use"),
    (["--member-port", "8080"], 2, "does not publish guest port 8080"),
])
def test_group_bad_input_is_refused_and_leaves_nothing(cli: Cli, base_image: BaseImage, args: list[str], code: int,
                                                       words: str) -> None:
    before_vms, before_haproxy = {v["name"] for v in cli.json("list")}, _haproxies(cli)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        given = dict(zip(args[::2], args[1::2], strict=True))
        port = str(busy.getsockname()[1]) if given.get("--port") == "PORT_IN_USE" else str(free_port())
        given = {"--image": base_image.name, "--port": port, **{k: v for k, v in given.items() if k != "--port"}}
        proc = cli.run("group", "create", "bad", *[x for kv in given.items() for x in kv])
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert words in proc.stderr, proc.stderr
    assert "bad" not in {g["name"] for g in cli.json("group", "list")}
    assert {v["name"] for v in cli.json("list")} == before_vms
    assert _haproxies(cli) == before_haproxy


def test_group_members_spread_over_a_peer_host(cli: Cli, base_image: BaseImage, peer_host: Cli) -> None:
    """--hosts local,hostb: members alternate between this host and a peer (which reads the image
    from this host's store); both serve through this host's HAProxy; delete removes the peer's too."""
    peer_host.json("list")  # its agent runs
    assert cli.run("peer", "add", "hostb", "--home", str(peer_host.home)).returncode == 0
    port = free_port()
    try:
        g = cli.json("group", "create", "spread", "--image", base_image.name, "--port", str(port), "--min", "3", "--max", "3",
                     "--hosts", "local,hostb")
        assert sorted(m["host"] for m in g["members"]) == ["hostb", "local", "local"], g["members"]
        on_b = {m["name"] for m in g["members"] if m["host"] == "hostb"}
        assert on_b <= {v["name"] for v in peer_host.json("list")}
        with Load(port, threads=3) as load:
            _wait("all three members answering", lambda: len(load.hosts()) >= 3)
        assert load.hosts() == {m["name"] for m in g["members"]} and load.failures() == []
        # the peer's member destroyed behind the group's back: it leaves, and the group starts
        # another where it has the fewest (the peer again: the name is free, so it is reused)
        (lost,) = on_b
        assert peer_host.run("destroy", lost).returncode == 0
        def replaced() -> dict[str, Any] | None:
            g = cli.json("group", "show", "spread")
            return g if any(e["action"] == "lost" for e in g["events"]) and g["serving"] == 3 else None

        g = _wait("the lost member replaced", replaced)
        assert sorted(m["host"] for m in g["members"]) == ["hostb", "local", "local"], g["members"]
        assert {m["name"] for m in g["members"] if m["host"] == "hostb"} <= {v["name"] for v in peer_host.json("list")}
    finally:
        cli.run("group", "delete", "spread")
        cli.run("peer", "remove", "hostb")
    assert not {v["name"] for v in peer_host.json("list")} & {"spread-1", "spread-2", "spread-3", "spread-4"}


def test_group_hosts_must_be_local_or_peers(cli: Cli, base_image: BaseImage) -> None:
    proc = cli.run("group", "create", "nowhere", "--image", base_image.name, "--port", str(free_port()), "--hosts",
                   "local,no-such-peer")
    assert proc.returncode == 3 and "no-such-peer" in proc.stderr and "peer add" in proc.stderr, proc.stderr
    assert "nowhere" not in {g["name"] for g in cli.json("group", "list")}
