"""What other users of the host can see of an agent's data dir: nothing."""

from __future__ import annotations

import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts import Cli, our_qemu_pids


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory every user may enter and read (pytest's own tmp dirs are private)."""
    parent = Path(tempfile.mkdtemp(prefix="vmstream-iso-"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_the_data_dir_is_its_owners_alone(open_parent: Path) -> None:
    home = open_parent / "home"
    home.mkdir()
    home.chmod(0o755)  # as an operator might have made it
    (open_parent / "note").write_text("readable\n")
    (open_parent / "note").chmod(0o644)
    cli = Cli(home)
    try:
        cli.json("boot", "iso", "--memory", "128M")
        assert stat.S_IMODE(home.stat().st_mode) == 0o700, "the agent left its data dir open"
        for name in ("agent.token", "state.db", "agent.log", "agent.json"):
            mode = stat.S_IMODE((home / name).stat().st_mode)
            assert mode & 0o077 == 0, f"{name} is mode {mode:o}"
        assert _as_nobody("cat", str(open_parent / "note")).returncode == 0, "the probe itself works"
        assert _as_nobody("cat", str(home / "agent.token")).returncode != 0, "another user read the agent's token"
        assert _as_nobody("ls", str(home / "run")).returncode != 0, "another user listed the VMs' run dirs"
    finally:
        cli.run("agent", "stop", "--destroy-vms")
        assert not our_qemu_pids(home)
