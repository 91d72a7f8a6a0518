"""How a disk guest boots (its bootloader, vmstream's kernel, a given kernel) and its
cloud-init seed: what the agent records, what QEMU is asked for, and bad input refused."""

from __future__ import annotations

from pathlib import Path

import pycdlib
import pytest

from tests.host.conftest import Agent
from vmstream.guest.cloudinit import meta_data


def disk(tmp_path: Path, bootable: bool) -> str:
    """A raw disk image; bootable: it starts with an MBR (a partition table), as a cloud image does."""
    path = tmp_path / ("cloud.raw" if bootable else "rootfs.raw")
    with path.open("wb") as f:
        f.truncate(4 << 20)
        if bootable:
            f.seek(510)
            f.write(b"\x55\xaa")
    return str(path)


def command(agent: Agent, name: str) -> list[str]:
    rec = agent.manager.registry.get(name)
    return agent.starter.spec(rec).command(Path(rec.rundir))


@pytest.mark.parametrize(("body", "says"), [
    ({"kernel": "/boot/vmlinuz"}, "are for disk guests"),
    ({"boot": "firmware"}, "are for disk guests"),
    ({"boot": "bios"}, "boot"),
    ({"user_data": "#cloud-config\n"}, "the demo guest has none"),
])
def test_bad_boot_sources_are_refused(agent: Agent, body: dict[str, object], says: str) -> None:
    err = agent.error("POST", "/v1/vms", 400, json={"name": "vm", **body})
    assert err["error"] == "InvalidInput" and says in err["message"], err
    assert agent.names() == set()


@pytest.mark.parametrize(("body", "says"), [
    ({"initrd": "/boot/initrd.img"}, "go with --kernel"),
    ({"append": "root=/dev/vda"}, "go with --kernel"),
    ({"kernel": "/nonexistent/vmlinuz"}, "kernel /nonexistent/vmlinuz not found"),
    ({"boot": "firmware", "kernel": "/nonexistent/vmlinuz"}, "leave out --kernel"),
    ({"user_data": "hello"}, "must start with '#cloud-config'"),
    ({"user_data": "#cloud-config\nruncmd: [unclosed\n"}, "not valid YAML"),
    ({"user_data": "#cloud-config\n- a list\n"}, "must be a YAML mapping"),
])
def test_bad_disk_boot_sources_are_refused(agent: Agent, tmp_path: Path, body: dict[str, object], says: str) -> None:
    err = agent.error("POST", "/v1/vms", 400, json={"name": "vm", "disk": disk(tmp_path, True), **body})
    assert err["error"] == "InvalidInput" and says in err["message"], err
    assert agent.names() == set()
    assert not list((agent.manager.data_dir / "run").glob("*")), "nothing left of the refused boot"


def test_a_disk_with_a_partition_table_boots_through_its_own_bootloader(agent: Agent, tmp_path: Path) -> None:
    agent.boot("cloud", disk=disk(tmp_path, True))
    cmd = command(agent, "cloud")
    assert "-kernel" not in cmd and "-append" not in cmd, "the firmware boots the disk"
    assert any(a.startswith("virtio-blk-pci,drive=disk0,bootindex=0") for a in cmd)
    agent.boot("bare", disk=disk(tmp_path, False))
    cmd = command(agent, "bare")
    assert "-kernel" in cmd and "vmstream.root=/dev/vda" in cmd[cmd.index("-append") + 1], "a bare file system: vmstream's kernel"
    agent.boot("forced", disk=disk(tmp_path, True), boot="vmstream")
    assert "-kernel" in command(agent, "forced")


def test_a_given_kernel_is_kept_and_booted_with_its_command_line(agent: Agent, tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"a kernel")
    initrd.write_bytes(b"an initrd")
    agent.boot("k", disk=disk(tmp_path, True), kernel=str(kernel), initrd=str(initrd))
    cmd = command(agent, "k")
    assert agent.call("GET", "/v1/vms/k")["boot"] == f"kernel {cmd[cmd.index('-kernel') + 1]}"
    kept = Path(cmd[cmd.index("-kernel") + 1])
    assert kept != kernel and kept.read_bytes() == b"a kernel" and kept.is_relative_to(agent.manager.data_dir)
    assert Path(cmd[cmd.index("-initrd") + 1]).read_bytes() == b"an initrd"
    assert cmd[cmd.index("-append") + 1] == "root=/dev/vda1 ro console=ttyS0", "default: partition 1 of a partitioned disk"
    kernel.write_bytes(b"changed after the boot")
    assert kept.read_bytes() == b"a kernel", "the VM (and its clones) keep the kernel it booted"
    agent.boot("k2", disk=disk(tmp_path, False), kernel=str(kernel), append="root=/dev/vda quiet")
    cmd = command(agent, "k2")
    assert cmd[cmd.index("-append") + 1] == "root=/dev/vda quiet" and "-initrd" not in cmd


def test_user_data_becomes_a_seed_the_image_keeps_for_its_clones(agent: Agent, tmp_path: Path) -> None:
    user_data = "#cloud-config\nruncmd: [[touch, /ran]]\n"
    vm = agent.boot("web", disk=disk(tmp_path, True), user_data=user_data)
    rec = agent.manager.registry.get("web")
    seed = Path(rec.seed or "")
    assert seed.is_file() and str(seed) in " ".join(command(agent, "web"))
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        assert iso.pvd.volume_identifier.rstrip() == b"cidata", "cloud-init's NoCloud finds the seed by this label"
        for name, want in (("user-data", user_data.encode()), ("meta-data", meta_data(rec.vm_id, "web"))):
            with iso.open_file_from_iso(rr_path=f"/{name}") as f:
                assert f.read() == want
    finally:
        iso.close()
    assert vm["boot"] == "firmware" and vm["cloud_init_seed"], "show tells how it booted and that it has a seed"
    agent.image("web", "web-live")
    image = agent.manager.images.get("web-live")
    assert image.guest.seed and image.guest.kernel == "", "the image records a firmware boot with a seed"
    boot = agent.starter.image_boot(image)
    kept = Path(boot["seed"])
    assert kept.parent == agent.manager.images.image_dir(image) and kept.read_bytes() == seed.read_bytes()
    assert boot["kernel"] == "" and boot["append"] is None
