"""VM and image lifecycles through the in-process agent (fake QEMU)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import cast

import pytest

from tests.host.conftest import Agent, FakeProcess, make_agent
from vmstream.host.state import Op, VmState


def test_boot_list_show_destroy(agent: Agent) -> None:
    vm = agent.boot("web")
    assert vm["state"] == "running" and vm["hostname"] == "web" and vm["ready_s"] is not None
    assert agent.call("GET", "/v1/vms/web")["mac"] == vm["mac"]
    assert agent.call("DELETE", "/v1/vms/web") == {"destroyed": "web"}
    assert agent.names() == set()


def test_a_failed_boot_leaves_nothing(agent: Agent) -> None:
    agent.starter.fail["http"] = lambda name: name == "bad"
    err = agent.error("POST", "/v1/vms", 500, json={"name": "bad", "memory": "64M"})
    assert err["error"] == "QemuError" and "fake http failure" in err["message"]
    assert agent.names() == set() and agent.manager.registry.find("bad") is None


def test_clones_get_names_and_identities(agent: Agent) -> None:
    agent.boot("src")
    image = agent.image("src", "img")
    assert image["layout"] == "full" and image["source_vm"] == "src"
    vms = agent.start("img", count=3)
    assert [v["name"] for v in vms] == ["img-1", "img-2", "img-3"]
    assert all(v["parent_image"] == "img" and v["state"] == "running" for v in vms)
    assert len({v["mac"] for v in vms}) == 3 and len({v["vmgenid"] for v in vms}) == 3
    assert all("identity_applied" in v["phases"] for v in vms)
    more = agent.start("img", count=1)
    assert more[0]["name"] == "img-4"
    servers = agent.call("GET", "/v1/live-images/img/servers")
    assert {s["name"] for s in servers} == {"img-1", "img-2", "img-3", "img-4"}


def test_a_clone_start_is_all_or_nothing(agent: Agent) -> None:
    agent.boot("src")
    agent.image("src", "img")
    agent.starter.fail["resume"] = lambda name: name == "w-2"
    err = agent.error("POST", "/v1/live-images/img/start", 500, json={"count": 3, "name": "w"})
    assert "w-2" in err["message"]
    assert agent.names() == {"src"}


def test_a_failed_capture_leaves_no_image_and_the_vm_running(agent: Agent) -> None:
    agent.boot("src")
    agent.starter.fail["capture"] = lambda name: True
    agent.error("POST", "/v1/live-images", 500, json={"vm": "src", "name": "img"})
    assert agent.call("GET", "/v1/live-images") == []
    assert agent.call("GET", "/v1/vms/src")["state"] == "running"


def test_an_image_outlives_its_vm(agent: Agent) -> None:
    agent.boot("src")
    agent.image("src", "img")
    agent.call("DELETE", "/v1/vms/src")
    (clone,) = agent.start("img", name="c")
    assert clone["name"] == "c-1"


def test_a_pooled_qemu_is_taken_by_the_next_start(pooled_agent: Agent) -> None:
    a = pooled_agent
    a.boot("src")
    a.image("src", "img")
    (first,) = a.start("img")
    assert "pool_taken" not in first["phases"]
    a.wait_pool("img")
    (second,) = a.start("img")
    assert "pool_taken" in second["phases"]
    a.call("DELETE", "/v1/vms/img-1")
    a.call("DELETE", "/v1/vms/img-2")
    a.wait_pool("img")
    a.call("DELETE", "/v1/live-images/img")  # stops the image's pool too
    assert [r.name for r in a.manager.registry.all(pooled=True)] == ["src"]
    assert a.call("GET", "/v1/host")["clone_pool"] == {"ready": {}, "pids": {}}


def test_starts_one_after_another_keep_taking_pooled_qemus(pooled_agent: Agent) -> None:
    """Starts close together in time but never two at once (a user, a bench) wait for the
    pooled QEMU being readied: only concurrent starts skip it."""
    a = pooled_agent
    a.boot("src")
    a.image("src", "img")
    a.start("img")  # the first fills the pool
    taken = ["pool_taken" in a.start("img")[0]["phases"] for _ in range(3)]
    assert taken == [True, True, True]


def test_a_deeper_pool_refills_after_the_burst_not_after_each_start(tmp_path: Path) -> None:
    """With QEMUs left in the pool, a start does not refill it at once (that would take CPU from
    the next starts of a batch, Nova's one by one); once starts stop, it is filled again."""
    manager, http = make_agent(tmp_path / "home", clone_pool=3)
    with http:
        a = Agent(http, manager)
        a.boot("src")
        a.image("src", "img")
        a.start("img")  # the first fills the pool
        _wait_ready(a, 3)
        for left in (2, 1):
            assert "pool_taken" in a.start("img")[0]["phases"]
            assert a.call("GET", "/v1/host")["clone_pool"]["ready"]["img"] == left  # no refill yet
        _wait_ready(a, 3)  # quiet: refilled
    FakeProcess.running.clear()


def _wait_ready(a: Agent, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while a.call("GET", "/v1/host")["clone_pool"]["ready"].get("img", 0) < count:
        assert time.monotonic() < deadline, f"the pool of img never held {count}"
        time.sleep(0.02)


def _pooled_tb_mib(a: Agent) -> list[int]:
    """The translation cache sizes of the pooled QEMUs ready now."""
    recs = [r for r in a.manager.registry.all(pooled=True) if r.state == VmState.POOLED]
    procs = [cast(FakeProcess, a.starter.proc(r)) for r in recs]
    return [p.spec.tb_mib for p in procs if p.spec is not None]


@pytest.mark.parametrize(("flushes", "grows"), [(1, False), (3, True), (None, False)])
def test_a_run_through_that_overflowed_the_translation_cache_gets_the_next_pooled_qemu_more(
        pooled_agent: Agent, flushes: int | None, grows: bool) -> None:
    a = pooled_agent
    a.starter.tb_flushes = flushes  # 1: only the state load flushed; more: the cache filled up; None: QEMU did not say
    a.boot("src")
    a.image("src", "img")
    a.start("img")
    a.wait_pool("img")
    (first,) = _pooled_tb_mib(a)
    a.starter.tb_flushes = 1  # from here on it fits
    a.start("img")  # takes it; the refill starts with what the run-through showed
    a.wait_pool("img")
    assert _pooled_tb_mib(a) == [2 * first if grows else first]
    (anew,) = a.start("img", pool=False)  # a clone started anew gets the grown cache too, else its own default
    spec = cast(FakeProcess, a.starter.proc(a.manager.registry.get(anew["name"]))).spec
    assert spec is not None and spec.tb_mib == (2 * first if grows else a.manager.settings.clone_tb_mib)


def test_a_failing_pool_fill_does_not_fail_starts(pooled_agent: Agent) -> None:
    a = pooled_agent
    a.starter.fail["pool"] = lambda name: True
    a.boot("src")
    a.image("src", "img")
    a.start("img")
    (second,) = a.start("img")
    assert second["state"] == "running" and "pool_taken" not in second["phases"]
    assert {r.state for r in a.manager.registry.all(pooled=True)} == {VmState.RUNNING}


def test_clone_hooks_results_are_kept(agent: Agent) -> None:
    agent.boot("src")
    agent.image("src", "img")
    agent.start("img")
    deadline = time.monotonic() + 5
    while agent.call("GET", "/v1/vms/img-1")["hooks"] is None:
        assert time.monotonic() < deadline, "hook results never recorded"
        time.sleep(0.01)
    assert agent.call("GET", "/v1/vms/img-1")["hooks"]["state"] == "done"


def test_a_restarted_agent_adopts_running_vms_and_drops_half_started_ones(tmp_path: Path) -> None:
    home = tmp_path / "home"
    manager, http = make_agent(home)
    with http:
        a = Agent(http, manager)
        a.boot("keep")
        a.boot("half")
        manager.registry.set_state("half", VmState.STARTING)
        manager.registry.begin("keep", Op.MIGRATE, VmState.MIGRATING)
    manager2, http2 = make_agent(home)
    with http2:
        b = Agent(http2, manager2)
        assert b.names() == {"keep"}
        assert b.call("GET", "/v1/vms/keep")["state"] == "running"  # the migration died with the old agent


def test_info_shows_the_settings_in_force_with_secrets_masked(tmp_path: Path) -> None:
    manager, http = make_agent(tmp_path / "home", peer_token="s3cret", clone_tb_mib=12)
    with http:
        info = Agent(http, manager).call("GET", "/v1/info")
    assert info["settings"]["clone_tb_mib"] == 12 and info["settings"]["peer_token"] == "***"
    assert "s3cret" not in str(info)


def test_the_openapi_document_lists_vm_states(agent: Agent) -> None:
    doc = agent.http.get("/openapi.json").json()
    assert set(doc["components"]["schemas"]["VmState"]["enum"]) == {s.value for s in VmState}


def test_operations_and_background_failures_are_logged(pooled_agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    a = pooled_agent
    a.starter.fail["pool"] = lambda name: True
    with caplog.at_level(logging.INFO, logger="vmstream.host"):
        a.boot("src")
        a.image("src", "img")
        a.start("img")
        deadline = time.monotonic() + 5
        while not any("clone pool of image img failed" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.01)
        a.error("DELETE", "/v1/vms/ghost", 404)
        a.call("DELETE", "/v1/vms/img-1")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("boot vm=src: done in") for m in messages), messages
    assert any(m.startswith("live-image create vm=src image=img: done in") for m in messages), messages
    assert any(m.startswith("destroy vm=img-1: done in") for m in messages), messages
