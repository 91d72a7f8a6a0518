"""A real Linux guest: a Debian disk image, built with debootstrap, as a cloud image is made.

The disk has an MBR partition table, its root file system on partition 1, and
GRUB in its boot sectors with Debian's cloud kernel, so it boots like any cloud
image: through its own bootloader (`vmstream boot --disk debian --boot firmware`).
By default vmstream boots it faster with the demo guest's kernel and initramfs,
which mount the partition and hand over to systemd (`vmstream.root=/dev/vda`).
Besides a plain Debian it has cloud-init (NoCloud only: `vmstream boot
--user-data`) and openssh-server, and what vmstream needs of a real guest,
installed the way a user would:
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
import struct
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
# python3-cffi-backend: cloud-init's python3-cryptography needs it through a virtual
# package, which debootstrap's resolver does not follow.
PACKAGES = ("systemd-sysv", "udev", "qemu-guest-agent", "iproute2", "openssh-server", "cloud-init", "python3-cffi-backend",
            "linux-image-cloud-amd64", "grub-pc-bin")
IMAGE_BYTES = 2 << 30  # the root file system (sparse)
PART_START = 2048  # sectors: partition 1 starts at 1 MiB, leaving room for GRUB's core image
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer",
          "getty@tty1.service", "systemd-timesyncd.service")
RECIPE_VERSION = "2"  # bump when customize() changes

NETWORK = """[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

# cloud-init only from a seed: vmstream's (NoCloud) or OpenStack's config drive, both
# local disks, so no slow probing of metadata services. Two entries, not one: with a
# single one, ds-identify enables cloud-init without looking for it, and every boot
# without a seed would run it (a minute under TCG). The network is the image's own
# (systemd-networkd above).
CLOUD_CFG = """datasource_list: [ NoCloud, ConfigDrive ]
network: {config: disabled}
ssh_genkeytypes: [ed25519]
"""

# SSH host keys are made on a VM's first boot, not at build time (every VM of the image
# would share them), and only ed25519: under TCG an RSA key takes tens of seconds, and
# each clone's 20-ssh-host-keys hook makes anew the types the image has.
SSHD_CFG = "HostKey /etc/ssh/ssh_host_ed25519_key\n"
SSH_KEYGEN_UNIT = """[Unit]
Description=SSH host key of this VM (made on its first boot)
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=ssh.service
"""

GRUB_CFG = """set timeout=0
linux /vmlinuz root=LABEL=vmstream-root ro console=ttyS0 quiet
initrd /initrd.img
boot
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
    for part in (SUITE, *PACKAGES, *MASKED, RECIPE_VERSION, NETWORK, CLOUD_CFG, SSHD_CFG, SSH_KEYGEN_UNIT, GRUB_CFG, STATUSD_UNIT,
                 agent_installer()):
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
    """The disk image (raw, partitioned, bootable), built once (about two minutes with a near mirror)."""
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
        say(f"making the {IMAGE_BYTES >> 30} GiB disk: partition table, GRUB, ext4")
        core = _grub_core(root)
        _run(["mkfs.ext4", "-q", "-F", "-L", "vmstream-root", "-E", f"offset={PART_START * 512}", "-d", str(root), str(image),
              f"{IMAGE_BYTES >> 20}M"], "mkfs.ext4")
        _boot_sectors(image, (root / "usr/lib/grub/i386-pc/boot.img").read_bytes(), core)
        os.replace(image, out)
    for old in cache_dir.glob(f"debian-{SUITE}-*.raw"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


def _grub_core(root: Path) -> bytes:
    """GRUB's core image for BIOS boot from partition 1, made by the guest's own grub-mkimage."""
    _run(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-o", "/core.img", "-p", "(hd0,msdos1)/boot/grub",
          "biosdisk", "part_msdos", "ext2", "linux", "normal", "configfile"], "grub-mkimage")
    core = (root / "core.img").read_bytes()
    (root / "core.img").unlink()
    if len(core) > (PART_START - 1) * 512:
        raise GuestError(f"GRUB's core image is {len(core)} bytes: it does not fit before partition 1")
    return core


def _boot_sectors(image: Path, boot: bytes, core: bytes) -> None:
    """What grub-install writes on a real disk, written into the file: GRUB's boot
    sector (its code; the partition table after it) and its core image from sector 1,
    which the boot sector and the core's own first sector already point at (sector 1,
    then the rest from sector 2: grub-mkimage's defaults)."""
    mbr = bytearray(512)
    mbr[:440] = boot[:440]
    # one bootable Linux partition from PART_START to the end (CHS fields: "use LBA")
    mbr[446:462] = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", PART_START, IMAGE_BYTES // 512)
    mbr[510:512] = b"\x55\xaa"
    with image.open("r+b") as f:
        f.write(mbr)
        f.write(core)


def _customize(root: Path, work: Path) -> None:
    def write(rel: str, text: str | bytes, mode: int = 0o644) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        path.chmod(mode)

    write("etc/hostname", "vmstream-guest\n")
    write("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 vmstream-guest\n")
    write("etc/fstab", "LABEL=vmstream-root / ext4 rw,relatime 0 0\n")
    write("etc/cloud/cloud.cfg.d/90-vmstream.cfg", CLOUD_CFG)
    write("boot/grub/grub.cfg", GRUB_CFG)
    write("etc/ssh/sshd_config.d/60-vmstream.conf", SSHD_CFG)
    write("etc/systemd/system/vmstream-ssh-hostkey.service", SSH_KEYGEN_UNIT)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    write("etc/systemd/network/10-vmstream.network", NETWORK)
    statusd = compile_static("statusd", (resources.files("vmstream.guest") / "files" / "statusd.c").read_bytes(), work)
    write("usr/local/bin/vmstream-statusd", statusd, 0o755)
    write("etc/systemd/system/vmstream-statusd.service", STATUSD_UNIT)
    # the one command a user runs in a real guest to get the agent
    write("root/vmstream-agent-installer.sh", agent_installer(), 0o755)
    _run(["chroot", str(root), "/bin/sh", "/root/vmstream-agent-installer.sh"], "the agent installer")
    _run(["chroot", str(root), "systemctl", "enable", "systemd-networkd.service", "vmstream-statusd.service",
          "vmstream-ssh-hostkey.service"],
         "enabling the guest's services")
    _run(["chroot", str(root), "systemctl", "mask", *MASKED], "masking slow services")
    (root / "etc/machine-id").write_text("")  # each boot (and each booted VM) makes its own
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
