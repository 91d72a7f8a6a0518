"""Unit tests of pure logic: sizes, names, page runs, the cpio writer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmstream.capture.guestmem import runs_of
from vmstream.config import check_name, parse_memory, parse_size
from vmstream.errors import InvalidInput
from vmstream.guest import cpio
from vmstream.lb.members import serving_address


@pytest.mark.parametrize(("text", "value"), [("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20), ("128", 128 << 20)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "", "1.5G", "-3M", "12Q"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match="is not a memory size"):
        parse_size(text)


def test_parse_memory_range() -> None:
    with pytest.raises(InvalidInput, match="out of range"):
        parse_memory("1M")
    assert parse_memory("64M") == 64 << 20


@pytest.mark.parametrize("name", ["Base", "-x", "a_b", "x" * 64, "a.b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidInput):
        check_name(name)


def test_runs_of() -> None:
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)
    runs = runs_of(mask)
    assert runs.starts.tolist() == [1, 4, 7]
    assert runs.counts.tolist() == [2, 1, 3]
    assert runs.pages == 6
    assert runs_of(np.zeros(5, dtype=bool)).pages == 0
    assert runs_of(np.ones(5, dtype=bool)).counts.tolist() == [5]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio tool not installed")
def test_cpio_archive_reads_back(tmp_path: Path) -> None:
    archive = cpio.write_newc(
        [cpio.directory("bin"), cpio.file("bin/hello", b"hi there\n", executable=True), cpio.char_device("console", 5, 1)]
    )
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, check=True).stdout.decode()
    assert "bin/hello" in listing and "console" in listing
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "bin/hello"], input=archive, cwd=tmp_path,
                   capture_output=True, check=True)
    assert (tmp_path / "bin" / "hello").read_bytes() == b"hi there\n"


def test_transfer_batches_split_big_runs() -> None:
    from vmstream.capture.guestmem import IOV_MAX, MAX_CALL_BYTES, PAGE, _batches

    limit = MAX_CALL_BYTES // PAGE
    runs = runs_of(np.ones(3 * limit + 5, dtype=bool))
    batches = list(_batches(runs))
    assert [sum(c for _, c in b) for b in batches] == [limit, limit, limit, 5]
    assert batches[1][0] == (limit, limit)
    many = runs_of(np.tile(np.array([1, 0], dtype=bool), IOV_MAX + 10))
    sizes = [len(b) for b in _batches(many)]
    assert sizes == [IOV_MAX, 10]


def test_old_state_db_gets_new_columns(tmp_path: Path) -> None:
    """A state.db written before a column existed still opens, with the column added."""
    import sqlite3

    from sqlalchemy import inspect

    from vmstream.host.db import VmRecord, open_db

    db = tmp_path / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE vms (name VARCHAR PRIMARY KEY, vm_id VARCHAR, state VARCHAR)")
        conn.execute("INSERT INTO vms VALUES ('old', 'abc', 'exited')")
    session = open_db(db)
    with session() as s:
        rec = s.get(VmRecord, "old")
        assert rec is not None and rec.state == "exited" and rec.vmgenid == ""
        cols = {c["name"] for c in inspect(s.get_bind()).get_columns("vms")}
    assert {"vmgenid", "phases", "hooks", "identity_applied_s"} <= cols


def test_identity_command_lines() -> None:
    """What the in-guest agents parse: one 'key value' per line, hooks deferred only when asked."""
    import base64

    from vmstream.guest.identity import CloneIdentity

    def lines(ident: CloneIdentity) -> list[str]:
        verb, payload = ident.command(now=12.5).split(" ", 1)
        assert verb == "identity"
        return base64.b64decode(payload).decode().splitlines()

    plain = lines(CloneIdentity("h1", "52:54:00:00:00:01", {"A": "x y"}))
    seeds = [line for line in plain if line.startswith("seed ")]
    plain = [line for line in plain if not line.startswith("seed ")]
    assert plain[:3] == ["time 12.500000000", "hostname h1", "mac 52:54:00:00:00:01"]
    assert plain[3] == "param A " + base64.b64encode(b"x y").decode()
    # 32 fresh bytes for the guest kernel's RNG in every command, never the same twice
    assert len(seeds) == 1 and len(base64.b64decode(seeds[0].split()[1])) == 32
    assert seeds != [line for line in lines(CloneIdentity("h1", "52:54:00:00:00:01")) if line.startswith("seed ")]
    assert "hooks deferred" not in plain
    assert lines(CloneIdentity("h1", "52:54:00:00:00:01", defer_hooks=True))[-1] == "hooks deferred"
    # a pooled QEMU's run-through: the same lines under a verb older agents refuse
    # (they would run the clone hooks for an 'identity')
    verb, payload = CloneIdentity("h1", "52:54:00:00:00:01", ip="10.0.0.5/24").command(now=1.0, verb="prepare").split(" ", 1)
    assert verb == "prepare"
    assert [line for line in base64.b64decode(payload).decode().splitlines() if not line.startswith("seed ")] == [
        "time 1.000000000", "hostname h1", "ip 10.0.0.5/24", "mac 52:54:00:00:00:01"]


def test_guest_announce_off_and_kept_for_older_machines(tmp_path: Path) -> None:
    """New VMs' NICs do not ask the guest to announce; a machine or image described
    before that (no field) keeps it on, or its device state would not load."""
    from vmstream.host.machines import machine_from_json, machine_to_json
    from vmstream.image.manifest import GuestConfig
    from vmstream.qemu import MachineSpec

    spec = MachineSpec(vm_id="v", hostname="h", memory_bytes=256 << 20, cpus=1, kernel=tmp_path / "k",
                       initrd=tmp_path / "i", accel="tcg", http_port=1, mac="52:54:00:00:00:01", vmgenid="x")
    nic = next(a for a in spec.command(tmp_path) if a.startswith("virtio-net-pci"))
    assert "guest_announce=off" in nic
    assert machine_from_json(machine_to_json(spec)).guest_announce is False
    old = json.loads(machine_to_json(spec))
    del old["guest_announce"]
    assert machine_from_json(json.dumps(old)).guest_announce is True
    old_image = GuestConfig(memory_bytes=1, cpus=1, kernel="k", initrd="i", accel="tcg", hostname="h",
                            mac="m", vmgenid="g", qemu_version="7.2")
    assert old_image.guest_announce is True


def test_new_machines_have_a_balloon_and_older_ones_keep_none(tmp_path: Path) -> None:
    """New VMs get a virtio balloon with free page reporting; a machine or image described
    before balloons (no field) has none, or its device state would not load."""
    from vmstream.host.machines import machine_from_json, machine_to_json
    from vmstream.image.manifest import GuestConfig
    from vmstream.qemu import MachineSpec

    spec = MachineSpec(vm_id="v", hostname="h", memory_bytes=256 << 20, cpus=1, kernel=tmp_path / "k",
                       initrd=tmp_path / "i", accel="tcg", http_port=1, mac="52:54:00:00:00:01", vmgenid="x")
    (balloon,) = [a for a in spec.command(tmp_path) if a.startswith("virtio-balloon-pci")]
    assert "free-page-reporting=on" in balloon and "deflate-on-oom=on" in balloon
    assert machine_from_json(machine_to_json(spec)).balloon is True
    old = json.loads(machine_to_json(spec))
    del old["balloon"]
    without = machine_from_json(json.dumps(old))
    assert without.balloon is False and not any(a.startswith("virtio-balloon") for a in without.command(tmp_path))
    old_image = GuestConfig(memory_bytes=1, cpus=1, kernel="k", initrd="i", accel="tcg", hostname="h",
                            mac="m", vmgenid="g", qemu_version="7.2")
    assert old_image.balloon is False


def test_tcg_guest_ram_is_off_the_dirty_sync_grid(tmp_path: Path) -> None:
    """Under TCG a new VM's RAM is 8 KiB more than asked, so QEMU 7.2 syncs its dirty
    bitmap page by page (its 256 KiB-word fast path loses writes; see TCG_RAM_PAD).
    KVM VMs, and machines already off the grid (images), keep their size."""
    from vmstream.qemu import MachineSpec, guest_ram_bytes

    assert guest_ram_bytes(256 << 20, "tcg") == (256 << 20) + 8192
    assert guest_ram_bytes((256 << 20) + 8192, "tcg") == (256 << 20) + 8192
    assert guest_ram_bytes(1 << 30, "kvm") == 1 << 30

    def args(memory_bytes: int) -> list[str]:
        spec = MachineSpec(vm_id="v", hostname="h", memory_bytes=memory_bytes, cpus=1, kernel=tmp_path / "k",
                           initrd=tmp_path / "i", accel="tcg", http_port=1, mac="52:54:00:00:00:01", vmgenid="x")
        return spec.command(tmp_path)

    new = args(guest_ram_bytes(256 << 20, "tcg"))
    assert new[new.index("-m") + 1] == "262152K"
    assert "memory-backend-ram,id=mem,size=262152K" in new
    old = args(256 << 20)  # a machine described before (an image's): same command line as then
    assert old[old.index("-m") + 1] == "256M" and "memory-backend-ram,id=mem,size=256M" in old


def test_clones_get_the_kernel_header_only(tmp_path: Path) -> None:
    """A VM resuming an image's memory gets the bzImage cut after its setup sectors (QEMU
    would hold all of it in private memory), and cannot reboot into it; a booted VM, or
    a migration target that gets its memory over the stream, keeps the whole kernel."""
    from vmstream.qemu import MachineSpec
    from vmstream.qemu.machine import header_only_kernel

    kernel = bytearray(8 * 4096)
    kernel[0x1F1] = 3  # setup sectors after the boot sector
    kernel[0x202:0x206] = b"HdrS"
    kernel[5 * 512:] = b"\x90" * (len(kernel) - 5 * 512)
    (tmp_path / "vmlinuz").write_bytes(bytes(kernel))
    cut = header_only_kernel(tmp_path / "vmlinuz")
    assert cut == tmp_path / "vmlinuz.setup"
    assert cut.read_bytes() == bytes(kernel[: 5 * 512])  # 4 setup sectors + 512 bytes of payload
    (tmp_path / "other").write_bytes(b"\x7fELF" + bytes(4096))
    assert header_only_kernel(tmp_path / "other") is None  # not a bzImage: used whole

    def args(incoming: bool, memory_file: Path | None) -> list[str]:
        spec = MachineSpec(vm_id="v", hostname="h", memory_bytes=256 << 20, cpus=1, kernel=tmp_path / "vmlinuz",
                           initrd=tmp_path / "i", accel="tcg", http_port=1, mac="52:54:00:00:00:01", vmgenid="x",
                           incoming=incoming, memory_file=memory_file)
        return spec.command(tmp_path)

    clone = args(True, tmp_path / "mem")
    assert clone[clone.index("-kernel") + 1] == str(cut) and "-no-reboot" in clone
    for other in (args(False, None), args(True, None)):
        assert other[other.index("-kernel") + 1] == str(tmp_path / "vmlinuz") and "-no-reboot" not in other


def test_docs_configuration_lists_every_setting() -> None:
    """docs/configuration.md carries the table `python -m vmstream.settings` prints."""
    from pathlib import Path

    from vmstream.settings import render_markdown

    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert render_markdown() in doc, "docs/configuration.md is stale: regenerate its table with 'python -m vmstream.settings'"


def test_a_bad_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmstream.errors import InvalidInput
    from vmstream.settings import load_settings

    monkeypatch.setenv("VMSTREAM_CLONE_POOL", "many")
    with pytest.raises(InvalidInput, match="VMSTREAM_CLONE_POOL"):
        load_settings()
    monkeypatch.setenv("VMSTREAM_CLONE_POOL", "0")
    monkeypatch.setenv("VMSTREAM_BATCH_DEFER_HOOKS", "0")
    s = load_settings()
    assert s.clone_pool == 0 and s.batch_defer_hooks is False


def test_the_agent_installer_carries_the_native_agent_and_the_shell_fallback() -> None:
    import base64
    import re

    from vmstream.guest.installer import NATIVE_AGENT, SHELL_AGENT, agent_installer, native_agent

    script = agent_installer()
    b64 = re.search(r"<<'VMSTREAM_NATIVE_EOF'\n(.*?)\nVMSTREAM_NATIVE_EOF", script, re.S)
    assert b64 is not None and base64.b64decode(b64.group(1)) == native_agent()
    assert native_agent()[:4] == b"\x7fELF"
    assert f"\nExecStart={NATIVE_AGENT}\n" in script  # it runs the hooks itself: no shell agent needed
    assert f"ExecStart=/bin/sh {SHELL_AGENT}" in script  # the unit where the native agent cannot run
    portable = agent_installer(native=False)
    assert "VMSTREAM_NATIVE_EOF" not in portable and len(portable) < 50_000
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0


def test_serving_address_reads_the_agents_view_of_a_vm() -> None:
    slirp = {"name": "web-1", "endpoint": "http://127.0.0.1:41234/", "ports": {"8080": 41300}}
    assert serving_address(slirp, 80) == ("127.0.0.1", 41234)
    assert serving_address(slirp, 8080) == ("127.0.0.1", 41300)
    assert serving_address({"name": "web-2", "endpoint": "http://10.0.0.7/", "ports": {}}, 8080) == ("10.0.0.7", 8080)
    with pytest.raises(InvalidInput, match="web-1 on peer b does not publish guest port 9000"):
        serving_address(slirp, 9000, " on peer b")
