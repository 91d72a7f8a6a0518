"""The openstack client plugin without OpenStack: its pure logic, its commands run through
osc-lib against a fake Nova and Glance (tests/unit/fake_openstack.py), its install for Debian's
python3, and Debian's `openstack` CLI itself driving the plugin against that fake over HTTP."""

from __future__ import annotations

import base64
import importlib
import io
import json
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from keystoneauth1 import session as ks_session
from osc_lib import exceptions

from tests.unit.fake_openstack import FakeCloud
from vmstream.errors import Conflict, InvalidInput, NotFound, VmstreamError
from vmstream.openstack.nova.shim import install_shim
from vmstream.openstack.osc import ENTRY_POINTS, logic, plugin
from vmstream.openstack.osc.client import LiveImageClient
from vmstream.openstack.osc.install import DIST_NAME, entry_points_txt, install_plugin

ROOT = Path(__file__).parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"
DEBIAN_OPENSTACK = "/usr/bin/openstack"


# ---- pure logic ---------------------------------------------------------------------------


def test_params_are_key_value_pairs() -> None:
    assert logic.parse_params(["role=worker", "url=http://x/?a=b", "empty="]) == \
        {"role": "worker", "url": "http://x/?a=b", "empty": ""}
    assert logic.parse_params([]) == {}
    for bad in ("role", "=worker", " =x"):
        with pytest.raises(InvalidInput, match="is not key=value"):
            logic.parse_params([bad])
    with pytest.raises(InvalidInput, match="at most 255"):
        logic.parse_params(["k=" + "v" * 256])


def test_count_is_at_least_one() -> None:
    assert logic.positive_count("3") == 3
    for bad, why in (("0", "at least one"), ("-2", "at least one"), ("two", "not a whole number"), ("1.5", "not a whole")):
        with pytest.raises(InvalidInput, match=why):
            logic.positive_count(bad)


def test_the_start_request_is_one_multi_create_without_network() -> None:
    body = logic.servers_body(name="w", image_id="img", flavor_id="f1", count=5, params={"role": "worker"}, user_data="aGk=")
    assert body == {"server": {"name": "w", "imageRef": "img", "flavorRef": "f1", "min_count": 5, "max_count": 5,
                               "networks": "none", "return_reservation_id": True, "metadata": {"role": "worker"},
                               "user_data": "aGk="}}
    bare = logic.servers_body(name="w", image_id="img", flavor_id="f1", count=1, params={}, user_data=None)["server"]
    assert "metadata" not in bare and "user_data" not in bare


def test_create_image_and_unprotect_requests() -> None:
    assert logic.create_image_body("web-img") == {"createImage": {"name": "web-img"}}
    with pytest.raises(InvalidInput, match="name is empty"):
        logic.create_image_body("  ")
    assert json.loads(logic.unprotect_patch()) == [{"op": "replace", "path": "/protected", "value": False}]
    assert logic.JSON_PATCH == "application/openstack-images-v2.1-json-patch"
    assert logic.image_id_of({"image_id": "abc"}) == "abc"
    with pytest.raises(VmstreamError, match=r"2\.45"):
        logic.image_id_of({})
    assert logic.reservation_of({"reservation_id": "r-1"}) == "r-1"


def test_user_data_is_read_and_encoded_before_any_request(tmp_path: Path) -> None:
    f = tmp_path / "cloud.cfg"
    f.write_bytes(b"#cloud-config\nhostname: w\n")
    assert base64.b64decode(logic.read_user_data(str(f))) == f.read_bytes()
    with pytest.raises(InvalidInput, match="cannot read it"):
        logic.read_user_data(str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="cannot read it"):
        logic.read_user_data(str(tmp_path))  # a directory
    big = tmp_path / "big"
    big.write_bytes(b"x" * 50_000)
    with pytest.raises(InvalidInput, match="at most 49151"):
        logic.read_user_data(str(big))


