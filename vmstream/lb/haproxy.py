"""Balancer: one HAProxy process in front of a group's members, changed at runtime.

HAProxy 2.6 (Debian bookworm) takes servers added and deleted through its runtime API
("dynamic servers"), so members come and go without a reload. What that version does, found
against its sources (docs/notes.md, #20): a server added at runtime inherits nothing from
`default-server` and starts in maintenance with its checks off, so each add names its check
options and is followed by `enable health` and `enable server`; `del server` needs the server
in maintenance with no connection left, so a member leaving is drained first (no new
requests, in-flight ones finish), then put in maintenance and deleted; idle server-side
keep-alive connections would block that for seconds, hence `option http-server-close`.
The process runs in the foreground of its own session (`-db`), so its owner ends it by pid:
SIGUSR1 lets in-flight requests finish, SIGTERM after a grace period.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmstream.errors import VmstreamError

START_TIMEOUT_S = 10.0
MAX_SOCKET_PATH = 97  # HAProxy 2.6's limit for a stats socket's path
STOP_GRACE_S = 10.0
_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # what HAProxy accepts in a server name


class HaproxyError(VmstreamError):
    """HAProxy is missing, refused its configuration or a runtime command (exit 1, HTTP 500)."""


@dataclass(frozen=True)
class MemberStats:
    """One member's figures from `show stat`: what an autoscaler reads."""

    name: str
    status: str  # UP, DOWN, DRAIN, MAINT, ...
    current: int  # requests in service (scur)
    queued: int  # waiting for it (qcur)
    total: int  # requests sent to it so far (stot)


@dataclass(frozen=True)
class BackendStats:
    """What waits for any member (the backend's queue), and each member's figures."""

    queued: int
    members: dict[str, MemberStats]

    @property
    def load(self) -> int:
        """Requests in service at members or waiting for one: what a group sizes itself by."""
        return self.queued + sum(m.current + m.queued for m in self.members.values())


