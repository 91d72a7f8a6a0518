"""Driving real agents through the CLI, and what tests check is gone afterwards.

Shared by tests/integration (agents on loopback, and bridged on a test bed)
and tests/migrate (agents on the bridges of a namespace test bed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.procs import qemu_pids_under
from vmstream.bench.migrate import bridged_agent_env
from vmstream.net.testbed import TestBed


@dataclass
class Cli:
    home: Path
    env: dict[str, str] | None = None  # more environment, e.g. another host's store

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VMSTREAM_HOME": str(self.home), **(self.env or {})}
        return subprocess.run(
            [sys.executable, "-m", "vmstream", *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def json(self, *args: str, timeout: float = 300) -> Any:
        proc = self.run(*args, "--json", timeout=timeout)
        assert proc.returncode == 0, f"vmstream {' '.join(args)} failed: {proc.stderr or proc.stdout}"
        return json.loads(proc.stdout)

    def agent(self) -> tuple[str, dict[str, str], int]:
        """The running agent's base URL, its Authorization header and its pid (from the data dir)."""
        info = json.loads((self.home / "agent.json").read_text())
        token = (self.home / "agent.token").read_text().strip()
        return f"http://127.0.0.1:{info['port']}", {"Authorization": f"Bearer {token}"}, int(info["pid"])

    def ask(self, vm: str, command: str, timeout: float = 120) -> dict[str, Any]:
        proc = self.run("guest", "ask", vm, command, "--timeout", str(timeout), timeout=timeout + 60)
        assert proc.returncode == 0, proc.stderr
        answer: dict[str, Any] = json.loads(proc.stdout)
        return answer


def our_qemu_pids(home: Path) -> list[int]:
    """QEMU processes whose command line points into this session's data dir."""
    return qemu_pids_under(home)


def fuse_mounts(home: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(home))]


def status(endpoint: str) -> dict[str, Any]:
    r = httpx.get(endpoint + "status.json", timeout=10)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


# ---- agents whose VMs sit on a test bed's bridges ------------------------------------------


def bridged_host(bed: TestBed, host: str, home: Path, first: int, last: int, **env: str) -> Cli:
    """An agent (started by its first command) on test-bed host `host`'s bridge (see bridged_agent_env)."""
    return Cli(home, {**bridged_agent_env(bed, host, first, last), **env})


def vm_ip(vm: dict[str, Any]) -> str:
    """A bridged VM's address, from its endpoint http://ADDRESS/."""
    ip: str = vm["endpoint"].removeprefix("http://").rstrip("/")
    return ip


def http_get(sock: socket.socket, keep_alive: bool = True) -> str:
    """One request on a connection from the client namespace; the answering guest's hostname."""
    conn = "keep-alive" if keep_alive else "close"
    sock.sendall(f"GET /status.json HTTP/1.1\r\nHost: vm\r\nConnection: {conn}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the VM closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    hostname: str = json.loads(body[:length])["hostname"]
    return hostname


def taps(netns: str) -> list[str]:
    """The tap devices in a namespace (a bridged agent makes one per VM)."""
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show", "type", "tun"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]


class Load:
    """Threads sending the demo guest's GET /work?ms=300 to 127.0.0.1:port (a group's HAProxy)
    back to back; every answer kept."""

    def __init__(self, port: int, threads: int) -> None:
        self.url = f"http://127.0.0.1:{port}/work?ms=300"
        self.answers: list[tuple[int, str]] = []  # (status, hostname or error)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                try:
                    r = http.get(self.url)
                    self.answers.append((r.status_code, r.json()["hostname"] if r.status_code == 200 else r.text[:100]))
                except httpx.HTTPError as exc:
                    self.answers.append((0, repr(exc)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def hosts(self) -> set[str]:
        return {h for status, h in list(self.answers) if status == 200}

    def failures(self) -> list[tuple[int, str]]:
        return [a for a in list(self.answers) if a[0] != 200]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