def test_a_live_image_is_marked_by_the_driver() -> None:
    live = {"id": "i1", "name": "web-img", "status": "active", logic.LIVE_IMAGE: "web-img", logic.FLAVOR: "f1"}
    plain = {"id": "i2", "name": "debian", "status": "active"}
    logic.require_live(live)
    assert logic.default_flavor(live) == "f1"
    with pytest.raises(InvalidInput, match=r"not a live image.*openstack live-image create"):
        logic.require_live(plain)
    with pytest.raises(InvalidInput, match="--flavor"):
        logic.default_flavor({**live, logic.FLAVOR: ""})


def test_waiting_for_an_image_ends_when_it_is_active_and_marked() -> None:
    assert logic.image_progress({"status": "queued"}) == (False, "queued")
    assert logic.image_progress({"status": "saving"}) == (False, "saving")
    done, what = logic.image_progress({"status": "active"})
    assert not done and "vmstream compute" in what
    assert logic.image_progress({"status": "active", logic.LIVE_IMAGE: "x"}) == (True, "active")
    with pytest.raises(VmstreamError, match="killed"):
        logic.image_progress({"status": "killed", "name": "x"})
    with pytest.raises(VmstreamError, match="deleted while the live image was being made"):
        logic.image_progress(None)


def test_waiting_for_servers_fails_on_the_first_error_with_its_fault() -> None:
    build = [{"name": "w-1", "status": "ACTIVE"}, {"name": "w-2", "status": "BUILD"}]
    assert logic.servers_progress(build, 2) == (False, "1 ACTIVE, 1 BUILD (of 2)")
    assert logic.servers_progress([], 2) == (False, "none listed yet (of 2)")
    assert logic.servers_progress([{"status": "ACTIVE"}] * 2, 2)[0]
    assert not logic.servers_progress([{"status": "ACTIVE"}], 2)[0]  # not all listed yet
    error = {"name": "w-3", "id": "s3", "status": "ERROR", "fault": {"message": "No valid host was found."}}
    failed: list[dict[str, Any]] = [*build, error]
    with pytest.raises(VmstreamError, match=r"server w-3 \(s3\) is ERROR: No valid host was found\."):
        logic.servers_progress(failed, 3)


def test_delete_is_refused_naming_the_servers() -> None:
    image = {"id": "i1", "name": "web-img", logic.LIVE_IMAGE: "web-img"}
    logic.refuse_delete(image, [])
    servers = [{"id": "b", "name": "w-10", "status": "ACTIVE"}, {"id": "a", "name": "w-2", "status": "ERROR"}]
    with pytest.raises(Conflict, match=r"2 server\(s\) running from it: w-2 \(a, ERROR\), w-10 \(b, ACTIVE\)"):
        logic.refuse_delete(image, servers)
    with pytest.raises(InvalidInput, match="not a live image"):
        logic.refuse_delete({"id": "i2", "name": "debian"}, [])


def test_names_pick_exactly_one() -> None:
    items = [{"id": "1", "name": "web"}, {"id": "2", "name": "web2"}, {"id": "3", "name": "dup"}, {"id": "4", "name": "dup"}]
    assert logic.pick_named(items, "web", "server", "")["id"] == "1"  # a regex match of web2 too, not picked
    with pytest.raises(NotFound, match="no server named or with id 'nope': see"):
        logic.pick_named(items, "nope", "server", "see `openstack server list`")
    with pytest.raises(InvalidInput, match=r"2 images are named 'dup' \(3, 4\): give the id"):
        logic.pick_named(items, "dup", "image", "")
    assert logic.looks_like_uuid("0b6c4d5e-3f0a-4a57-9a55-1c2d3e4f5a6b") and not logic.looks_like_uuid("web-img")


def test_api_errors_are_read_from_nova_and_glance_bodies() -> None:
    nova = json.dumps({"itemNotFound": {"message": "Instance x could not be found.", "code": 404}})
    assert logic.error_message(404, "application/json", nova) == "Instance x could not be found."
    glance = "<html><body><h1>404 Not Found</h1>No image found with ID x</body></html>"
    assert logic.error_message(404, "text/html; charset=UTF-8", glance) == "404 Not Found No image found with ID x"
    assert logic.error_message(500, "text/plain", "") == "HTTP 500"
    sig = json.dumps({"errors": [{"title": "Bad", "detail": "the detail"}]})
    assert logic.error_message(400, "application/json", sig) == "the detail"


