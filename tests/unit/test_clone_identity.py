"""Pure parts of a clone's identity: the clock arithmetic, and the shipped clone hooks.

The hooks act on fixed paths (/etc/machine-id, /etc/ssh, /run/sshd.pid), so they
run here in a private mount namespace with temporary files bound over those.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vmstream.guest.clock import ClockSample, best, step_text, sync
from vmstream.guest.installer import SHIPPED_HOOKS, agent_installer, hooks_part, shipped_hook


def test_clock_sample_bounds_the_offset_by_half_the_round_trip() -> None:
    s = ClockSample(sent=100.0, received=100.010, guest=99.0)
    assert s.offset_s == pytest.approx(-1.005)
    assert s.error_s == pytest.approx(0.005)
    quick = ClockSample(200.0, 200.002, 200.5)
    assert best([s, quick, ClockSample(300.0, 300.1, 300.0)]) is quick


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "+0.250000000"), (-2.5, "-2.500000000"), (-1e-7, "-0.000000100"),
                                               (1234.000000001, "+1234.000000001")])
def test_step_text_has_a_sign_and_no_exponent(seconds: float, text: str) -> None:
    assert step_text(seconds) == text


class FakeGuest:
    """A guest clock `offset` off the host's whose agent answers after `delay` and applies a step late."""

    def __init__(self, offset: float, delay: float = 0.001, can_step: bool = True) -> None:
        self.offset, self.delay, self.can_step = offset, delay, can_step
        self.steps: list[float] = []

    async def read(self) -> float:
        await asyncio.sleep(self.delay / 2)
        t = time.time() + self.offset
        await asyncio.sleep(self.delay / 2)
        return t

    async def step(self, seconds: float) -> bool:
        if not self.can_step:
            return False
        await asyncio.sleep(0.05)  # a step applied late is still right: it is relative
        self.offset += seconds
        self.steps.append(seconds)
        return True


def test_sync_steps_a_clock_to_the_hosts_however_late_the_step_lands() -> None:
    guest = FakeGuest(offset=-3.2)
    result = asyncio.run(sync(guest.read, guest.step))
    assert result.method == "step" and result.steps >= 1
    assert result.offset_before_s == pytest.approx(-3.2, abs=0.01)
    assert abs(guest.offset) < 0.005 and abs(result.offset_s) < 0.005


def test_sync_leaves_a_clock_alone_that_is_right() -> None:
    guest = FakeGuest(offset=0.0)
    result = asyncio.run(sync(guest.read, guest.step))
    assert result.steps == 0 and not guest.steps


def test_sync_reports_an_agent_that_cannot_step() -> None:
    guest = FakeGuest(offset=-1.0, can_step=False)
    result = asyncio.run(sync(guest.read, guest.step))
    assert result.method == "set" and result.steps == 0


def test_installer_carries_the_shipped_hooks() -> None:
    script = agent_installer(native=False)
    for name in SHIPPED_HOOKS:
        assert f"install_hook {name} <<'VMSTREAM_HOOK_EOF'" in script
        assert shipped_hook(name) in script
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)


def test_a_hook_turned_off_stays_off_when_the_installer_runs_again(tmp_path: Path) -> None:
    hooks = tmp_path / "clone.d"
    hooks.mkdir()
    script = hooks_part(str(hooks))
    subprocess.run(["sh", "-e"], input=script, text=True, check=True)
    for name in SHIPPED_HOOKS:
        assert os.access(hooks / name, os.X_OK) and (hooks / name).read_text() == shipped_hook(name)
    (hooks / SHIPPED_HOOKS[0]).chmod(0o644)
    (hooks / SHIPPED_HOOKS[0]).write_text("old\n")
    subprocess.run(["sh", "-e"], input=script, text=True, check=True)
    assert not os.access(hooks / SHIPPED_HOOKS[0], os.X_OK), "chmod -x is how a user turns a hook off"
    assert (hooks / SHIPPED_HOOKS[0]).read_text() == shipped_hook(SHIPPED_HOOKS[0]), "but its text is updated"
    assert os.access(hooks / SHIPPED_HOOKS[1], os.X_OK)


# ---- the hooks themselves, in a private mount namespace --------------------------------


def _can_bind_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not _can_bind_mount(), reason="needs root and unshare -m (bind mounts)")


