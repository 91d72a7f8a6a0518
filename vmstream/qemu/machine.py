"""QemuProcess: the single owner of one QEMU process and its files.

A VM's files live in its run dir: QMP socket, guest-agent socket, serial
log, QEMU's own log and a pid file. QEMU runs in its own session so it
outlives the host agent; a restarted agent adopts it again by pid, after
checking /proc/PID/cmdline still carries this VM's unique id (so a reused
pid is never mistaken for ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from vmstream.errors import QemuError
from vmstream.qemu.preload import clone_shim_library

QEMU_BINARY = "qemu-system-x86_64"


@cache
def qemu_version() -> str:
    """'7.2.22', or an error naming the package to install."""
    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        raise QemuError(f"{QEMU_BINARY} not found: apt-get install qemu-system-x86 (make demo does this)")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("version", 1)[1].split()[0]


# QEMU 7.2 under TCG loses guest writes during a live migration's pre-copy: its dirty
# bitmap sync has a fast path for RAM blocks whose length is a whole number of bitmap
# words (64 pages = 256 KiB) that clears the migration dirty bits without resetting the
# vCPUs' TLB write entries, so later stores through a cached entry mark nothing dirty
# and the page is never sent again (fixed upstream in QEMU 9.0, 03bfc2188f "physmem:
# Fix migration dirty bitmap coherency with TCG memory access"; not in Debian 12's
# 7.2). The guest resumes on the destination with stale pages (per-CPU data, stacks,
# timer queues) and its kernel oopses soon after the move. A RAM size off the 256 KiB
# grid makes QEMU take its per-page path, which resets the TLB entries it cleared.
# 8 KiB: QEMU rounds -m to 8 KiB. Measured on the test bed (bridged, client load,
# 256 MiB demo guest, alternated blocks of 25 moves): 12 oopses in 100 moves with
# 256 MiB, 0 in 100 with 256 MiB + 8 KiB; a move takes ~0.35 s longer (docs/migration.md).
TCG_DIRTY_SYNC_WORD = 64 * 4096
BALLOON_ID = "balloon0"  # the balloon's QOM path is /machine/peripheral/balloon0
POLICY_QMP = "policy.sock"  # a second QMP monitor: the agent's memory controller keeps it open
TCG_RAM_PAD = 8 << 10


def guest_ram_bytes(requested: int, accel: str) -> int:
    """The RAM size to give a new VM asked for `requested` bytes: under TCG a little
    more if `requested` lies on QEMU's 256 KiB dirty-sync grid (see TCG_RAM_PAD)."""
    if accel != "kvm" and requested % TCG_DIRTY_SYNC_WORD == 0:
        return requested + TCG_RAM_PAD
    return requested


def _qemu_size(size: int) -> str:
    """A size for -m / size=: whole MiB as before ('256M'), else KiB ('262152K')."""
    return f"{size >> 20}M" if size % (1 << 20) == 0 else f"{size >> 10}K"


@dataclass(frozen=True)
class TapNic:
    """A bridged NIC instead of slirp: QEMU attaches to an existing tap device.

    The guest gets a static address on the kernel command line
    (vmstream.ip/netmask/gw), so it keeps it when the VM migrates to another
    host on the same L2 segment. netns: the network namespace the tap lives
    in; QEMU is started inside it (nsenter), since a tap is found by name.
    """

    ifname: str
    ip: str
    netmask: str = "255.255.255.0"
    gateway: str | None = None
    netns: str | None = None

    def append(self) -> list[str]:
        args = [f"vmstream.ip={self.ip}", f"vmstream.netmask={self.netmask}"]
        return [*args, f"vmstream.gw={self.gateway}"] if self.gateway else args