def test_lists_follow_next_links_and_clones_sort_as_numbered() -> None:
    assert logic.next_link({"servers_links": [{"rel": "next", "href": "http://n/v2.1/servers?marker=a"}]}, "servers") == \
        "http://n/v2.1/servers?marker=a"
    assert logic.next_link({"next": "/v2/images?marker=b"}, "images") == "/v2/images?marker=b"
    assert logic.next_link({"servers": []}, "servers") is None
    names = ["w-10", "w-2", "w-1", "a"]
    assert [s["name"] for s in sorted(({"name": n} for n in names), key=logic.natural_name)] == ["a", "w-1", "w-2", "w-10"]


# ---- the commands, through osc-lib, against the fake cloud ---------------------------------


class Clock:
    """Time that passes only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _command_class(verb: str) -> Any:
    module, _, cls = ENTRY_POINTS["openstack.vmstream.v1"][f"live-image_{verb}"].partition(":")
    return getattr(importlib.import_module(module), cls)


def run(cloud: FakeCloud, *argv: str) -> tuple[str, str]:
    """`openstack live-image <argv>` as osc runs it (parse, run, format); (stdout, stderr)."""
    clock = Clock()
    client = LiveImageClient(cloud.compute, cloud.image, sleep=clock.sleep, clock=clock, poll_s=2.0)
    app = SimpleNamespace(client_manager=SimpleNamespace(vmstream=client), stdout=io.StringIO(), stderr=io.StringIO(),
                          options=SimpleNamespace(debug=False), command_manager=SimpleNamespace(namespace="openstack.cli"))
    verb, *rest = argv
    cmd = _command_class(verb)(app, None, cmd_name=f"live-image {verb}")
    parsed = cmd.get_parser(f"openstack live-image {verb}").parse_args(rest)
    cmd.run(parsed)
    return app.stdout.getvalue(), app.stderr.getvalue()


@pytest.fixture
def cloud() -> FakeCloud:
    return FakeCloud()


def test_create_waits_for_the_driver_and_shows_the_live_image(cloud: FakeCloud) -> None:
    web = cloud.add_server("web", flavor="f-big")
    out, err = run(cloud, "create", "web", "web-img", "-f", "json")
    shown = json.loads(out)
    assert shown["name"] == "web-img" and shown["status"] == "active" and shown["live_image"] == "web-img"
    assert shown["source_server"] == web["id"] and shown["flavor"] == "f-big" and shown["protected"] is True
    assert set(shown) == set(logic.IMAGE_FIELDS)
    [post] = cloud.writes()
    assert (post.service, post.path, post.body) == ("compute", f"/servers/{web['id']}/action", {"createImage": {"name": "web-img"}})
    assert "making live image web-img" in err and ": saving (" in err and "vmstream_live_image property" in err
    assert err.strip().splitlines()[-1].startswith(f"live image {shown['id']}: active (")


def test_create_no_wait_shows_the_image_as_nova_left_it(cloud: FakeCloud) -> None:
    cloud.add_server("web")
    out, err = run(cloud, "create", "web", "web-img", "--no-wait", "-f", "value", "-c", "status", "-c", "live_image")
    assert out.split() == ["saving"] and err == ""  # one GET: the fake moved it from queued to saving


def test_create_refuses_an_unknown_server_or_a_taken_name_before_asking_nova(cloud: FakeCloud) -> None:
    with pytest.raises(exceptions.CommandError, match="no server named or with id 'nope'"):
        run(cloud, "create", "nope", "img")
    cloud.add_server("web")
    taken = cloud.add_image("web-img", live=False)
    with pytest.raises(exceptions.CommandError, match=f"an image named 'web-img' exists already \\({taken['id']}\\)"):
        run(cloud, "create", "web", "web-img")
    with pytest.raises(exceptions.CommandError, match="no server named or with id '0b6c4d5e-3f0a-4a57-9a55-1c2d3e4f5a6b'"):
        run(cloud, "create", "0b6c4d5e-3f0a-4a57-9a55-1c2d3e4f5a6b", "img2")  # Nova's 404 for the id, then no such name
    assert cloud.writes() == []


def test_create_fails_when_the_snapshot_fails_or_nothing_marks_the_image(cloud: FakeCloud) -> None:
    cloud.add_server("web")
    cloud.image_fails = True
    with pytest.raises(exceptions.CommandError, match="deleted while the live image was being made"):
        run(cloud, "create", "web", "a")
    cloud.image_fails, cloud.marks_live = False, False  # a compute that is not vmstream's
    with pytest.raises(exceptions.CommandError, match=r"still active, waiting for the driver's vmstream_live_image .* after 5 s"):
        run(cloud, "create", "web", "b", "--timeout", "5")


def test_start_makes_all_clones_in_one_request(cloud: FakeCloud, tmp_path: Path) -> None:
    image = cloud.add_image("web-img")
    user_data = tmp_path / "cloud.cfg"
    user_data.write_text("#cloud-config\n")
    out, _ = run(cloud, "start", "web-img", "--count", "3", "--name", "w", "--param", "role=worker", "--param", "n=1",
                 "--user-data", str(user_data), "-f", "json")
    [post] = cloud.writes()
    assert post.path == "/servers" and post.body == {"server": {
        "name": "w", "imageRef": image["id"], "flavorRef": "f-small", "min_count": 3, "max_count": 3, "networks": "none",
        "return_reservation_id": True, "metadata": {"role": "worker", "n": "1"},
        "user_data": base64.b64encode(b"#cloud-config\n").decode()}}
    rows = json.loads(out)
    assert [r["Name"] for r in rows] == ["w-1", "w-2", "w-3"] and {r["Status"] for r in rows} == {"BUILD"}
    assert set(rows[0]) == {"ID", "Name", "Status", "Host"} and rows[0]["Host"] == "compute1"
    listed = [c for c in cloud.requests("compute", "GET") if "reservation_id" in c.params]
    assert len(listed) == 2 and "marker" in listed[1].params  # 3 servers, 2 a page
    assert listed[0].params["reservation_id"].startswith("r-")


def test_start_wait_ends_when_all_are_active_and_names_default_to_the_image(cloud: FakeCloud) -> None:
    cloud.add_image("web-img")
    out, err = run(cloud, "start", "web-img", "--count", "2", "--flavor", "big", "--wait", "-f", "value", "-c", "Name", "-c", "Status")
    assert out.splitlines() == ["web-img-1 ACTIVE", "web-img-2 ACTIVE"]
    assert cloud.writes()[0].body["server"]["flavorRef"] == "f-big"
    assert "starting 2 server(s) from live image web-img" in err and "2 BUILD (of 2)" in err and "2 ACTIVE (of 2)" in err
    run(cloud, "start", "web-img", "--count", "1", "--flavor", "f-big")
    assert cloud.writes()[1].body["server"]["flavorRef"] == "f-big"


def test_start_wait_fails_naming_the_fault(cloud: FakeCloud) -> None:
    cloud.add_image("web-img")
    cloud.server_fault = "No valid host was found. There are not enough hosts available."
    with pytest.raises(exceptions.CommandError, match=r"server web-img-2 \(.*\) is ERROR: No valid host was found"):
        run(cloud, "start", "web-img", "--count", "3", "--wait")


@pytest.mark.parametrize(("argv", "why"), [
    (["--count", "2", "--param", "oops"], "--param 'oops' is not key=value"),
    (["--count", "2", "--user-data", "/nonexistent/cloud.cfg"], "--user-data /nonexistent/cloud.cfg: cannot read it"),
])
def test_start_refuses_bad_input_before_any_request(cloud: FakeCloud, argv: list[str], why: str) -> None:
    cloud.add_image("web-img")
    with pytest.raises(exceptions.CommandError, match=why):
        run(cloud, "start", "web-img", *argv)
    assert cloud.calls == []


@pytest.mark.parametrize("count", ["0", "-1", "many"])
def test_start_refuses_a_bad_count_while_parsing(cloud: FakeCloud, count: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(cloud, "start", "web-img", "--count", count)
    assert exit_.value.code == 2 and "--count" in capsys.readouterr().err
    assert cloud.calls == []


def test_start_refuses_what_is_not_a_live_image_and_starts_nothing(cloud: FakeCloud) -> None:
    cloud.add_image("debian", live=False)
    with pytest.raises(exceptions.CommandError, match=r"'debian' .* is not a live image .*`openstack live-image create"):
        run(cloud, "start", "debian", "--count", "2")
    with pytest.raises(exceptions.CommandError, match="no image named or with id 'nope': see `openstack live-image list`"):
        run(cloud, "start", "nope", "--count", "2")
    cloud.add_image("noflavor", vmstream_flavor="")
    with pytest.raises(exceptions.CommandError, match=r"has no vmstream_flavor property: .* --flavor"):
        run(cloud, "start", "noflavor", "--count", "2")
    with pytest.raises(exceptions.CommandError, match="no flavor named or with id 'huge'"):
        run(cloud, "start", "noflavor", "--count", "2", "--flavor", "huge")
    assert cloud.writes() == [] and cloud.servers == {}


def test_list_shows_only_live_images_across_pages(cloud: FakeCloud) -> None:
    live = [cloud.add_image(f"img{n}") for n in range(3)]
    cloud.add_image("debian", live=False)
    cloud.add_image("cirros", live=False)
    out, _ = run(cloud, "list", "-f", "json")
    rows = json.loads(out)
    assert [r["ID"] for r in rows] == [i["id"] for i in live]
    assert set(rows[0]) == {"ID", "Name", "Status", "Live Image", "Source Server", "Created At"}
    assert len(cloud.requests("image", "GET")) == 3  # 5 images, 2 per page


def test_servers_lists_every_project_when_allowed(cloud: FakeCloud) -> None:
    image = cloud.add_image("web-img")
    other = cloud.add_image("other")
    for n in (10, 2, 1):
        cloud.add_server(f"w-{n}", image["id"])
    cloud.add_server("x", other["id"])
    out, _ = run(cloud, "servers", "web-img", "-f", "value", "-c", "Name")
    assert out.split() == ["w-1", "w-2", "w-10"]
    assert cloud.requests("compute")[-1].params["all_tenants"] == "1"
    cloud.admin = False  # the policy refuses all_tenants: our project's servers
    out, _ = run(cloud, "servers", image["id"], "-f", "value", "-c", "Name")
    assert out.split() == ["w-1", "w-2", "w-10"] and "all_tenants" not in cloud.requests("compute")[-1].params


def test_delete_is_refused_while_servers_run_then_unprotects_and_deletes(cloud: FakeCloud) -> None:
    image = cloud.add_image("web-img")
    server = cloud.add_server("w-1", image["id"])
    with pytest.raises(exceptions.CommandError, match=rf"has 1 server\(s\) running from it: w-1 \({server['id']}, ACTIVE\)"):
        run(cloud, "delete", "web-img")
    assert cloud.writes() == [] and image["id"] in cloud.images
    del cloud.servers[server["id"]]
    out, _ = run(cloud, "delete", "web-img")
    patch, delete = cloud.writes()
    assert (patch.method, patch.path, patch.headers) == \
        ("PATCH", f"/v2/images/{image['id']}", {"Content-Type": "application/openstack-images-v2.1-json-patch"})
    assert json.loads(patch.body) == [{"op": "replace", "path": "/protected", "value": False}]
    assert (delete.method, delete.path) == ("DELETE", f"/v2/images/{image['id']}")
    assert out == "" and image["id"] not in cloud.images


def test_delete_refuses_unknown_and_plain_images(cloud: FakeCloud) -> None:
    with pytest.raises(exceptions.CommandError, match="no image named or with id 'nope'"):
        run(cloud, "delete", "nope")
    cloud.add_image("debian", live=False)
    with pytest.raises(exceptions.CommandError, match="not a live image"):
        run(cloud, "delete", "debian")
    assert cloud.writes() == []


def test_make_client_talks_to_nova_at_a_microversion_with_everything_needed() -> None:
    instance = SimpleNamespace(session=ks_session.Session(), interface="public", region_name="RegionOne")
    client = plugin.make_client(instance)
    assert client.compute.default_microversion == logic.COMPUTE_MICROVERSION == "2.74"  # type: ignore[attr-defined]
    assert client.compute.service_type == "compute" and client.image.service_type == "image"  # type: ignore[attr-defined]
    assert client.compute.region_name == "RegionOne" and client.compute.raise_exc is False  # type: ignore[attr-defined]
    parser = plugin.build_option_parser(__import__("argparse").ArgumentParser())
    assert parser.parse_args([]).os_vmstream_api_version == plugin.DEFAULT_API_VERSION in plugin.API_VERSIONS


# ---- installing for Debian's python3 ------------------------------------------------------


def test_entry_points_are_the_same_in_pyproject_and_the_install() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert {g: project[g] for g in ENTRY_POINTS} == ENTRY_POINTS
    assert "[openstack.cli.extension]\nvmstream = vmstream.openstack.osc.plugin\n" in entry_points_txt()


def test_install_is_idempotent_and_shares_the_directory_with_the_nova_shim(tmp_path: Path) -> None:
    install_shim(tmp_path)
    old = tmp_path / f"{DIST_NAME}-0.0.1.dist-info"
    old.mkdir()
    (old / "entry_points.txt").write_text("[openstack.cli.extension]\nvmstream = gone\n")
    install_plugin(tmp_path)
    dist = next(tmp_path.glob(f"{DIST_NAME}-*.dist-info"))
    mtimes = {p: p.stat().st_mtime_ns for p in dist.iterdir()}
    install_plugin(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in dist.iterdir()} == mtimes  # nothing rewritten: stevedore's cache stays
    assert not old.exists() and [p.name for p in tmp_path.glob("*.dist-info")] == [dist.name]
    assert (tmp_path / "vmstream").resolve() == ROOT / "vmstream"
    assert (tmp_path / "nova" / "virt" / "vmstream" / "driver.py").is_file()  # the shim's files are left alone
    install_shim(tmp_path)
    assert (dist / "entry_points.txt").read_text() == entry_points_txt()
    (tmp_path / "vmstream").unlink()
    (tmp_path / "vmstream").mkdir()
    with pytest.raises(FileExistsError, match="not the link"):
        install_plugin(tmp_path)


@pytest.fixture(scope="module")
def debian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path(DEBIAN_PYTHON).exists() or subprocess.run([DEBIAN_PYTHON, "-c", "import osc_lib, keystoneauth1"],
                                                          capture_output=True).returncode != 0:
        pytest.skip("Debian's python3-osc-lib and python3-keystoneauth1 are not installed")
    return install_plugin(tmp_path_factory.mktemp("osc"))


def _debian(debian_dir: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(debian_dir), "PATH": "/usr/bin:/bin", "HOME": str(debian_dir)}
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout, cwd=debian_dir)


def test_debian_python_finds_the_plugin_and_imports_nothing_else(debian_dir: Path) -> None:
    # keystoneauth1 and osc-lib bring their own (Debian's keystoneauth1 imports httpx): only what
    # the plugin adds beyond them and the standard library counts.
    code = ("import importlib.metadata as m, sys; "
            "print([e.value for e in m.entry_points(group='openstack.cli.extension') if e.name == 'vmstream']); "
            "import osc_lib.command.command, osc_lib.exceptions, keystoneauth1.adapter; "
            "before = {n.split('.')[0] for n in sys.modules}; "
            "import vmstream.openstack.osc.plugin, vmstream.openstack.osc.v1.live_image; "
            "print(sorted(n for n in sys.modules if n.startswith('vmstream'))); "
            "print(sorted({n.split('.')[0] for n in sys.modules} - before - set(sys.stdlib_module_names) - {'vmstream'}))")
    out = _debian(debian_dir, DEBIAN_PYTHON, "-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    entry, modules, foreign = out.stdout.splitlines()
    assert entry == "['vmstream.openstack.osc.plugin']"
    assert modules == str(sorted(["vmstream", "vmstream.errors", "vmstream.openstack", "vmstream.openstack.osc",
                                  "vmstream.openstack.osc.client", "vmstream.openstack.osc.logic",
                                  "vmstream.openstack.osc.plugin", "vmstream.openstack.osc.v1",
                                  "vmstream.openstack.osc.v1.live_image"]))
    assert foreign == "[]"


def _need_openstack_cli() -> None:
    if not shutil.which(DEBIAN_OPENSTACK):
        pytest.skip("Debian's python3-openstackclient is not installed")


def test_debian_openstack_shows_the_verbs_without_a_cloud(debian_dir: Path) -> None:
    _need_openstack_cli()
    group = _debian(debian_dir, DEBIAN_OPENSTACK, "live-image", "--help")
    assert group.returncode == 0, group.stderr
    for verb in ("create", "start", "list", "servers", "delete"):
        assert f"live-image {verb}" in group.stdout
    start = _debian(debian_dir, DEBIAN_OPENSTACK, "help", "live-image", "start")
    assert start.returncode == 0, start.stderr
    for option in ("--count <n>", "--param <key=value>", "--user-data <file>", "--flavor <flavor>", "--wait", "-f {"):
        assert option in start.stdout
    assert "vmstream-osc-plugin plugin" in start.stdout


@pytest.fixture
def http_cloud() -> Iterator[tuple[FakeCloud, str, list[dict[str, str]]]]:
    """The fake cloud behind a real HTTP server: Nova and Glance on one endpoint (osc's auth type none)."""
    cloud = FakeCloud()
    cloud.instant = True
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            service = "image" if self.path.startswith("/v2/") else "compute"
            seen.append({"service": service, "method": self.command, "path": self.path, **dict(self.headers.items())})
            is_json = self.headers.get("Content-Type", "") == "application/json" and body
            r = cloud.handle(service, self.command, self.path, {}, json.loads(body) if is_json else body or None,
                             {"Content-Type": self.headers.get("Content-Type", "")})
            payload = r.text.encode()
            self.send_response(r.status_code)
            for k, v in r.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    cloud.base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield cloud, cloud.base, seen
    finally:
        server.shutdown()
        server.server_close()


def test_debian_openstack_drives_the_plugin_over_http(debian_dir: Path, http_cloud: tuple[FakeCloud, str, list[dict[str, str]]],
                                                      tmp_path: Path) -> None:
    """Debian's openstack, osc-lib and keystoneauth1 (not the venv's) against the fake over HTTP:
    microversion headers, JSON and JSON-patch bodies, Nova's absolute next links."""
    _need_openstack_cli()
    cloud, url, seen = http_cloud
    cloud.add_server("web")

    def osc(*argv: str) -> subprocess.CompletedProcess[str]:
        return _debian(debian_dir, DEBIAN_OPENSTACK, "--os-auth-type", "none", "--os-endpoint", url, "live-image", *argv)

    made = osc("create", "web", "web-img", "-f", "json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["live_image"] == "web-img" and "live image" in made.stderr
    action = next(h for h in seen if h["method"] == "POST")
    assert action["OpenStack-API-Version"] == "compute 2.74" and action["Content-Type"] == "application/json"

    user_data = tmp_path / "cloud.cfg"
    user_data.write_text("#cloud-config\n")
    started = osc("start", "web-img", "--count", "3", "--name", "w", "--param", "role=worker", "--user-data", str(user_data),
                  "--wait", "-f", "json")
    assert started.returncode == 0, started.stderr
    assert [(r["Name"], r["Status"]) for r in json.loads(started.stdout)] == [("w-1", "ACTIVE"), ("w-2", "ACTIVE"), ("w-3", "ACTIVE")]
    assert any("marker=" in h["path"] for h in seen if h["path"].startswith("/v2.1/servers/detail"))  # followed a next link

    refused = osc("delete", "web-img")
    assert refused.returncode == 1 and "has 3 server(s) running from it: w-1" in refused.stderr
    for sid in [s["id"] for s in cloud.servers.values() if s["name"].startswith("w-")]:
        del cloud.servers[sid]
    deleted = osc("delete", "web-img")
    assert deleted.returncode == 0, deleted.stderr
    patch = next(h for h in seen if h["method"] == "PATCH")
    assert patch["Content-Type"] == "application/openstack-images-v2.1-json-patch"
    assert not any(i["name"] == "web-img" for i in cloud.images.values())

    bad = osc("start", "nope", "--count", "2")
    assert bad.returncode == 1 and "no image named or with id 'nope'" in bad.stderr
