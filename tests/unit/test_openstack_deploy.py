"""The OpenStack deployment's pure parts: rendered configs, passwords, the PID table's stop."""

from __future__ import annotations

import configparser
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmstream.openstack.deploy import configs
from vmstream.openstack.deploy.layout import ComputeSpec, Layout, Secrets
from vmstream.openstack.deploy.processes import ProcessTable, is_running, session_members


def _ini(text: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(interpolation=None, strict=False)
    p.read_string(text)
    return p


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "os")


def test_secrets_are_made_once_and_kept_private(layout: Layout) -> None:
    a = Secrets.load_or_create(layout.secrets_file)
    b = Secrets.load_or_create(layout.secrets_file)
    assert a == b and set(a.services) == {"glance", "placement", "nova", "neutron"}
    assert layout.secrets_file.stat().st_mode & 0o777 == 0o600


def test_every_service_listens_on_loopback_only(layout: Layout) -> None:
    files = configs.rendered(layout, Secrets.load_or_create(layout.secrets_file), ComputeSpec.fake(2))
    text = "\n".join(files.values())
    assert "0.0.0.0" not in text and "localhost:" not in text
    assert _ini(files[layout.conf("mysql", "my.cnf")])["mysqld"]["bind-address"] == "127.0.0.1"
    for service in ("glance", "neutron"):
        conf = _ini(files[layout.conf(service, "glance-api.conf" if service == "glance" else "neutron.conf")])
        assert conf["DEFAULT"]["bind_host"] == "127.0.0.1"
    for api in ("keystone", "placement", "nova"):
        uwsgi = files[layout.conf(api, "uwsgi.ini")]
        assert "http-socket = 127.0.0.1:" in uwsgi and "add-header = Connection: close" in uwsgi


def test_nova_configs_keep_the_database_away_from_computes(layout: Layout) -> None:
    secrets = Secrets.load_or_create(layout.secrets_file)
    computes = [ComputeSpec("compute1"), ComputeSpec("compute2", "vmstream.VmstreamDriver",
                                                     {"vmstream": {"agent_url": "http://127.0.0.1:8400"}})]
    files = configs.rendered(layout, secrets, computes)
    nova = _ini(files[layout.conf("nova", "nova.conf")])
    assert not nova.has_section("database") and not nova.has_section("api_database")
    assert nova["DEFAULT"]["heal_instance_info_cache_interval"] == "0"
    assert int(nova["quota"]["instances"]) >= 11
    assert _ini(files[layout.conf("nova", "nova-db.conf")]).has_section("api_database")
    c1, c2 = (_ini(files[layout.conf("nova", f"compute{i}.conf")]) for i in (1, 2))
    assert c1["DEFAULT"]["host"] == "compute1" and c1["DEFAULT"]["compute_driver"] == "fake.FakeDriver"
    assert c1["DEFAULT"]["state_path"] != c2["DEFAULT"]["state_path"]
    assert c1["oslo_concurrency"]["lock_path"] != c2["oslo_concurrency"]["lock_path"]
    assert c2["DEFAULT"]["compute_driver"] == "vmstream.VmstreamDriver"
    assert c2["vmstream"]["agent_url"] == "http://127.0.0.1:8400"  # the seam for the vmstream driver


def test_keystone_caches_tokens(layout: Layout) -> None:
    k = _ini(configs.keystone_conf(layout, Secrets.load_or_create(layout.secrets_file)))
    assert k["cache"]["enabled"] == "true" and k["cache"]["backend"] == "dogpile.cache.memory"


def test_stop_takes_the_session_and_leaves_other_processes(tmp_path: Path) -> None:
    """A service that forks a worker: both stopped, an unrelated process untouched, record gone."""
    table = ProcessTable(tmp_path / "pids")
    script = "import subprocess, time, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    rec = table.start("svc", [sys.executable, "-c", script], tmp_path / "svc.log")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while len(session_members(rec.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert table.running("svc")
        killed = table.stop(["svc"], wait_s=5)
        assert killed in ([], ["svc"])
        assert not session_members(rec.pid)  # the worker went with its service
        assert table.get("svc") is None and not table.running("svc")
        assert bystander.poll() is None
        assert table.stop(["svc"]) == []  # a second stop is a no-op
    finally:
        bystander.kill()
        bystander.wait()


def test_a_reused_pid_is_not_ours(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "pids")
    rec = table.start("svc", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "svc.log")
    assert is_running(rec.pid, rec.start_ticks)
    assert not is_running(rec.pid, rec.start_ticks + 1)  # same PID, other start time: someone else's
    table.stop(["svc"])
