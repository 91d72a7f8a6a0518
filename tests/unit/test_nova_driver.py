"""The Nova driver's pure parts (Nova is not in the venv): names, power states, boot requests,
resources, the namespace shim (imported by Debian's python3 when it has python3-nova), and the
deployment's config for a vmstream compute."""

from __future__ import annotations

import base64
import configparser
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmstream.errors import InvalidInput
from vmstream.openstack.deploy import configs
from vmstream.openstack.deploy.layout import ComputeSpec, Layout, Secrets
from vmstream.openstack.nova import DRIVER, translate
from vmstream.openstack.nova.shim import install_shim

UUID = "0b6c4d5e-3f0a-4a57-9a55-1c2d3e4f5a6b"
HOST = {"mem_total_bytes": 8 << 30, "mem_available_bytes": 6 << 30, "vms": 3, "vm_pss_bytes": 300 << 20}


def test_vm_names_are_the_instance_uuid_and_round_trip() -> None:
    name = translate.vm_name(UUID)
    assert name == f"nova-{UUID}" and len(name) <= 63
    assert translate.instance_uuid(name) == UUID
    assert translate.instance_uuid("web") is None and translate.instance_uuid("nova-short") is None


def test_agent_states_map_to_nova_power_states() -> None:
    assert translate.power_state("running") == translate.RUNNING
    assert translate.power_state("capturing") == translate.RUNNING  # still runs while captured
    assert translate.power_state("exited") == translate.SHUTDOWN
    assert translate.power_state("starting") == translate.NOSTATE
    assert translate.power_state("something new") == translate.NOSTATE


def test_the_demo_guest_is_marked_by_a_glance_property() -> None:
    demo = translate.guest_source({"image_vmstream_guest": "demo"}, "img", "raw")
    assert demo.kind == "demo"
    body = translate.boot_request("nova-x", 256, 1, demo, user_data_b64=base64.b64encode(b"#!/bin/sh").decode())
    assert body == {"name": "nova-x", "memory": "256M", "cpus": 1, "timeout": 600.0}  # no disk, no user data


def test_a_disk_image_boots_from_its_file_with_its_user_data() -> None:
    disk = translate.guest_source({}, "img", "qcow2")
    assert disk.kind == "disk"
    body = translate.boot_request("nova-x", 512, 2, disk, disk_path="/var/lib/nova/_base/x",
                                  user_data_b64=base64.b64encode(b"#cloud-config\n{}\n").decode(), timeout_s=30)
    assert body["disk"] == "/var/lib/nova/_base/x" and body["user_data"] == "#cloud-config\n{}\n"
    assert body["memory"] == "512M" and body["cpus"] == 2 and body["timeout"] == 30


@pytest.mark.parametrize(("meta", "fmt", "said"), [
    ({"image_vmstream_guest": "debian"}, "raw", "only value is 'demo'"),
    ({}, "iso", "disk_format 'iso'"),
    ({}, None, "disk_format None"),
])
def test_images_the_agent_cannot_boot_are_refused_with_the_fix(meta: dict[str, str], fmt: str | None, said: str) -> None:
    with pytest.raises(InvalidInput, match=said):
        translate.guest_source(meta, "img", fmt)


def test_bad_user_data_is_refused() -> None:
    with pytest.raises(InvalidInput, match="base64"):
        translate.boot_request("n", 256, 1, translate.GuestSource("disk", "i", "raw"), disk_path="/x", user_data_b64="%%%")


def test_resources_from_the_agent_host_answer() -> None:
    res = translate.host_resources(HOST, 2, 100 << 30, 40 << 30, "7.2.15")
    assert (res.memory_mb, res.memory_mb_used, res.vcpus) == (8192, 2048, 2)
    assert (res.local_gb, res.local_gb_used, res.disk_available_least) == (100, 60, 40)
    assert res.qemu_version == 7002015 and res.stats["vmstream_vm_pss_mb"] == "300"
    node = translate.available_resource(res, "compute1")
    assert node["hypervisor_type"] == "qemu" and node["hypervisor_hostname"] == "compute1"
    assert node["supported_instances"] == [("x86_64", "qemu", "hvm")] and json.loads(node["cpu_info"])["arch"] == "x86_64"
    inv = translate.inventory(res, {"VCPU": 16.0, "MEMORY_MB": 1.5, "DISK_GB": 1.0}, {"MEMORY_MB": 512})
    assert inv["MEMORY_MB"] == {"total": 8192, "min_unit": 1, "max_unit": 8192, "step_size": 1,
                                "allocation_ratio": 1.5, "reserved": 512}
    assert set(inv) == {"VCPU", "MEMORY_MB", "DISK_GB"}


