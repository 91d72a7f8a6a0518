"""A real Linux guest: a Debian root file system on a disk image, built with debootstrap.

It boots the same kernel and initramfs as the demo guest, which mounts
/dev/vda and hands over to systemd (`vmstream.root=/dev/vda`). The image has
what vmstream needs of a real guest, installed the way a user would:
  - the portable in-guest agent, by running `vmstream guest agent-installer`'s
    script inside it (it enables the systemd unit);
  - qemu-guest-agent from Debian (QEMU's channel org.qemu.guest_agent.0);
  - a status web server on port 80 (the demo guest's statusd) as a systemd
    unit, so readiness is checked the same way;
  - systemd-networkd with slirp's address (each VM has its own slirp).
The image is cached under the data dir by a key of its inputs; VMs never
write it: each boots on its own qcow2 overlay.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from vmstream.errors import GuestError
from vmstream.guest.build import compile_static
from vmstream.guest.installer import agent_installer

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"  # the debian_mirror setting's default
PACKAGES = ("systemd-sysv", "udev", "qemu-guest-agent", "iproute2")
IMAGE_SIZE = "1G"
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer",
          "getty@tty1.service", "systemd-timesyncd.service")
RECIPE_VERSION = "1"  # bump when customize() changes

NETWORK = """[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

STATUSD_UNIT = """[Unit]
Description=vmstream status web server (port 80)
After=network.target

[Service]
ExecStart=/usr/local/bin/vmstream-statusd
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def _key() -> str:
    h = hashlib.sha256()
    for part in (SUITE, *PACKAGES, *MASKED, RECIPE_VERSION, NETWORK, STATUSD_UNIT, agent_installer()):
        h.update(part.encode() + b"\0")
    h.update((resources.files("vmstream.guest") / "files" / "statusd.c").read_bytes())
    return h.hexdigest()[:16]


def _run(args: list[str], what: str, timeout: float = 1800) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise GuestError(f"{what} failed ({' '.join(args[:3])} ...): {tail}")


def rootfs_path(cache_dir: Path) -> Path:
    return cache_dir / f"debian-{SUITE}-{_key()}.raw"


def build_rootfs(cache_dir: Path, force: bool = False, say: Callable[[str], None] = lambda _: None, mirror: str = MIRROR) -> Path:
    """The disk image (raw ext4), built once (about a minute with a near mirror)."""
    out = rootfs_path(cache_dir)
    if out.exists() and not force:
        return out
    if os.geteuid() != 0:
        raise GuestError("building the Debian guest image needs root (debootstrap and chroot)")
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs")):
        if shutil.which(tool) is None:
            raise GuestError(f"{tool} not found: apt-get install {package} (make demo / make test install it)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".rootfs-") as tmp:
        root = Path(tmp) / "root"
        say(f"debootstrap {SUITE} from {mirror} (packages: {', '.join(PACKAGES)})")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror],
             "debootstrap (is the Debian mirror reachable? set VMSTREAM_DEBIAN_MIRROR)")
        say("installing the vmstream agent, statusd and the network set-up")
        _customize(root, Path(tmp))
        image = Path(tmp) / "rootfs.raw"
        say(f"making the {IMAGE_SIZE} ext4 image")
        _run(["mkfs.ext4", "-q", "-F", "-L", "vmstream-root", "-d", str(root), str(image), IMAGE_SIZE], "mkfs.ext4")
        os.replace(image, out)
    for old in cache_dir.glob(f"debian-{SUITE}-*.raw"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


def _customize(root: Path, work: Path) -> None:
    def write(rel: str, text: str | bytes, mode: int = 0o644) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        path.chmod(mode)

    write("etc/hostname", "vmstream-guest\n")
    write("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 vmstream-guest\n")
    write("etc/fstab", "/dev/vda / ext4 rw,relatime 0 0\n")
    write("etc/systemd/network/10-vmstream.network", NETWORK)
    statusd = compile_static("statusd", (resources.files("vmstream.guest") / "files" / "statusd.c").read_bytes(), work)
    write("usr/local/bin/vmstream-statusd", statusd, 0o755)
    write("etc/systemd/system/vmstream-statusd.service", STATUSD_UNIT)
    # the one command a user runs in a real guest to get the agent
    write("root/vmstream-agent-installer.sh", agent_installer(), 0o755)
    _run(["chroot", str(root), "/bin/sh", "/root/vmstream-agent-installer.sh"], "the agent installer")
    _run(["chroot", str(root), "systemctl", "enable", "systemd-networkd.service", "vmstream-statusd.service"],
         "enabling the guest's services")
    _run(["chroot", str(root), "systemctl", "mask", *MASKED], "masking slow services")
    (root / "etc/machine-id").write_text("")  # each boot (and each booted VM) makes its own
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
