"""Readiness checks and published ports with real guests."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.hosts import Cli, status
from tests.integration.conftest import VmFactory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agent_readiness_and_published_ports_reach_clones(cli: Cli, vms: VmFactory) -> None:
    port = _free_port()
    vm = cli.json("boot", "rd-agent", "--memory", "256M", "--ready", "agent", "--publish", f"{port}:80")
    vms.names.append("rd-agent")
    assert vm["ready"] == "agent" and vm["ports"] == {"80": port}, vm
    assert status(f"http://127.0.0.1:{port}/")["hostname"] == "rd-agent", "the published port reaches the guest"
    cli.json("live-image", "create", "rd-agent", "rd-img")
    try:
        clones = vms.clones("rd-img", count=2)
        ports = [c["ports"]["80"] for c in clones]
        assert len({port, *ports}) == 3, "each clone has its own host port for the published guest port"
        for c, p in zip(clones, ports, strict=True):
            assert c["ready"] == "agent" and "ready" in c["phases"], c
            assert status(f"http://127.0.0.1:{p}/")["hostname"] == c["name"]
        vms.destroy_all()
    finally:
        cli.run("live-image", "delete", "rd-img")


def test_tcp_readiness(cli: Cli, vms: VmFactory) -> None:
    vm = cli.json("boot", "rd-tcp", "--memory", "256M", "--ready", "tcp:80")
    vms.names.append("rd-tcp")
    assert vm["ready"] == "tcp:80" and vm["state"] == "running"


def test_a_boot_that_is_never_ready_fails_with_the_console_and_keeps_its_logs(cli: Cli) -> None:
    r = cli.run("boot", "rd-never", "--memory", "256M", "--ready", "tcp:9", "--timeout", "20")
    assert r.returncode == 6, r.stderr
    assert "was not ready (tcp:9) within 20s" in r.stderr and "guest console's last lines" in r.stderr, r.stderr
    kept = Path(r.stderr.split("logs kept in ")[1].split()[0].rstrip("."))
    assert (kept / "serial.log").stat().st_size > 0 and (kept / "qemu.log").exists(), sorted(kept.iterdir())
    assert "rd-never" not in {v["name"] for v in cli.json("list")}
