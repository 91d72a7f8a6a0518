"""Builds the demo guest from Debian packages: kernel, modules, busybox.

The result is cached in the data dir under a hash of every input, so it is
rebuilt only when the kernel, busybox or the guest's own files change.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vmstream.errors import GuestError
from vmstream.guest import cpio

# Drivers the guest needs, by module name; dependencies come from modules.dep.
MODULES = ("virtio_pci", "virtio_net", "virtio_console", "virtio_blk", "virtio_balloon", "crc32c_generic", "ext4",
           "isofs",  # isofs: a disk guest booted by this kernel reads its cloud-init seed (an ISO 9660 volume)
           "zram")  # zram: swap in the guest's own RAM, compressed (the agent's "swap MIB")
GUEST_FILES = ("init", "vmstream-agent.c", "vmstream-agent.sh", "memcheck.c", "memload.c", "statusd.c", "vmclock.c",
               "clone.d/50-record-params")
BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class GuestArtifacts:
    """A built guest: what QEMU needs to boot it."""

    kernel: Path
    initrd: Path
    key: str
    kernel_release: str


def find_kernel(kernel: Path | None = None) -> tuple[Path, str]:
    """The kernel to boot and its release; default: the newest in /boot."""
    if kernel is None:
        found = sorted(Path("/boot").glob("vmlinuz-*"))
        if not found:
            raise GuestError(
                "no guest kernel found in /boot: install one with "
                "'apt-get install linux-image-amd64' (make demo does this) or pass --kernel PATH"
            )
        kernel = found[-1]
    if not kernel.is_file():
        raise GuestError(f"guest kernel {kernel} does not exist: pass --kernel with a vmlinuz file")
    release = re.sub(r"^vmlinuz-", "", kernel.name)
    return kernel, release


def _module_order(moddir: Path) -> list[str]:
    """Module paths (relative to moddir) in load order, dependencies first."""
    dep_file = moddir / "modules.dep"
    if not dep_file.is_file():
        raise GuestError(
            f"{dep_file} is missing: the kernel's modules are not installed "
            "(install the linux-image package that matches the kernel)"
        )
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in MODULES:
        if name not in by_name:
            raise GuestError(f"kernel module {name} not found in {moddir}")
        visit(by_name[name])
    return order


def compile_static(name: str, source: bytes, workdir: Path, flags: tuple[str, ...] = ()) -> bytes:
    """A static binary for the guest, which has no libc of its own."""
    src = workdir / f"{name}.c"
    src.write_bytes(source)
    out = workdir / name
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise GuestError(f"no C compiler found to build the guest's {name}: apt-get install gcc libc6-dev")
    proc = subprocess.run(
        [cc, "-static", "-O2", *flags, "-o", str(out), str(src)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise GuestError(f"compiling {name} failed: {proc.stderr.strip()[-500:]}")
    return out.read_bytes()


def build_guest(cache_dir: Path, kernel: Path | None = None, force: bool = False) -> GuestArtifacts:
    """Build (or reuse) the demo guest in cache_dir/<key>/."""
    kernel, release = find_kernel(kernel)
    moddir = Path("/lib/modules") / release
    if not BUSYBOX.is_file():
        raise GuestError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    modules = _module_order(moddir)
    files = {name: (resources.files("vmstream.guest") / "files" / name).read_bytes() for name in GUEST_FILES}

    h = hashlib.sha256()
    for part in [kernel.read_bytes(), BUSYBOX.read_bytes(), *(moddir.joinpath(m).read_bytes() for m in modules)]:
        h.update(hashlib.sha256(part).digest())
    for name in GUEST_FILES:
        h.update(name.encode() + hashlib.sha256(files[name]).digest())
    key = h.hexdigest()[:16]
    out = cache_dir / key
    artifacts = GuestArtifacts(out / "vmlinuz", out / "initrd.img", key, release)
    if out.joinpath("guest.json").is_file() and not force:
        return artifacts

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        work = Path(tmp)
        dirs = ("bin", "dev", "etc", "etc/vmstream", "etc/vmstream/clone.d", "lib", "lib/modules", "proc", "sys", "run", "tmp")
        entries = [cpio.directory(d) for d in dirs]
        entries += [
            cpio.char_device("dev/console", 5, 1),
            cpio.file("bin/busybox", BUSYBOX.read_bytes(), executable=True),
            cpio.file("init", files["init"], executable=True),
            cpio.file("bin/statusd", compile_static("statusd", files["statusd.c"], work), executable=True),
            cpio.file("bin/vmstream-agent", compile_static("vmstream-agent", files["vmstream-agent.c"], work), executable=True),
            cpio.file("bin/vmstream-agent.sh", files["vmstream-agent.sh"], executable=True),
            cpio.file("bin/vmclock", compile_static("vmclock", files["vmclock.c"], work), executable=True),
            cpio.file("etc/vmstream/clone.d/50-record-params", files["clone.d/50-record-params"], executable=True),
            cpio.file("bin/memcheck", compile_static("memcheck", files["memcheck.c"], work), executable=True),
            cpio.file("bin/memload", compile_static("memload", files["memload.c"], work), executable=True),
            cpio.file("etc/modules.order", "".join(Path(m).name + "\n" for m in modules).encode()),
        ]
        entries += [cpio.file("lib/modules/" + Path(m).name, moddir.joinpath(m).read_bytes()) for m in modules]
        stage = work / "out"
        stage.mkdir()
        (stage / "initrd.img").write_bytes(gzip.compress(cpio.write_newc(entries), compresslevel=6))
        shutil.copyfile(kernel, stage / "vmlinuz")
        meta = {"key": key, "kernel": str(kernel), "kernel_release": release, "modules": modules}
        (stage / "guest.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.rename(stage, out)  # the commit point: a half-built guest is never seen
    return artifacts
