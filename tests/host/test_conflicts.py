"""Conflicts and state guards: a 409 that changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.host.conftest import Agent, FakeProcess, make_agent
from vmstream.host import footprint
from vmstream.host.state import Op, VmState


def test_a_name_is_taken_once(agent: Agent) -> None:
    agent.boot("vm")
    err = agent.error("POST", "/v1/vms", 409, json={"name": "vm", "memory": "64M"})
    assert "already exists" in err["message"]
    assert agent.names() == {"vm"}


def test_an_image_name_is_taken_once(agent: Agent) -> None:
    agent.boot("vm")
    agent.image("vm", "img")
    err = agent.error("POST", "/v1/live-images", 409, json={"vm": "vm", "name": "img"})
    assert "already exists" in err["message"]
    assert agent.call("GET", "/v1/vms/vm")["state"] == "running"  # the capture state was undone


def test_an_image_with_clones_cannot_be_deleted(agent: Agent) -> None:
    agent.boot("src")
    agent.image("src", "img")
    agent.start("img", count=2)
    err = agent.error("DELETE", "/v1/live-images/img", 409)
    assert "img-1" in err["message"] and "destroy them first" in err["message"]
    assert [i["name"] for i in agent.call("GET", "/v1/live-images")] == ["img"]
    for vm in ("img-1", "img-2"):
        agent.call("DELETE", f"/v1/vms/{vm}")
    agent.call("DELETE", "/v1/live-images/img")
    assert agent.call("GET", "/v1/live-images") == []


def _migrating(agent: Agent, name: str) -> None:
    """As if a migration of name were running (its job holds the state)."""
    agent.manager.registry.begin(name, Op.MIGRATE, VmState.MIGRATING)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("DELETE", "/v1/vms/vm", None),
    ("POST", "/v1/live-images", {"vm": "vm", "name": "img"}),
    ("POST", "/v1/vms/vm/migrate", {"to": "b"}),
])
def test_a_migrating_vm_refuses_other_operations(agent: Agent, method: str, path: str, body: dict[str, object] | None) -> None:
    agent.boot("vm")
    _migrating(agent, "vm")
    err = agent.error(method, path, 409, json=body) if body is not None else agent.error(method, path, 409)
    assert "is migrating" in err["message"] and "--cancel" in err["message"], err
    assert agent.call("GET", "/v1/vms/vm")["state"] == "migrating"
    assert agent.call("GET", "/v1/live-images") == []


def test_a_migrating_vm_still_answers_its_guest(agent: Agent) -> None:
    agent.boot("vm")
    _migrating(agent, "vm")
    assert agent.call("POST", "/v1/vms/vm/guest", json={"command": "ping"})["ok"] is True


def test_an_exited_vm_cannot_be_captured_but_can_be_destroyed(agent: Agent) -> None:
    agent.boot("vm")
    rec = agent.manager.registry.get("vm")
    agent.starter.proc(rec).die()  # type: ignore[attr-defined]
    assert agent.call("GET", "/v1/vms/vm")["state"] == "exited"
    err = agent.error("POST", "/v1/live-images", 409, json={"vm": "vm", "name": "img"})
    assert "exited" in err["message"] and "vmstream destroy vm" in err["message"]
    agent.error("POST", "/v1/vms/vm/guest", 409, json={"command": "ping"})
    agent.call("DELETE", "/v1/vms/vm")
    assert agent.names() == set()


def test_cancel_needs_a_migration_in_progress(agent: Agent) -> None:
    agent.boot("vm")
    agent.error("DELETE", "/v1/vms/vm/migration", 409)


def test_a_vm_being_destroyed_cannot_be_destroyed_again(agent: Agent) -> None:
    agent.boot("vm")
    agent.manager.registry.begin("vm", Op.DESTROY, VmState.STOPPING)
    err = agent.error("DELETE", "/v1/vms/vm", 409)
    assert "stopping" in err["message"]


def test_a_start_that_would_take_the_host_below_its_memory_floor_is_refused(tmp_path: Path) -> None:
    """Admission: the boot or clone start is refused before anything starts, the
    shortfall named; with a memory limit the same clones are counted for less."""
    manager, http = make_agent(tmp_path / "home", host_memory_floor="0")
    with http:
        agent = Agent(http, manager)
        agent.boot("src")
        agent.image("src", "img")
    manager, http = make_agent(tmp_path / "home", host_memory_floor="99%")
    with http:
        agent = Agent(http, manager)
        err = agent.error("POST", "/v1/vms", 409, json={"name": "big", "memory": "1G"})
        assert "not enough memory on this host to start VM big" in err["message"] and "MiB short" in err["message"]
        assert footprint.meminfo()["MemAvailable"] < 0.99 * footprint.meminfo()["MemTotal"]
        err = agent.error("POST", "/v1/live-images/img/start", 409, json={"count": 2})
        assert "2 clone(s) of img" in err["message"] and "VMSTREAM_HOST_MEMORY_FLOOR" in err["message"]
        assert agent.names() == {"src"}, "nothing was started"
    FakeProcess.running.clear()
