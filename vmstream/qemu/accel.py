"""Choosing the accelerator: KVM only where a guest has been seen to run.

/dev/kvm can exist while guests hang under it (nested virtualisation on the
project machines), so its presence proves nothing. The probe boots the guest
kernel with no root filesystem under KVM: a working KVM reaches the kernel's
'Unable to mount root' panic in a second or two and QEMU exits (-no-reboot).
The result is cached per QEMU version and kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmstream.qemu.machine import QEMU_BINARY, qemu_version

PROBE_TIMEOUT_S = 6.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def _probe_kvm(kernel: Path) -> AccelChoice:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is absent or not accessible")
    binary = shutil.which(QEMU_BINARY) or QEMU_BINARY
    with tempfile.TemporaryDirectory(prefix="vmstream-kvm-probe-") as tmp:
        log = Path(tmp) / "serial.log"
        cmd = [
            binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-accel", "kvm", "-cpu", "qemu64", "-m", "128M", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1", "-serial", f"file:{log}",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return AccelChoice(
                "tcg",
                f"/dev/kvm exists but a probe guest under KVM did not reach its kernel panic in {PROBE_TIMEOUT_S:.0f}s (it hangs)",
            )
        elapsed = time.monotonic() - start
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Kernel panic" in text:
            return AccelChoice("kvm", f"a probe guest ran under KVM (kernel reached its panic in {elapsed:.1f}s)")
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return AccelChoice("tcg", f"a probe guest under KVM failed: {detail[0]}")


def choose_accelerator(kernel: Path, cache_file: Path, forced: str = "auto") -> AccelChoice:
    """KVM or TCG, with the reason; forced kvm|tcg (the accel setting) overrides the probe."""
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"set by VMSTREAM_ACCEL={forced}")
    key = f"{qemu_version()}:{kernel.stat().st_size}"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return AccelChoice(cached["accel"], cached["reason"])
    except (FileNotFoundError, ValueError, KeyError):
        pass
    choice = _probe_kvm(kernel)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, **asdict(choice)}))
    os.replace(tmp, cache_file)
    return choice
