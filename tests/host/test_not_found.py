"""Unknown VMs, images, peers and migrations: a 404 that says where to look."""

from __future__ import annotations

import pytest

from tests.host.conftest import Agent


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/vms/ghost", None),
    ("DELETE", "/v1/vms/ghost", None),
    ("POST", "/v1/vms/ghost/guest", {"command": "ping"}),
    ("POST", "/v1/vms/ghost/qga", {"execute": "guest-info"}),
    ("POST", "/v1/vms/ghost/migrate", {"to": "b"}),
    ("GET", "/v1/vms/ghost/migration", None),
    ("POST", "/v1/live-images", {"vm": "ghost", "name": "img"}),
    ("POST", "/v1/live-images/ghost/start", {}),
    ("DELETE", "/v1/live-images/ghost", None),
    ("GET", "/v1/live-images/ghost/servers", None),
    ("DELETE", "/v1/peers/ghost", None),
    ("GET", "/v1/migrations/incoming/ghost", None),
])
def test_unknown_things_are_not_found(agent: Agent, method: str, path: str, body: dict[str, object] | None) -> None:
    err = agent.error(method, path, 404, json=body) if body is not None else agent.error(method, path, 404)
    assert "ghost" in err["message"], err


def test_migrating_to_an_unknown_peer_names_the_fix(agent: Agent) -> None:
    agent.boot("vm")
    err = agent.error("POST", "/v1/vms/vm/migrate", 404, json={"to": "nowhere"})
    assert "vmstream peer add nowhere" in err["message"]
    assert agent.call("GET", "/v1/vms/vm")["state"] == "running"


def test_a_pooled_qemu_is_not_a_vm(pooled_agent: Agent) -> None:
    a = pooled_agent
    a.boot("src")
    a.image("src", "img")
    a.start("img")
    a.wait_pool("img")
    pooled = [r.name for r in a.manager.registry.all(pooled=True) if r.state == "pooled"]
    assert pooled
    for name in pooled:
        a.error("GET", f"/v1/vms/{name}", 404)
    assert not set(pooled) & a.names()
