"""The paper's workflow on a real image: boot an ordinary Debian disk through its own
bootloader with cloud-init user-data, freeze it into a live image, and clone it.

The app is a plain Python web server that cloud-init writes and starts: it knows
nothing of vmstream (no status page), so the VM is ready when it answers HTTP. The
vmstream agent is in the image through its installer; qemu-guest-agent (Debian's)
is how the tests look inside the guests.
"""

from __future__ import annotations

import base64
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hosts import Cli
from tests.integration.conftest import assert_clock_is_the_hosts
from tests.integration.test_real_guest import qga, read_file

APP_PORT = 8080
USER_DATA = f"""#cloud-config
write_files:
  - path: /srv/app/index.html
    content: "served by an app cloud-init set up\\n"
  - path: /etc/systemd/system/webapp.service
    content: |
      [Unit]
      Description=a web app that knows nothing of vmstream
      After=network.target
      [Service]
      ExecStart=/usr/bin/python3 -m http.server {APP_PORT} --directory /srv/app
      Restart=always
      [Install]
      WantedBy=multi-user.target
runcmd:
  - [systemctl, daemon-reload]
  - [systemctl, enable, --now, webapp.service]
  - [sh, -c, "echo configured-by-cloud-init > /etc/cloud-init-ran"]
"""


def app(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        return resp.read().decode()


def guest_exec(cli: Cli, vm: str, *argv: str) -> str:
    """A command's output in a disk guest, through qemu-guest-agent."""
    pid = qga(cli, vm, "guest-exec", path=argv[0], arg=list(argv[1:]), **{"capture-output": True})["pid"]
    for _ in range(200):
        st = qga(cli, vm, "guest-exec-status", pid=pid)
        if st["exited"]:
            assert st.get("exitcode") == 0, st
            return base64.b64decode(st.get("out-data", "")).decode()
        time.sleep(0.1)
    raise AssertionError(f"{argv} did not finish in the guest {vm}")


@pytest.fixture(scope="module")
def web(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The Debian image booted by BIOS and GRUB, configured by cloud-init on its first boot."""
    user_data = tmp_path_factory.mktemp("cloud-init") / "user-data"
    user_data.write_text(USER_DATA)
    vm = cli.json("boot", "web", "--disk", "debian", "--boot", "firmware", "--memory", "512M", "--user-data", str(user_data),
                  "--ready", f"http:{APP_PORT}/", "--publish", str(APP_PORT), "--timeout", "900", timeout=1500)
    try:
        yield vm
    finally:
        cli.run("destroy", "web")


def test_cloud_init_configures_the_booted_image(cli: Cli, web: dict[str, Any]) -> None:
    assert web["ready"] == f"http:{APP_PORT}/"
    assert "cloud-init" in app(web["ports"][str(APP_PORT)])
    assert read_file(cli, "web", "/etc/cloud-init-ran").strip() == "configured-by-cloud-init"
    assert guest_exec(cli, "web", "/bin/hostname").strip() == "web", "cloud-init took the VM's name from the seed"
    cmdline = read_file(cli, "web", "/proc/cmdline")
    assert "vmstream.hostname" not in cmdline and "root=LABEL=vmstream-root" in cmdline, "GRUB booted the image's own kernel"


def test_clones_of_the_configured_vm_serve_with_their_own_identity(cli: Cli, web: dict[str, Any]) -> None:
    cli.json("live-image", "create", "web", "web-live")
    try:
        res = cli.json("live-image", "start", "web-live", "--count", "5", timeout=600)
        clones = res["vms"]
        assert len(clones) == 5
        ports = [c["ports"][str(APP_PORT)] for c in clones]
        assert len(set(ports)) == 5 and web["ports"][str(APP_PORT)] not in ports, "each clone has its own host port"
        for c, port in zip(clones, ports, strict=True):
            assert c["ready"] == f"http:{APP_PORT}/"
            assert "cloud-init" in app(port), f"{c['name']} serves the app cloud-init set up"
        names = [guest_exec(cli, c["name"], "/bin/hostname").strip() for c in clones]
        assert names == [c["name"] for c in clones]
        macs = []
        for c in clones:
            nics = qga(cli, c["name"], "guest-network-get-interfaces")
            macs += [n["hardware-address"] for n in nics if n["name"] != "lo"]
        assert sorted(macs) == sorted(c["mac"] for c in clones), "each guest has the MAC vmstream gave its clone"
        assert len(set(macs)) == 5 and web["mac"] not in macs
        randoms = [guest_exec(cli, c["name"], "/bin/cat", "/proc/sys/kernel/random/uuid") for c in clones]
        assert len(set(randoms)) == 5, "the clones' random number generators were reseeded apart"
        for c in clones:
            assert_clock_is_the_hosts(cli, c["name"], qga=True)  # within 50 ms, as qemu-guest-agent reads it
    finally:
        for c in cli.json("list"):
            if c.get("parent_image") == "web-live":
                cli.run("destroy", c["name"])
        cli.run("live-image", "delete", "web-live")


def test_a_given_kernel_and_command_line_boot_the_disk(cli: Cli) -> None:
    """--kernel/--initrd/--append: here the demo guest's kernel and initramfs, which
    mount the disk's root file system (partition 1) and hand over to its systemd."""
    guest = cli.json("info")["guest"]
    marker = "vmstream.test=given-cmdline"
    vm = cli.json("boot", "kern", "--disk", "debian", "--memory", "512M", "--kernel", guest["kernel"], "--initrd", guest["initrd"],
                  "--append", f"console=ttyS0 vmstream.root=/dev/vda {marker}", "--ready", "agent", "--timeout", "900", timeout=1500)
    try:
        assert vm["ready"] == "agent"
        assert marker in read_file(cli, "kern", "/proc/cmdline"), "the guest runs with the given command line"
    finally:
        cli.run("destroy", "kern")
