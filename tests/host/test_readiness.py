"""Readiness checks and published ports, in process (fake QEMU)."""

from __future__ import annotations

import socket

import pytest

from tests.host.conftest import Agent
from vmstream.errors import InvalidInput
from vmstream.guest.readiness import Readiness, parse_publish, parse_readiness


@pytest.mark.parametrize(("text", "want"), [
    ("status", Readiness("status")), ("agent", Readiness("agent")), ("none", Readiness("none")),
    ("tcp:22", Readiness("tcp", 22)), ("http:8080/health", Readiness("http", 8080, "/health")),
    ("http:80", Readiness("http", 80, "/")),
])
def test_readiness_specs_round_trip(text: str, want: Readiness) -> None:
    assert parse_readiness(text) == want
    assert parse_readiness(str(want)) == want


@pytest.mark.parametrize("text", ["", "ping", "tcp:", "tcp:0", "tcp:70000", "http:x/y", "http:80 /a", "tcp:22/x"])
def test_bad_readiness_names_the_forms(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"status, agent, none, tcp:PORT|not a TCP port"):
        parse_readiness(text)


def test_publish_specs() -> None:
    assert parse_publish(["80", "8080:80", "22", "9000:9000"]) == {80: 8080, 22: 0, 9000: 9000}  # '80' alone: the endpoint has it
    for bad in (["x"], ["1:2:3"], ["0"], ["70000"], ["22", "1022:22"]):
        with pytest.raises(InvalidInput):
            parse_publish(bad)


def test_boot_defaults_to_the_status_page_and_keeps_the_check(agent: Agent) -> None:
    vm = agent.boot("web")
    assert vm["ready"] == "status" and vm["ports"] == {}
    assert agent.boot("ag", ready="agent")["ready"] == "agent"


@pytest.mark.parametrize("body", [{"ready": "ping"}, {"publish": ["http"]}, {"timeout": 0}])
def test_bad_readiness_or_ports_are_refused(agent: Agent, body: dict[str, object]) -> None:
    agent.error("POST", "/v1/vms", 400, json={"name": "vm", "memory": "64M", **body})
    assert agent.names() == set()


def test_published_ports_and_readiness_go_to_clones_with_their_own_host_ports(agent: Agent) -> None:
    vm = agent.boot("app", ready="http:8080/health", publish=["2222"])
    assert vm["ready"] == "http:8080/health"
    assert set(vm["ports"]) == {"2222", "8080"}, "the readiness port is published for the probe"
    spec = agent.starter.proc(agent.manager.registry.get("app")).spec  # type: ignore[attr-defined]
    assert {g for _, g in spec.forwards} == {2222, 8080}
    agent.image("app", "app-img")
    clones = agent.start("app-img", count=3)
    assert all(c["ready"] == "http:8080/health" and set(c["ports"]) == {"2222", "8080"} for c in clones)
    host_ports = [p for v in [vm, *clones] for p in v["ports"].values()]
    assert len(set(host_ports)) == len(host_ports) == 8, "every VM has its own host ports"


def test_a_host_port_is_published_once(agent: Agent) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent.boot("a", publish=[f"{port}:22"])
    err = agent.error("POST", "/v1/vms", 409, json={"name": "b", "memory": "64M", "publish": [f"{port}:22"]})
    assert "already published" in err["message"]


def test_a_host_port_another_program_holds_is_a_conflict(agent: Agent) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        err = agent.error("POST", "/v1/vms", 409, json={"name": "b", "memory": "64M", "publish": [f"{s.getsockname()[1]}:22"]})
    assert "another program holds it" in err["message"]
    assert agent.names() == set()


def test_a_boot_that_is_never_ready_keeps_its_logs(agent: Agent) -> None:
    agent.starter.fail["http"] = lambda name: True
    agent.error("POST", "/v1/vms", 500, json={"name": "late", "memory": "64M"})
    (kept,) = (agent.manager.settings.home / "logs").iterdir()
    assert kept.name.startswith("late-") and (kept / "serial.log").read_text().startswith("fake console")
    assert agent.names() == set()
