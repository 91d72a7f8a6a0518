"""Bad input exits non-zero with a clear message and changes nothing."""

from __future__ import annotations

import pytest

from tests.hosts import Cli
from tests.integration.conftest import BaseImage


def _state(cli: Cli) -> tuple[list[str], list[str]]:
    return (
        sorted(v["name"] for v in cli.json("list")),
        sorted(i["name"] for i in cli.json("live-image", "list")),
    )


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("live-image", "start", "no-such-image"), 3, "no live image named 'no-such-image'"),
        (("boot", "base"), 4, "already exists"),
        (("boot", "fresh", "--memory", "lots"), 2, "'lots' is not a memory size"),
        (("boot", "fresh", "--memory", "3M"), 2, "out of range"),
        (("boot", "Bad_Name"), 2, "not a valid VM name"),
        (("guest", "build", "--kernel", "/nonexistent/vmlinuz"), 5, "does not exist"),
        (("live-image", "create", "no-such-vm", "img-x"), 3, "no VM named 'no-such-vm'"),
        (("live-image", "create", "base", "base-img"), 4, "already exists"),
        (("destroy", "no-such-vm"), 3, "no VM named"),
        (("live-image", "delete", "no-such-image"), 3, "no live image named"),
    ],
)
def test_bad_input(cli: Cli, base_image: BaseImage, args: tuple[str, ...], code: int, words: str) -> None:
    before = _state(cli)
    proc = cli.run(*args)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert words in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _state(cli) == before