def run_hook(name: str, binds: dict[Path, str], path_prepend: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a shipped hook with each of `binds` mounted over its path (only the hook sees them)."""
    hook = next(iter(binds)).parent / f"hook-{name}"
    hook.write_text(shipped_hook(name))
    mounts = " && ".join(f"mount --bind '{src}' '{dst}'" for src, dst in binds.items())
    path = f"PATH='{path_prepend}':$PATH " if path_prepend else ""
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{mounts} && {path}exec sh '{hook}'"],
                          capture_output=True, text=True, timeout=120)


@needs_namespace
def test_machine_id_hook_writes_a_new_random_id(tmp_path: Path) -> None:
    machine_id, run = tmp_path / "machine-id", tmp_path / "run"
    run.mkdir()  # no /run/systemd/system here: no journald to restart
    ids = set()
    for _ in range(3):
        machine_id.write_text("0123456789abcdef0123456789abcdef\n")
        r = run_hook("10-machine-id", {machine_id: "/etc/machine-id", run: "/run"})
        assert r.returncode == 0, r.stderr + r.stdout
        new = machine_id.read_text()
        assert len(new) == 33 and new.endswith("\n") and int(new, 16) and new[12] == "4", new  # a v4 UUID
        ids.add(new)
    assert len(ids) == 3 and "0123456789abcdef0123456789abcdef\n" not in ids


@needs_namespace
def test_ssh_hook_does_nothing_without_an_ssh_server(tmp_path: Path) -> None:
    if shutil.which("sshd") or Path("/usr/sbin/sshd").exists():
        pytest.skip("this host has an SSH server")
    ssh, run = tmp_path / "ssh", tmp_path / "run"
    ssh.mkdir()
    run.mkdir()
    (ssh / "ssh_host_ed25519_key").write_text("the image's key\n")
    r = run_hook("20-ssh-host-keys", {ssh: "/etc/ssh", run: "/run"})
    assert r.returncode == 0 and "no OpenSSH server" in r.stdout, r.stderr + r.stdout
    assert (ssh / "ssh_host_ed25519_key").read_text() == "the image's key\n"


@needs_namespace
def test_ssh_hook_replaces_the_images_keys_and_reloads_sshd(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen on this host")
    ssh, run, bin_dir = tmp_path / "ssh", tmp_path / "run", tmp_path / "bin"
    for d in (ssh, run, bin_dir):
        d.mkdir()
    (bin_dir / "sshd").write_text("#!/bin/sh\n")  # an SSH server is installed
    (bin_dir / "sshd").chmod(0o755)
    for kind in ("ed25519", "ecdsa"):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(ssh / f"ssh_host_{kind}_key")], check=True)
    before = {p.name: p.read_text() for p in ssh.iterdir()}
    sshd = subprocess.Popen(["sleep", "60"])  # stands for the listening sshd: it gets SIGHUP
    try:
        (run / "sshd.pid").write_text(f"{sshd.pid}\n")
        r = run_hook("20-ssh-host-keys", {ssh: "/etc/ssh", run: "/run"}, path_prepend=bin_dir)
        assert r.returncode == 0, r.stderr + r.stdout
        assert sshd.wait(timeout=10) == -signal.SIGHUP
    finally:
        if sshd.poll() is None:
            sshd.kill()
            sshd.wait()
    after = {p.name: p.read_text() for p in ssh.iterdir()}
    assert set(after) == set(before), "the same key types, and no leftover directory"
    assert all(after[name] != before[name] for name in before), "every key is new"
    assert oct((ssh / "ssh_host_ed25519_key").stat().st_mode & 0o777) == "0o600"


def test_a_burst_of_single_starts_defers_hooks_until_the_host_is_quiet() -> None:
    import asyncio
    import time

    from vmstream.host.hooks import Batch, Burst

    async def scenario() -> None:
        burst = Burst(quiet_s=0.2)
        assert not Batch(1, True, in_burst=burst.begin()).defer_hooks  # alone: its hooks run at once
        assert Batch(1, True, in_burst=burst.begin()).defer_hooks  # while the first runs
        assert not Batch(1, False, in_burst=True).defer_hooks  # the setting turns it off
        burst.end()
        burst.end()
        assert Batch(1, True, in_burst=burst.begin()).defer_hooks  # right after: still the burst
        burst.end()
        t0 = time.monotonic()
        await burst.quiet()
        assert time.monotonic() - t0 >= 0.15
        await asyncio.sleep(0.25)
        assert not Batch(1, True, in_burst=burst.begin()).defer_hooks  # a start after a quiet spell
        burst.end()

    asyncio.run(scenario())
