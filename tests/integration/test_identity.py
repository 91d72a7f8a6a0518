"""Clone identity, clock, and layered live images, with real QEMU guests."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

from tests.hosts import Cli, status
from tests.integration.conftest import BaseImage, VmFactory, assert_clock_is_the_hosts, wait_hooks, wait_pool


def test_clones_get_distinct_identities(cli: Cli, base_image: BaseImage, vms: VmFactory, tmp_path: Path) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_bytes(b"#cloud-config\nanything: goes\n")
    clones = vms.clones("base-img", count=10, prefix="ident")
    # the same command with parameters for one more clone
    proc = cli.run("live-image", "start", "base-img", "--name", "param", "--param", "greeting=hello world",
                   "--param", "answer=42", "--user-data", str(user_data), "--json")
    assert proc.returncode == 0, proc.stderr
    (special,) = json.loads(proc.stdout)["vms"]
    vms.names.append(special["name"])

    names = [c["name"] for c in clones]
    assert len({c["hostname"] for c in clones}) == 10
    assert all(c["hostname"] == c["name"] for c in clones)
    assert len({c["mac"] for c in clones}) == 10
    assert len({c["vmgenid"] for c in clones}) == 10
    randoms, macs, hostnames = set(), set(), set()
    for name in names:
        st = cli.ask(name, "status")
        hostnames.add(st["hostname"])
        macs.add(st["mac"])
        randoms.add(cli.ask(name, "random")["random"])
    assert hostnames == set(names), "the guest hostnames are the clone names"
    assert macs == {c["mac"] for c in clones}, "the guest NICs carry the new MACs"
    assert len(randoms) == 10, "every clone's RNG was reseeded"
    for c in clones:
        assert c["identity_applied_s"] is not None and c["identity_applied_s"] <= c["ready_s"]
        assert status(c["endpoint"])["hostname"] == c["name"]

    hooks = wait_hooks(cli, special["name"])
    (hook,) = hooks["hooks"]
    assert hook["rc"] == 0
    output = base64.b64decode(hook["output_b64"]).decode()
    assert f"hostname={special['name']}" in output
    assert "greeting=hello world" in output and "answer=42" in output
    assert f"VMSTREAM_MAC={special['mac']}" in output
    # each clone's hook saw its own identity
    other = wait_hooks(cli, names[3])
    assert f"hostname={names[3]}" in base64.b64decode(other["hooks"][0]["output_b64"]).decode()


def test_clone_clock_is_the_hosts(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    # an unfixed clone would resume with the clock of the moment the image was taken
    time.sleep(max(0.0, base_image.created + 5 - time.time()))
    clones = vms.clones("base-img", prefix="clock") + vms.clones("base-img", count=2, prefix="clocks")
    for clone in clones:
        assert_clock_is_the_hosts(cli, clone["name"])
        assert cli.json("show", clone["name"])["clock"]["method"] == "step"


def test_bad_guest_parameter_is_refused(cli: Cli, base_image: BaseImage) -> None:
    before = [v["name"] for v in cli.json("list")]
    proc = cli.run("live-image", "start", "base-img", "--param", "PATH=/tmp")
    assert proc.returncode == 2 and "not allowed" in proc.stderr
    proc = cli.run("live-image", "start", "base-img", "--param", "novalue")
    assert proc.returncode == 2 and "key=value" in proc.stderr
    assert [v["name"] for v in cli.json("list")] == before


def test_four_deep_chain_shares_the_root(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    source = vms.clones("base-img", prefix="chain0")[0]["name"]
    images = []
    for depth in range(1, 5):
        img = cli.json("live-image", "create", source, f"chain{depth}-img")
        images.append(img)
        assert img["layout"] == "delta" and img["memory_root"] == "base-img"
        # the layer stores about the clone's private bytes, not the whole memory
        assert img["memory_bytes_stored"] == img["source_private_bytes"]
        assert img["memory_bytes_stored"] < base_image.info["memory_bytes_stored"] / 4
        source = vms.clones(img["name"], prefix=f"chain{depth}")[0]["name"]
    deepest = cli.json("show", source)
    assert deepest["parent_image"] == "chain4-img"
    verify = cli.ask(source, "memcheck-verify")
    assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify
    # still mostly the root image's pages in the deepest clone's RAM
    ram = deepest["footprint"]["guest_ram"]
    assert ram["image_bytes"] > ram["anonymous_bytes"]

    # an image with child images cannot be deleted; clones gone, children first
    vms.destroy_all()
    proc = cli.run("live-image", "delete", "chain2-img")
    assert proc.returncode == 4 and "child images" in proc.stderr and "chain3-img" in proc.stderr
    # an image still starts after the VM it came from is destroyed
    (again,) = vms.clones("chain4-img", prefix="after")
    assert cli.ask(again["name"], "memcheck-verify")["result"]["bad_pages"] == 0
    vms.destroy_all()
    for depth in range(4, 0, -1):
        cli.json("live-image", "delete", f"chain{depth}-img")


def test_flattened_image_stands_alone(cli: Cli, base_image: BaseImage, vms: VmFactory) -> None:
    (clone,) = vms.clones("base-img", prefix="flat")
    img = cli.json("live-image", "create", clone["name"], "flat-img", "--flatten")
    assert img["layout"] == "full" and img["memory_root"] is None
    (child,) = vms.clones("flat-img", prefix="flatc")
    assert cli.ask(child["name"], "memcheck-verify")["result"]["bad_pages"] == 0
    vms.destroy_all()
    cli.json("live-image", "delete", "flat-img")


def test_portable_shell_agent(cli: Cli, vms: VmFactory) -> None:
    """The agent real guests install (shell) speaks the same protocol as the native one."""
    vm = cli.json("boot", "portable", "--guest-agent", "portable")
    vms.names.append("portable")
    assert cli.ask("portable", "ping")["ok"]
    cli.json("live-image", "create", "portable", "portable-img")
    try:
        (clone,) = vms.clones("portable-img", prefix="pclone")
        st = cli.ask(clone["name"], "status")
        assert st["hostname"] == clone["name"] and st["mac"] == clone["mac"]
        hooks = wait_hooks(cli, clone["name"])
        assert f"hostname={clone['name']}" in base64.b64decode(hooks["hooks"][0]["output_b64"]).decode()
        assert status(vm["endpoint"])["hostname"] == "portable"
        # the next one from the clone pool, whose QEMU ran through 'prepare' with this agent
        wait_pool(cli, "portable-img")
        (pooled,) = vms.clones("portable-img", prefix="ppooled")
        assert "pool_taken" in pooled["phases"], pooled["phases"]
        st = cli.ask(pooled["name"], "status")
        assert st["hostname"] == pooled["name"] and st["mac"] == pooled["mac"]
        seen = base64.b64decode(wait_hooks(cli, pooled["name"])["hooks"][0]["output_b64"]).decode()
        assert f"hostname={pooled['name']}" in seen and ".pool" not in seen, seen
        for c in (clone, pooled):  # the shell agent's clock too (its commands are applied late)
            assert_clock_is_the_hosts(cli, c["name"])
    finally:
        vms.destroy_all()
        cli.run("live-image", "delete", "portable-img")


def test_agent_installer_is_valid_shell(cli: Cli) -> None:
    proc = cli.run("guest", "agent-installer")
    assert proc.returncode == 0
    subprocess.run(["sh", "-n"], input=proc.stdout, text=True, check=True)
    assert "systemctl enable vmstream-agent.service" in proc.stdout
    assert "systemctl restart vmstream-agent.service" in proc.stdout  # a reinstall replaces a running agent
    assert "VMSTREAM_NATIVE_EOF" in proc.stdout
    portable = cli.run("guest", "agent-installer", "--portable")
    assert portable.returncode == 0 and "VMSTREAM_NATIVE_EOF" not in portable.stdout