def test_memory_overcommit_follows_how_densely_the_vms_run() -> None:
    clones = translate.host_resources({**HOST, "vm_memory_bytes": 3 * (256 << 20)}, 2, 100 << 30, 40 << 30, "7.2")
    assert clones.memory_density == 2.56 and clones.stats["vmstream_memory_density"] == "2.56"  # 768 MiB given, 300 PSS
    assert translate.ram_allocation_ratio(None, 1.0, clones.memory_density, 4.0) == 2.56
    assert translate.ram_allocation_ratio(None, 1.0, 9.5, 4.0) == 4.0  # at most the cap
    assert translate.ram_allocation_ratio(None, 1.5, 1.1, 4.0) == 1.5  # never under Nova's initial ratio
    assert translate.ram_allocation_ratio(2.0, 1.0, 3.0, 4.0) == 2.0  # the operator's explicit ratio wins
    assert translate.ram_allocation_ratio(None, 1.0, 3.0, 1.0) == 1.0  # off
    empty = translate.host_resources({**HOST, "vm_pss_bytes": 0, "vms": 0}, 2, 100 << 30, 40 << 30, "7.2")
    assert empty.memory_density is None and translate.ram_allocation_ratio(None, 1.0, empty.memory_density, 4.0) == 1.0


def test_qemu_versions_as_nova_stores_them() -> None:
    assert translate.qemu_version_int("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)") == 7002015
    assert translate.qemu_version_int("8.1") == 8001000
    assert translate.qemu_version_int("unknown") == 0


def test_the_shim_is_idempotent_and_links_the_source(tmp_path: Path) -> None:
    install_shim(tmp_path)
    install_shim(tmp_path)
    assert (tmp_path / "vmstream").resolve() == Path(translate.__file__).parents[2]
    assert "declare_namespace" in (tmp_path / "nova" / "virt" / "__init__.py").read_text()
    assert "VmstreamDriver" in (tmp_path / "nova" / "virt" / "vmstream" / "__init__.py").read_text()


