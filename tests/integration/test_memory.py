"""Memory a guest gives back: the balloon every VM has, and clones' discards.

A clone's RAM is a private mapping of its image's memfs file. What its guest frees
(free page reporting) must leave the host: QEMU's discard drops the clone's private
copy of the page (MADV_DONTNEED) and the image's page shows through again, while the
image file itself, shared by every clone, is never touched (cloneshim.c).
"""

from __future__ import annotations

import time
from typing import Any

from tests.hosts import Cli
from tests.integration.conftest import BaseImage, VmFactory

MIB = 1 << 20


def _written(cli: Cli, name: str) -> int:
    """The clone's private guest RAM: pages it wrote, not the image's."""
    vm: dict[str, Any] = cli.json("show", name)
    return int(vm["footprint"]["guest_ram"]["anonymous_bytes"])


def _memload(cli: Cli, name: str, timeout: float = 120) -> dict[str, Any]:
    """Wait for the guest's memload to finish; its last report."""
    deadline = time.monotonic() + timeout
    while True:
        answer = cli.ask(name, "memload-status")
        assert answer["ok"], answer
        result: dict[str, Any] = answer["result"] or {}
        if result.get("state") == "done" or not answer["running"]:
            return result
        assert time.monotonic() < deadline, f"memload did not finish: {answer}"
        time.sleep(0.5)


def test_every_new_vm_has_a_balloon_and_its_images_clones_too(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    assert cli.json("show", "base")["balloon"]
    (clone,) = vms.clones("base-img", prefix="bal")
    assert clone["balloon"]
    cmdline = open(f"/proc/{clone['pid']}/cmdline", "rb").read()
    assert b"virtio-balloon-pci" in cmdline and b"free-page-reporting=on" in cmdline


def test_memory_a_clone_frees_leaves_the_host_and_the_image_stays_whole(
    cli: Cli, base_image: BaseImage, vms: VmFactory
) -> None:
    (clone,) = vms.clones("base-img", prefix="free")
    name = clone["name"]
    before = _written(cli, name)
    started = cli.ask(name, "memload 96:0 96:4 0:0")
    assert started["ok"], started
    peak = before
    while (answer := cli.ask(name, "memload-status"))["running"] and (answer["result"] or {}).get("state") != "done":
        peak = max(peak, _written(cli, name))
        time.sleep(0.5)
    assert (answer["result"] or {}).get("state") == "done", answer
    assert peak >= before + 80 * MIB, f"memload's 96 MiB were not written: {before >> 20} -> {peak >> 20} MiB"
    # the guest reports what it freed (in blocks of 2 MiB or more, ~2 s later); the host drops it
    deadline = time.monotonic() + 20
    while (now := _written(cli, name)) > before + 24 * MIB and time.monotonic() < deadline:
        time.sleep(1)
    assert now <= before + 24 * MIB, f"freed memory stayed on the host: {before >> 20} -> {peak >> 20} -> {now >> 20} MiB"
    verified = cli.ask(name, "memcheck-verify")
    assert verified["ok"] and verified["result"]["bad_pages"] == 0, verified
    # the image's pages are whole for the next clone: its memcheck region checks out
    (other,) = vms.clones("base-img", prefix="after")
    verified = cli.ask(other["name"], "memcheck-verify")
    assert verified["ok"] and verified["result"]["bad_pages"] == 0, verified


def _memory(cli: Cli, name: str) -> dict[str, Any]:
    vm: dict[str, Any] = cli.json("show", name)
    return vm["memory"] or {}


def test_a_clone_held_to_its_limit_pages_out_and_its_workload_finishes(
    cli: Cli, base_image: BaseImage, vms: VmFactory
) -> None:
    """A clone limited to 64 MiB more than it costs now runs a workload that wants twice
    that: the controller shrinks its balloon, the guest pages out to its zram swap instead
    of growing, the workload finishes, the clone is back within its limit, and its memory
    checks out. (While the guest converts image pages it still shares into its own, the
    clone overshoots for a moment: docs/memory.md; bench policy measures it.)"""
    (clone,) = vms.clones("base-img", prefix="held")
    name = clone["name"]
    assert cli.ask(name, "swap 256")["ok"]
    limit = (int(cli.json("show", name)["footprint"]["anonymous_bytes"]) >> 20 << 20) + 64 * MIB  # all its QEMU's own, as the limit counts
    cli.json("memory", name, "--limit", f"{limit >> 20}M")
    deadline = time.monotonic() + 15
    while (mem := _memory(cli, name)).get("balloon_bytes") is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert mem.get("allowed_bytes") is not None and mem["allowed_bytes"] <= limit + MIB, mem
    assert cli.ask(name, "memload 128:8 128:8 0:0")["ok"]
    while (answer := cli.ask(name, "memload-status"))["running"]:
        time.sleep(0.5)
    result = answer["result"] or {}
    assert result.get("state") == "done", f"the workload did not finish: {answer}"
    deadline = time.monotonic() + 15
    while (private := int(_memory(cli, name).get("private_bytes") or 0)) > limit * 1.05 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert private <= limit * 1.05, f"the clone stays {(private - limit) >> 20} MiB over its {limit >> 20} MiB limit"
    verified = cli.ask(name, "memcheck-verify")
    assert verified["ok"] and verified["result"]["bad_pages"] == 0, verified
    # no limit: the balloon gives the guest its RAM back, a step at a time
    cli.json("memory", name, "--limit", "none")
    assert _memory(cli, name) == {} or _memory(cli, name).get("policy") is None


def test_bad_memory_policies_are_refused_with_the_fix(cli: Cli, base_vm: dict[str, Any]) -> None:
    for args, says in ((["--limit", "1M"], "too small"), (["--limit", "200M", "--burst", "64M"], "SIZE:SECONDS"),
                       (["--limit", "lots"], "not a memory size")):
        proc = cli.run("memory", "base", *args)
        assert proc.returncode != 0 and says in (proc.stderr + proc.stdout), (args, proc.stderr, proc.stdout)
    proc = cli.run("memory", "no-such-vm", "--limit", "200M")
    assert proc.returncode != 0 and "no-such-vm" in proc.stderr + proc.stdout