class Balancer:
    """A group's HAProxy: listens on 127.0.0.1:port, balances to members by least connections."""

    def __init__(self, name: str, run_dir: Path, port: int, health_path: str = "/") -> None:
        if not _NAME.match(name):
            raise HaproxyError(f"balancer name '{name}' is not allowed: use letters, digits and . _ : - (at most 64)")
        self.name = name
        self.run_dir = run_dir
        self.port = port
        self.health_path = health_path
        self.config = run_dir / "haproxy.cfg"
        self.socket = run_dir / "haproxy.sock"
        self.pid_file = run_dir / "haproxy.pid"
        self.log_file = run_dir / "haproxy.log"
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def backend(self) -> str:
        return f"be_{self.name}"

    # ---- the process -----------------------------------------------------------------

    def render(self) -> str:
        return f"""global
    stats socket {self.socket} mode 600 level admin
    stats timeout 10s
    maxconn 4096
    hard-stop-after {STOP_GRACE_S:.0f}s
    noreuseport

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue 30s
    timeout http-keep-alive 5s
    retries 2
    option redispatch
    option http-server-close

frontend fe_{self.name}
    bind 127.0.0.1:{self.port}
    default_backend {self.backend}

backend {self.backend}
    balance leastconn
    option httpchk GET {self.health_path}
"""

    def start(self) -> None:
        """Write the configuration, check it, start HAProxy and wait for its runtime socket."""
        binary = _haproxy()
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise HaproxyError(f"the runtime socket of balancer '{self.name}' would be {self.socket}, longer than the "
                               f"{MAX_SOCKET_PATH} characters HAProxy takes: use a data dir with a shorter path")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.render())
        check = subprocess.run([binary, "-c", "-f", str(self.config)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            said = [line for line in (check.stderr or check.stdout).splitlines()
                    if line.strip() and "Error(s) found in configuration" not in line and "Fatal errors found" not in line]
            raise HaproxyError(f"HAProxy refused the configuration of balancer '{self.name}': {_tail(chr(10).join(said))}")
        with open(self.log_file, "ab") as log:
            self._popen = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(self._popen.pid))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._popen.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise HaproxyError(f"HAProxy of balancer '{self.name}' exited at start (port {self.port} in use?): "
                                   f"{_tail(self.log_file.read_text(errors='replace'))}")
            with contextlib.suppress(OSError):
                self.command("show info")
                return
            if time.monotonic() > deadline:
                self.stop()
                raise HaproxyError(f"HAProxy of balancer '{self.name}' did not answer on {self.socket} within {START_TIMEOUT_S:.0f}s")
            time.sleep(0.02)

    def pid(self) -> int | None:
        """HAProxy's pid, if it runs this balancer's configuration (after an owner restart too)."""
        if self._popen is not None:
            return self._popen.pid if self._popen.poll() is None else None
        try:
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid if b"haproxy" in cmdline and str(self.config).encode() in cmdline else None

    def stop(self) -> None:
        """End HAProxy: a soft stop (in-flight requests finish), then SIGTERM, then SIGKILL."""
        pid = self.pid()
        if pid is not None:
            for sig, wait_s in ((signal.SIGUSR1, STOP_GRACE_S), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if self._wait_gone(pid, wait_s):
                    break
        self._popen = None
        self.pid_file.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._popen is not None and self._popen.pid == pid:
                if self._popen.poll() is not None:
                    return True
            elif not Path(f"/proc/{pid}").exists():
                return True
            time.sleep(0.02)
        return False

    # ---- the runtime API -------------------------------------------------------------

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One runtime API command (several with ';'): HAProxy answers and closes."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            out = []
            while chunk := s.recv(65536):
                out.append(chunk)
        return b"".join(out).decode(errors="replace")

    def add(self, member: str, host: str, port: int, maxconn: int | None = None) -> None:
        """Put a member into rotation, health-checked (GET health_path every 200 ms). Add it once
        it answers: HAProxy counts a new server up before its first check. maxconn: at most this
        many requests at it at once; the rest wait in HAProxy's queue for any member."""
        if not _NAME.match(member):
            raise HaproxyError(f"member name '{member}' is not allowed: use letters, digits and . _ : - (at most 64)")
        server = f"{self.backend}/{member}"
        answer = self.command(f"add server {server} {host}:{port} check inter 200ms fall 2 rise 1"
                              + (f" maxconn {maxconn}" if maxconn else ""))
        if "New server registered" not in answer:
            raise HaproxyError(f"HAProxy did not add member '{member}' to balancer '{self.name}': {_tail(answer)}")
        answer = self.command(f"enable health {server}; enable server {server}")
        if answer.strip():
            with contextlib.suppress(HaproxyError, OSError):
                self._delete(member)
            raise HaproxyError(f"HAProxy did not enable member '{member}' of balancer '{self.name}': {_tail(answer)}")

    def remove(self, member: str, timeout: float = 30.0) -> None:
        """Take a member out: drained first (no new requests; in-flight ones finish, up to
        timeout, then they are cut), then deleted."""
        server = f"{self.backend}/{member}"
        answer = self.command(f"set server {server} state drain")
        if answer.strip():
            raise HaproxyError(f"HAProxy could not drain member '{member}' of balancer '{self.name}': {_tail(answer)}")
        deadline = time.monotonic() + timeout
        while (m := self.members().get(member)) is not None and (m.current or m.queued) and time.monotonic() < deadline:
            time.sleep(0.05)
        if m is not None and (m.current or m.queued):
            self.command(f"shutdown sessions server {server}")
        self._delete(member, deadline=time.monotonic() + 10.0)  # in maintenance first, then deleted

    def _delete(self, member: str, deadline: float | None = None) -> None:
        server = f"{self.backend}/{member}"
        self.command(f"set server {server} state maint")
        while True:
            answer = self.command(f"del server {server}")
            if "Server deleted" in answer or "No such server" in answer:
                return
            if deadline is None or time.monotonic() > deadline:
                raise HaproxyError(f"HAProxy did not delete member '{member}' of balancer '{self.name}': {_tail(answer)}")
            time.sleep(0.1)  # a connection still closing

    def members(self) -> dict[str, MemberStats]:
        """The members and their figures."""
        return self.stats().members

    def stats(self) -> BackendStats:
        """The backend's queue and its members' figures, from one `show stat` (CSV, read by its header)."""
        text = self.command(f"show stat {self.backend} 6 -1")  # types 4|2: servers and the backend row
        queued, members = 0, {}
        for r in csv.DictReader(io.StringIO(text.lstrip("# "))):
            name = r.get("svname")
            if name == "BACKEND":
                queued = int(r["qcur"] or 0)
            elif name and name != "FRONTEND":
                members[name] = MemberStats(name, r["status"], int(r["scur"] or 0), int(r["qcur"] or 0), int(r["stot"] or 0))
        return BackendStats(queued, members)


def _haproxy() -> str:
    for path in ("/usr/sbin/haproxy", "/usr/bin/haproxy"):
        if os.access(path, os.X_OK):
            return path
    raise HaproxyError("HAProxy is not installed: apt-get install haproxy (Debian's package)")


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(no output)"
