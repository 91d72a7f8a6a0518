"""Bad input to the agent's API: a 400 that names the problem, and nothing changed."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.host.conftest import TOKEN, Agent


@pytest.mark.parametrize(("body", "says"), [
    ({"name": "vm", "memory": "lots"}, "is not a memory size"),
    ({"name": "vm", "memory": "16M"}, "out of range"),
    ({"name": "vm", "memory": "1000000M"}, "out of range"),
    ({"name": "Bad_Name"}, "not a valid VM name"),
    ({"name": "-starts-with-dash"}, "not a valid VM name"),
    ({"name": "vm", "cpus": 0}, "cpus"),
    ({"name": "vm", "cpus": 17}, "cpus"),
    ({"memory": "64M"}, "name"),
    ({"name": "vm", "guest_agent": "other"}, "guest_agent"),
    ({"name": "vm", "disk": "/nonexistent/disk.qcow2"}, "not found"),
])
def test_bad_boot_is_refused(agent: Agent, body: dict[str, object], says: str) -> None:
    err = agent.error("POST", "/v1/vms", 400, json=body)
    assert err["error"] == "InvalidInput" and says in err["message"], err
    assert agent.names() == set()


@pytest.mark.parametrize(("body", "says"), [
    ({"count": 0}, "count"),
    ({"count": 300}, "count"),
    ({"user_data_b64": "not base64!"}, "not valid base64"),
    ({"name": "Bad Prefix"}, "not a valid clone name prefix"),
    ({"params": {"1abc": "x"}}, "guest parameter name '1abc'"),
    ({"params": {"LD_PRELOAD": "x"}}, "not allowed"),
])
def test_bad_clone_start_is_refused(agent: Agent, body: dict[str, object], says: str) -> None:
    agent.boot("src")
    agent.image("src", "img")
    err = agent.error("POST", "/v1/live-images/img/start", 400, json=body)
    assert err["error"] == "InvalidInput" and says in err["message"], err
    assert agent.names() == {"src"}


def test_bad_image_name_is_refused(agent: Agent) -> None:
    agent.boot("src")
    err = agent.error("POST", "/v1/live-images", 400, json={"vm": "src", "name": "No_Good"})
    assert "not a valid live image name" in err["message"]
    assert agent.call("GET", "/v1/live-images") == []


@pytest.mark.parametrize(("path", "body", "says"), [
    ("/v1/vms/vm/guest", {"command": "ping", "timeout": 0}, "timeout"),
    ("/v1/vms/vm/qga", {"execute": "guest-info", "timeout": 601}, "timeout"),
    ("/v1/vms/vm/migrate", {"to": "b", "mode": "teleport"}, "mode"),
    ("/v1/vms/vm/migrate", {"to": "b", "max_bandwidth_mbps": -1}, "max_bandwidth_mbps"),
])
def test_bad_vm_requests_are_refused(agent: Agent, path: str, body: dict[str, object], says: str) -> None:
    agent.boot("vm")
    err = agent.error("POST", path, 400, json=body)
    assert says in err["message"], err


def test_qga_needs_a_disk_guest(agent: Agent) -> None:
    agent.boot("vm")
    err = agent.error("POST", "/v1/vms/vm/qga", 400, json={"execute": "guest-info"})
    assert "not a disk guest" in err["message"]


def test_gc_grace_must_not_be_negative(agent: Agent) -> None:
    assert "grace" in agent.error("POST", "/v1/host/store/gc", 400, params={"grace": -1})["message"]


@pytest.mark.parametrize(("name", "url", "says"), [
    ("b", "ftp://127.0.0.1:1", "must start with http"),
    ("Bad_Peer", "http://127.0.0.1:1", "not a valid peer name"),
])
def test_bad_peer_is_refused(agent: Agent, name: str, url: str, says: str) -> None:
    err = agent.error("PUT", f"/v1/peers/{name}", 400, json={"url": url, "token": "t"})
    assert says in err["message"], err
    assert agent.call("GET", "/v1/peers") == []


@pytest.mark.parametrize("header", [None, "Bearer wrong", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
def test_every_route_but_health_needs_the_token(agent: Agent, header: str | None) -> None:
    """Every operation in the agent's OpenAPI schema (the peer store's included), with no
    token, a wrong one or a malformed header: 401 in the agent's error shape, before any
    work (a body that would be refused for itself is not looked at)."""
    headers = {"Authorization": header} if header else {}
    paths = agent.http.get("/openapi.json").json()["paths"]
    operations = [(method.upper(), path.replace("{name}", "x").replace("{key}", "packs/x"))
                  for path, ops in paths.items() if path != "/health" for method in ops]
    assert len(operations) >= 35
    for method, path in operations:
        r = agent.http.request(method, path, headers=headers, json={})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        if method != "HEAD":
            assert r.json()["error"] == "Unauthorized" and "token" in r.json()["message"], (method, path, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"


def test_health_needs_no_token(agent: Agent) -> None:
    r = agent.http.get("/health")
    assert r.status_code == 200 and r.json()["ok"] is True


def test_a_forced_delta_move_of_a_booted_vm_is_refused_at_once(agent: Agent) -> None:
    agent.boot("vm")
    err = agent.error("POST", "/v1/vms/vm/migrate", 400, json={"to": "b", "mode": "delta"})
    assert "use --mode live" in err["message"]
    assert agent.call("GET", "/v1/vms/vm")["state"] == "running"


def test_a_memory_policy_is_checked_kept_and_shown(agent: Agent) -> None:
    agent.boot("vm", memory_policy={"limit_bytes": 96 << 20, "burst_bytes": 32 << 20, "burst_s": 5})
    shown = agent.call("GET", "/v1/vms/vm")
    assert shown["balloon"] and shown["memory"]["policy"] == {"limit_bytes": 96 << 20, "burst_bytes": 32 << 20, "burst_s": 5.0}
    for bad, says in (({"limit_bytes": 1 << 20}, "too small"), ({"burst_bytes": 1 << 20, "burst_s": 1}, "needs a memory limit")):
        assert says in agent.error("PUT", "/v1/vms/vm/memory", 400, json=bad)["message"]
    assert agent.call("GET", "/v1/vms/vm")["memory"]["policy"]["limit_bytes"] == 96 << 20, "a refused policy changes nothing"
    host = agent.call("GET", "/v1/host")["memory_policy"]
    assert host["vms"]["vm"]["policy"]["limit_bytes"] == 96 << 20 and host["floor_bytes"] > 0
    assert agent.call("PUT", "/v1/vms/vm/memory", json={"limit_bytes": None})["memory"] is None
    agent.image("vm", "img")
    (clone,) = agent.start("img", memory_policy={"limit_bytes": 64 << 20})
    assert agent.call("GET", f"/v1/vms/{clone['name']}")["memory"]["policy"]["limit_bytes"] == 64 << 20


@pytest.mark.parametrize("bad", ["..", "../etc", "a/../../b", ".hidden", "x\x00y", "%2e%2e", "a b"])
def test_names_that_could_escape_the_data_dir_are_refused(agent: Agent, bad: str) -> None:
    """Every name that becomes a file or directory (VM, live image, clone, peer, store key) is
    checked before it is used: a 400 naming it, or a 404 for a name nothing can have."""
    agent.boot("src")
    agent.image("src", "img")
    before = (agent.names(), sorted(p.name for p in agent.manager.settings.home.iterdir()))
    for method, path, body in [
        ("POST", "/v1/vms", {"name": bad, "memory": "64M"}),
        ("POST", "/v1/live-images", {"vm": "src", "name": bad}),
        ("POST", "/v1/live-images/img/start", {"name": bad}),
        ("POST", "/v1/live-images/img/start", {"names": [bad]}),
        ("PUT", f"/v1/peers/{quote(bad, safe='')}", {"url": "http://127.0.0.1:1", "token": "t"}),
        ("GET", f"/v1/store/objects/packs/{quote(bad, safe='/')}", None),
    ]:
        r = agent.http.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code in (400, 404), (method, path, body, r.status_code, r.text)
        if r.status_code == 400:
            assert set(r.json()) == {"error", "message"}, r.text
    assert (agent.names(), sorted(p.name for p in agent.manager.settings.home.iterdir())) == before
    assert [i["name"] for i in agent.call("GET", "/v1/live-images")] == ["img"]