@dataclass(frozen=True)
class MachineSpec:
    """Everything that decides a VM's QEMU command line.

    A clone must use its image's spec, changed only in name, port and
    memory file: the saved device state only loads into the same machine.
    """

    vm_id: str
    hostname: str
    memory_bytes: int  # QEMU's RAM size; a new VM's comes from guest_ram_bytes
    cpus: int
    kernel: Path | None  # None: the disk's own bootloader (BIOS firmware boot)
    initrd: Path | None
    accel: str
    http_port: int
    mac: str
    vmgenid: str  # VM Generation ID; a new one on a clone makes the guest reseed its RNG
    memory_file: Path | None = None  # a live image's memory, mapped MAP_PRIVATE
    incoming: bool = False  # wait for device state (a clone)
    extra_append: tuple[str, ...] = field(default_factory=tuple)
    tap: TapNic | None = None  # None: slirp with a host port forward (the single-host default)
    tb_mib: int = 64  # TCG translation cache; its used part is private memory of each VM
    disk: Path | None = None  # a disk guest's root file system: this VM's own qcow2 overlay
    start_paused: bool = False  # -S: stay paused once the incoming state is loaded (a pooled clone)
    # The NIC asks the guest to announce itself after a state load (virtio GUEST_ANNOUNCE).
    # Off: a clone would announce its image's MAC and address before taking its own
    # (on a bridge that pulls the source VM's traffic to the clone), and under TCG the
    # announce is ~5% of a clone's start. QEMU's own announce (RARP) still moves a migrated VM.
    # Part of the machine: a clone's NIC must match its image's.
    guest_announce: bool = False
    kernel_header_only: bool = True  # a VM resuming an image's memory gets only the kernel's setup header
    nothp: bool = True  # a VM on an image's memory file gets no transparent huge pages (vmstream/qemu/cloneshim.c)
    # A virtio balloon (free page reporting, deflate on OOM): how the host takes memory back
    # from a guest. Part of the machine: a clone has its image's; images made before it have none.
    balloon: bool = True
    forwards: tuple[tuple[int, int], ...] = ()  # slirp: more (host port, guest port) forwards on 127.0.0.1 besides 80
    append: str | None = None  # a given kernel's command line, used as it is; None: vmstream's own (its kernel)
    seed: Path | None = None  # a cloud-init NoCloud seed (ISO, label cidata), attached read-only after the disk
    # slirp: the guest may open connections out of the VM. Off (restrict=on): slirp's gateway
    # 10.0.2.2 is the host's loopback, where the agent's API, its sendfile server and the
    # other VMs' forwarded ports listen; forwards into the guest work either way.
    outbound: bool = False

    def command(self, rundir: Path, tap_fd: int | None = None) -> list[str]:
        """tap_fd: an open descriptor of the tap for QEMU to use instead of opening it by name
        (the agent keeps its own copy: see BridgedNet.open_tap)."""
        size = _qemu_size(self.memory_bytes)
        if self.memory_file is None:
            backend = f"memory-backend-ram,id=mem,size={size}"
        else:
            # share=off: the clone's writes stay private; unwritten pages are
            # shared with every other clone through the host page cache.
            backend = f"memory-backend-file,id=mem,size={size},mem-path={self.memory_file},share=off"
        accel = "kvm" if self.accel == "kvm" else f"tcg,tb-size={self.tb_mib}"
        kernel = self._kernel()
        if self.tap is None:
            netdev = "user,id=net0," + ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in ((self.http_port, 80), *self.forwards))
            if not self.outbound:
                netdev += ",restrict=on"
        else:
            netdev = (f"tap,id=net0,fd={tap_fd}" if tap_fd is not None
                      else f"tap,id=net0,ifname={self.tap.ifname},script=no,downscript=no")
        cmd = [
            shutil.which(QEMU_BINARY) or QEMU_BINARY,
            "-name", f"vmstream-{self.vm_id},debug-threads=on",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc,memory-backend=mem", "-accel", accel, "-cpu", "qemu64",
            "-smp", str(self.cpus), "-m", size,
            "-object", backend,
            *self._boot_args(kernel),
            "-serial", f"file:{rundir / 'serial.log'}",
            "-qmp", f"unix:{rundir / 'qmp.sock'},server=on,wait=off",
            "-qmp", f"unix:{rundir / POLICY_QMP},server=on,wait=off",  # the memory controller's own monitor, kept open
            "-netdev", netdev,
            "-device", f"virtio-net-pci,netdev=net0,mac={self.mac},romfile=,guest_announce={'on' if self.guest_announce else 'off'}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={rundir / 'agent.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=org.vmstream.agent",
            "-device", f"vmgenid,guid={self.vmgenid}",
        ]
        if self.balloon:
            # free-page-reporting: the guest hands back pages it freed, in blocks of 2 MiB or more, ~2 s later
            cmd += ["-device", f"virtio-balloon-pci,id={BALLOON_ID},deflate-on-oom=on,free-page-reporting=on"]
        if self.disk is not None:
            cmd += [
                "-drive", f"file={self.disk},if=none,id=disk0,format=qcow2,cache=writeback,discard=unmap",
                "-device", "virtio-blk-pci,drive=disk0" + (",bootindex=0" if self.kernel is None else ""),
                # qemu-guest-agent, used where the guest has it (disk guests)
                "-chardev", f"socket,id=qga,path={rundir / 'qga.sock'},server=on,wait=off",
                "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            ]
        if self.seed is not None:
            cmd += ["-drive", f"file={self.seed},if=none,id=seed0,format=raw,readonly=on", "-device", "virtio-blk-pci,drive=seed0"]
        if self.incoming:
            cmd += ["-incoming", "defer", "-global", "migration.send-configuration=off"]
        if kernel != self.kernel:
            cmd += ["-no-reboot"]  # it holds no kernel to boot again: a guest reboot ends the VM
        if self.start_paused:
            cmd += ["-S"]
        if self.tap is not None and self.tap.netns is not None:
            # nsenter execs QEMU in place: same pid, and /proc/PID/cmdline keeps the marker
            cmd = ["nsenter", f"--net=/run/netns/{self.tap.netns}", "--", *cmd]
        return cmd

    def _boot_args(self, kernel: Path | None) -> list[str]:
        """-kernel/-initrd/-append: vmstream's kernel with its command line, a given
        kernel with the user's, or nothing (the firmware boots the disk)."""
        if kernel is None:
            return []
        initrd = ["-initrd", str(self.initrd)] if self.initrd is not None else []
        if self.append is not None:
            return ["-kernel", str(kernel), *initrd, "-append", self.append]
        append = " ".join(
            ["console=ttyS0", "quiet", "panic=-1", f"vmstream.hostname={self.hostname}",
             # Under TCG the guest's code never runs speculatively on the host CPU as
             # written (QEMU translates it), so retpolines, RSB filling and barriers
             # protect nothing and only cost: a clone's start is ~18% shorter without.
             # A KVM guest keeps its mitigations.
             *([] if self.accel == "kvm" else ["mitigations=off"]),
             *(["vmstream.root=/dev/vda", f"systemd.hostname={self.hostname}"] if self.disk else []), *self.extra_append,
             *(self.tap.append() if self.tap else [])]
        )
        return ["-kernel", str(kernel), *initrd, "-append", append]

    def _kernel(self) -> Path | None:
        """The -kernel file: for a VM that resumes an image's memory, only the kernel's
        setup header (see header_only_kernel)."""
        if self.kernel is None:
            return None
        if self.incoming and self.memory_file is not None and self.kernel_header_only:
            return header_only_kernel(self.kernel) or self.kernel
        return self.kernel


def header_only_kernel(kernel: Path) -> Path | None:
    """The bzImage cut after its setup sectors, beside it (KERNEL.setup); None if it
    cannot be made there.

    QEMU reads all of -kernel into its own heap for fw_cfg (7.8 MiB of private memory
    per QEMU for the demo guest's kernel), even for a VM that resumes a snapshot and
    never boots from it. It checks only the setup header, and the machine (option ROMs,
    fw_cfg files) is the same with the cut file, so the state loads as before. Such a
    VM cannot reboot into its kernel: it runs with -no-reboot."""
    out = kernel.with_name(kernel.name + ".setup")
    if out.exists():
        return out
    try:
        with kernel.open("rb") as f:
            head = f.read(0x210)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":  # not a bzImage: leave it whole
                return None
            keep = (head[0x1F1] or 4) + 1  # setup sectors, and the boot sector
            f.seek(0)
            cut = f.read(keep * 512 + 512)  # and a little payload (QEMU wants some)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_bytes(cut)
        tmp.replace(out)
        return out
    except OSError:
        return None


_TB_FLUSHES = re.compile(r"^TB flush count\s+(\d+)", re.MULTILINE)


async def tb_flushes(qmp: QMPClient) -> int | None:
    """How often TCG has dropped all its translated code in this QEMU (x-query-jit):
    once per state load, and again each time the translation cache filled up.
    None where QEMU does not say (KVM, or a QEMU without the command)."""
    try:
        jit = await qmp.execute("x-query-jit")
    except QMPError:
        return None
    text = jit.get("human-readable-text", "") if isinstance(jit, dict) else ""
    m = _TB_FLUSHES.search(str(text))
    return int(m.group(1)) if m else None


def pid_alive(pid: int, marker: str) -> bool:
    """True if pid is running and is the QEMU whose cmdline carries marker."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and marker.encode() in cmdline


class QemuProcess:
    """Owns one QEMU process and its run dir; removes both when stopped."""

    def __init__(self, vm_id: str, rundir: Path, pid: int | None = None) -> None:
        self.vm_id = vm_id
        self.rundir = rundir
        self.pid = pid
        self._popen: subprocess.Popen[bytes] | None = None
        self.tap_fd: int | None = None  # given to QEMU at start (fd=) when set; owned by whoever set it

    @property
    def marker(self) -> str:
        return f"vmstream-{self.vm_id},"

    @property
    def qmp_path(self) -> Path:
        return self.rundir / "qmp.sock"

    @property
    def policy_qmp_path(self) -> Path:
        """The memory controller's own QMP monitor (QEMU takes one client per monitor)."""
        return self.rundir / POLICY_QMP

    @property
    def agent_path(self) -> Path:
        return self.rundir / "agent.sock"

    @property
    def qga_path(self) -> Path:
        """qemu-guest-agent's socket (disk guests: MachineSpec.command adds the port)."""
        return self.rundir / "qga.sock"

    @property
    def log_path(self) -> Path:
        return self.rundir / "qemu.log"

    @property
    def serial_path(self) -> Path:
        return self.rundir / "serial.log"

    def alive(self) -> bool:
        if self._popen is not None:
            # Our own child: its pid cannot be reused before we reap it, and
            # right after fork its cmdline is still ours, so no marker check.
            return self._popen.poll() is None
        return self.pid is not None and pid_alive(self.pid, self.marker)

    def start(self, spec: MachineSpec) -> None:
        """Launch QEMU in its own session, its output going to qemu.log.

        A VM on an image's memory file runs with the clone shim (cloneshim.c), built
        once in lib/ beside the run root (<data dir>/lib for the agent's VMs)."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        env = None
        if spec.memory_file is not None and (shim := clone_shim_library(self.rundir.parent.parent / "lib")) is not None:
            env = {**os.environ, "LD_PRELOAD": str(shim), "VMSTREAM_NOTHP": "1" if spec.nothp else "0"}
        with open(self.log_path, "ab") as log:
            fd = self.tap_fd if self.tap_fd is not None and spec.tap is not None else None
            self._popen = subprocess.Popen(
                spec.command(self.rundir, fd),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, env=env, pass_fds=(fd,) if fd is not None else (),
            )
        self.pid = self._popen.pid

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        keep = [ln for ln in text.splitlines() if "Expected vmdescription" not in ln]
        return "\n".join(keep[-lines:])

    def serial_tail(self, lines: int = 12) -> str:
        """The guest console's last lines (a panic, a reset)."""
        try:
            return "\n".join(self.serial_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _died(self, doing: str) -> QemuError:
        return QemuError(f"QEMU for VM {self.vm_id} exited while {doing}: {self.log_tail() or 'no output'}")

    async def wait_for_socket(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.alive():
                raise self._died(f"starting (waiting for {path.name})")
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU for VM {self.vm_id} did not create {path.name} within {timeout:.0f}s")
            await asyncio.sleep(0.002)

    @contextlib.asynccontextmanager
    async def qmp(self) -> AsyncIterator[QMPClient]:
        """A QMP session for the length of the block (QEMU takes one client at a time)."""
        await self.wait_for_socket(self.qmp_path)
        deadline = time.monotonic() + 10.0
        while True:
            client = QMPClient(f"vmstream-{self.vm_id}")
            try:
                await client.connect(str(self.qmp_path))
                break
            except QMPError as exc:
                # QEMU binds the socket a moment before it listens: refused means "not yet".
                # Right after another client left, or while QEMU loads an incoming
                # migration, the handshake can fail (seen once in CI, on an incoming QEMU: a first
                # message that was not the greeting): that too is worth another try.
                transient = isinstance(getattr(exc, "exc", None), (ConnectionRefusedError, NegotiationError, GreetingError, EOFError))
                if not transient or not self.alive() or time.monotonic() > deadline:
                    raise QemuError(f"cannot talk QMP to VM {self.vm_id}: {exc}") from exc
                await asyncio.sleep(0.002)
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def wait_incoming(self, qmp: QMPClient, timeout: float, poll: float = 0.003, resume: bool = True) -> None:
        """Until a VM started with -incoming runs: `cont` if the migration completed but
        left it paused (the state was saved from a stopped VM, or QEMU runs with -S).
        resume=False: until the state is loaded, leaving the VM paused. QemuError on failure."""
        deadline = time.monotonic() + timeout
        while True:
            status = await qmp.execute("query-status")
            state = str(status["status"]) if isinstance(status, dict) else ""
            if state == "running":
                return
            if state in ("paused", "postmigrate"):
                mig = await qmp.execute("query-migrate")
                if isinstance(mig, dict) and mig.get("status") == "completed":
                    if resume:
                        await qmp.execute("cont")
                    return
            if state in ("inmigrate-failed", "internal-error", "guest-panicked", "shutdown") or not self.alive():
                raise QemuError(f"VM {self.vm_id} failed to load its state ({state}): {self.log_tail() or 'no output'}")
            if time.monotonic() > deadline:
                raise QemuError(f"VM {self.vm_id} did not finish loading its state within {timeout:.0f}s (state {state})")
            await asyncio.sleep(poll)

    async def stop(self, soft_timeout: float = 3.0, keep: Callable[[], None] | None = None) -> None:
        """Soft (QMP quit), then hard (SIGTERM, SIGKILL); then remove the run dir
        (keep: called first, with the process gone, to save what should outlive it)."""
        try:
            if self.alive():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(soft_timeout):
                        async with self.qmp() as qmp:
                            await qmp.execute("quit")
                await self._wait_exit(soft_timeout)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not self.alive():
                    break
                assert self.pid is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
                await self._wait_exit(2.0)
            if self.alive():
                raise QemuError(f"QEMU pid {self.pid} for VM {self.vm_id} did not exit after SIGKILL")
        finally:
            if not self.alive():
                if keep is not None:
                    with contextlib.suppress(OSError):
                        keep()
                shutil.rmtree(self.rundir, ignore_errors=True)

    async def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