def in_nova(tmp_path: Path, code: str) -> str:
    """code's output under Debian's python3 with python3-nova and python3-httpx and the shim on
    PYTHONPATH, as nova-compute and nova-scheduler run."""
    probe = subprocess.run(["/usr/bin/python3", "-c", "import nova.virt.driver, httpx"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-nova and python3-httpx are not installed")
    install_shim(tmp_path)
    out = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_nova_loads_the_driver_through_the_shim(tmp_path: Path) -> None:
    code = ("from oslo_utils import importutils; import nova.virt.driver as d; "
            f"c = importutils.import_class('nova.virt.{DRIVER}'); assert issubclass(c, d.ComputeDriver); "
            "import nova.virt.fake; print(c.__module__)")
    assert in_nova(tmp_path, code) == "vmstream.openstack.nova.driver"


def test_computes_in_one_process_each_find_their_own_agent(tmp_path: Path) -> None:
    """[vmstream] agents (host:url|token_file; the URL's colons survive oslo's dict parsing) by the
    host init_host gives each driver, not CONF.host, which one process shares (Nova's functional tests)."""
    probe = subprocess.run(["/usr/bin/python3", "-c", "import nova.virt.driver, httpx"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-nova and python3-httpx are not installed")
    install_shim(tmp_path)
    for n in (1, 2, 9):
        (tmp_path / f"token{n}").write_text(f"t{n}\n")
    (tmp_path / "nova.conf").write_text(
        f"[DEFAULT]\nhost = compute2\n[vmstream]\nagent_url = http://127.0.0.1:8409\ntoken_file = {tmp_path}/token9\n"
        f"agents = compute1:http://127.0.0.1:8401|{tmp_path}/token1, compute2:http://127.0.0.1:8402|{tmp_path}/token2\n")
    code = (f"from nova.conf import CONF; from vmstream.openstack.nova.driver import VmstreamDriver; "
            f"CONF(['--config-file', '{tmp_path}/nova.conf'], project='nova')\n"
            "for host in ('compute1', 'compute2', 'compute3'):\n"
            "    d = VmstreamDriver(None); d._call = lambda *a, **kw: {}; d.init_host(host)\n"
            "    print(host, d._agent().base_url, d._agent().headers['Authorization'], d.get_available_nodes())")
    out = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["compute1 http://127.0.0.1:8401 Bearer t1 ['compute1']",
                                       "compute2 http://127.0.0.1:8402 Bearer t2 ['compute2']",
                                       "compute3 http://127.0.0.1:8409 Bearer t9 ['compute3']"]  # not listed: agent_url


def test_a_vmstream_compute_gets_the_driver_and_its_agent(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "os")
    computes = ComputeSpec.vmstream(2, layout)
    files = configs.rendered(layout, Secrets.load_or_create(layout.secrets_file), computes)
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(files[layout.conf("nova", "compute2.conf")])
    assert conf["DEFAULT"]["compute_driver"] == DRIVER and conf["DEFAULT"]["host"] == "compute2"
    assert conf["vmstream"]["agent_url"] == "http://127.0.0.1:8402"
    assert conf["vmstream"]["token_file"] == str(layout.agent_home("compute2") / "agent.token")
    agents = [c.agent for c in computes]
    assert [(a.name, a.port) for a in agents if a] == [("agent-compute1", 8401), ("agent-compute2", 8402)]
    assert ComputeSpec.fake(1)[0].agent is None
    assert [a.host for a in agents if a] == ["compute1", "compute2"]  # their names as each other's peers
    nova = configparser.ConfigParser(interpolation=None)
    nova.read_string(files[layout.conf("nova", "nova.conf")])
    assert nova["filter_scheduler"]["weight_classes"].endswith(",vmstream.openstack.nova.weigher.LiveImageCacheWeigher")
    fake = configparser.ConfigParser(interpolation=None)
    fake.read_string(configs.rendered(layout, Secrets.load_or_create(layout.secrets_file), ComputeSpec.fake(2))[
        layout.conf("nova", "nova.conf")])
    assert "filter_scheduler" not in fake  # FakeDriver computes: Nova's own weighers only


def test_the_weigher_loads_in_nova_through_the_shim(tmp_path: Path) -> None:
    code = ("from nova.scheduler import weights; "
            f"[c] = weights.HostWeightHandler().get_matching_classes(['{configs.WEIGHER}']); print(c.__name__)")
    assert in_nova(tmp_path, code) == "LiveImageCacheWeigher"


IMAGE = "5d2f8a1e-7c3b-4e9f-a0b1-c2d3e4f5a6b7"


def test_live_images_are_named_after_their_glance_image() -> None:
    live = translate.live_image_name(IMAGE)
    assert translate.glance_image_id(live) == IMAGE and len(live) <= 63
    assert translate.glance_image_id("web") is None and translate.glance_image_id("glance-x") is None
    assert translate.live_image_of({"image_vmstream_live_image": live}) == live
    assert translate.live_image_of({"image_vmstream_guest": "demo"}) is None


def test_a_clone_of_a_server_gets_its_name_params_and_user_data() -> None:
    sysmeta = {"image_vmstream_live_image": "glance-x", "image_vmstream_memory_mb": "256"}
    ud = base64.b64encode(b"#!/bin/sh\necho hi\n").decode()
    body = translate.clone_request("nova-" + UUID, 256, sysmeta, {"role": "web"}, ud, IMAGE)
    assert body == {"names": ["nova-" + UUID], "params": {"role": "web"}, "user_data_b64": ud}
    assert "user_data_b64" not in translate.clone_request("n", 512, sysmeta, {}, None, IMAGE)


def test_a_flavor_smaller_than_the_live_images_memory_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"at least 512 MB of RAM \(this one: 256 MB"):
        translate.clone_request("n", 256, {"image_vmstream_memory_mb": "512"}, {}, None, IMAGE)


def test_a_snapshot_overwrites_inherited_live_image_properties() -> None:
    info = {"name": "glance-" + IMAGE, "memory_bytes": 268443648, "memory_bytes_stored": 1 << 20,
            "parent_image": "glance-old", "created_at": "2026-11-30T09:00:00Z"}
    meta, blob = translate.snapshot_image(info, UUID, "42", 256)
    assert meta["properties"] == {"vmstream_live_image": "glance-" + IMAGE, "vmstream_flavor": "42",
                                  "vmstream_source_server": UUID, "vmstream_memory_mb": "256"}
    assert meta["disk_format"] == "raw" and json.loads(blob)["parent_image"] == "glance-old"


def test_the_live_images_a_host_holds_are_those_memfs_served() -> None:
    images = [{"name": "glance-" + IMAGE, "memory_root": None}, {"name": "glance-" + UUID, "memory_root": "glance-" + IMAGE},
              {"name": "web", "memory_root": None}, {"name": "glance-" + "1" * 36, "memory_root": None}]
    memfs = {"glance-" + IMAGE: {"read_bytes": 4096}, "web": {"read_bytes": 10}, "glance-" + "1" * 36: {"read_bytes": 0}}
    assert translate.held_live_images(images, memfs) == sorted([IMAGE, UUID])  # a layered image shares its root's memory
    memfs["glance-" + IMAGE]["held"] = False  # read before the host dropped its caches
    assert translate.held_live_images(images, memfs) == []
    res = translate.host_resources(HOST, 2, 100 << 30, 50 << 30, "7.2.0", [IMAGE])
    assert res.stats[translate.HELD_STAT] == IMAGE


@pytest.mark.parametrize(("running", "held", "spare", "weight"), [
    ([IMAGE], "", 4096, 1.0), ([], f"x,{IMAGE}", 4096, 0.5), (["other"], "other", 4096, 0.0), ([IMAGE], IMAGE, 100, 0.0),
])
def test_hosts_holding_the_image_with_memory_to_spare_weigh_more(running: list[str], held: str, spare: int,
                                                                   weight: float) -> None:
    assert translate.cache_weight(IMAGE, held, running, spare, 256) == weight
    assert translate.cache_weight(None, held, running, spare, 256) == 0.0


def test_lazy_allocations_fetch_once_and_only_when_read() -> None:
    calls: list[int] = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        return {"c1": {"allocations": {}}}

    lazy = translate.LazyAllocations(fetch)
    assert not lazy.fetched and not calls
    assert dict(lazy) == {"c1": {"allocations": {}}} and lazy["c1"] == {"allocations": {}} and len(lazy) == 1
    assert calls == [1]
