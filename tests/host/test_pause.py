"""Pause and unpause: the row's state follows QEMU's, and a paused VM refuses what needs it running."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.host.conftest import Agent, FakeStarter, make_agent


def test_pause_and_unpause(agent: Agent) -> None:
    agent.boot("vm")
    paused = agent.call("POST", "/v1/vms/vm/pause")
    assert paused["state"] == "paused"
    assert agent.starter.paused == {agent.manager.registry.get("vm").vm_id}  # QEMU took 'stop'
    assert agent.call("GET", "/v1/vms/vm")["state"] == "paused"
    running = agent.call("POST", "/v1/vms/vm/unpause")
    assert running["state"] == "running" and agent.starter.paused == set()


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/live-images", {"vm": "vm", "name": "img"}),
    ("POST", "/v1/vms/vm/migrate", {"to": "b"}),
    ("POST", "/v1/vms/vm/guest", {"command": "status"}),
    ("POST", "/v1/vms/vm/pause", None),
])
def test_a_paused_vm_refuses_what_needs_it_running(agent: Agent, method: str, path: str, body: dict[str, object] | None) -> None:
    agent.boot("vm")
    agent.call("POST", "/v1/vms/vm/pause")
    err = agent.error(method, path, 409, json=body) if body is not None else agent.error(method, path, 409)
    assert "is paused" in err["message"] and "vmstream unpause vm" in err["message"], err
    assert agent.call("GET", "/v1/vms/vm")["state"] == "paused"
    assert agent.call("GET", "/v1/live-images") == []


def test_unpause_of_a_running_vm_is_a_conflict(agent: Agent) -> None:
    agent.boot("vm")
    err = agent.error("POST", "/v1/vms/vm/unpause", 409)
    assert "is running" in err["message"] and "runs already" in err["message"]


def test_a_paused_vm_can_be_destroyed(agent: Agent) -> None:
    agent.boot("vm")
    agent.call("POST", "/v1/vms/vm/pause")
    agent.call("DELETE", "/v1/vms/vm")
    assert agent.names() == set()


def test_a_pause_qemu_refuses_leaves_the_vm_running(agent: Agent) -> None:
    agent.boot("vm")
    agent.starter.fail["qmp"] = lambda name: name == "vm"
    err = agent.error("POST", "/v1/vms/vm/pause", 500)
    assert "fake qmp failure" in err["message"]
    assert agent.call("GET", "/v1/vms/vm")["state"] == "running"
    del agent.starter.fail["qmp"]
    agent.call("POST", "/v1/vms/vm/pause")
    agent.starter.fail["qmp"] = lambda name: name == "vm"
    agent.error("POST", "/v1/vms/vm/unpause", 500)
    assert agent.call("GET", "/v1/vms/vm")["state"] == "paused"


def test_pause_of_an_unknown_vm_is_not_found(agent: Agent) -> None:
    assert "no-such" in agent.error("POST", "/v1/vms/no-such/pause", 404)["message"]


def test_a_restarted_agent_takes_the_run_state_from_qemu(tmp_path: Path) -> None:
    """An agent that died between the row and QEMU: the next one believes QEMU."""
    home = tmp_path / "home"
    manager, http = make_agent(home)
    with http:
        a = Agent(http, manager)
        a.boot("p")
        a.boot("r")
        FakeStarter.paused.add(manager.registry.get("p").vm_id)  # QEMU took 'stop', the row did not change
        a.call("POST", "/v1/vms/r/pause")
        FakeStarter.paused.discard(manager.registry.get("r").vm_id)  # QEMU took 'cont', the row did not change
    manager2, http2 = make_agent(home)
    with http2:
        b = Agent(http2, manager2)
        assert b.call("GET", "/v1/vms/p")["state"] == "paused"
        assert b.call("GET", "/v1/vms/r")["state"] == "running"
