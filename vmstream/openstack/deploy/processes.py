"""The PID table: every process the deployment starts, and how exactly those are stopped.

Each start writes pids/<name>.json with the PID and the kernel's start time of that PID, so a
PID the kernel has since given to someone else is never taken for ours. Every service runs in
a session of its own (its PID is the session id), so the workers it forks (uwsgi, glance,
neutron) are found by session and stopped with it; nothing is ever looked up by name. The one
process that leaves its session is epmd (it daemonises): it is recorded by the PID listening
on its port right after RabbitMQ starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

WAIT_S = 10.0  # SIGTERM, then this long, then SIGKILL


@dataclass(frozen=True)
class Record:
    name: str
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: tells our PID from a reused one
    argv: list[str]
    log: str


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[3]), int(fields[19])


def start_ticks(pid: int) -> int | None:
    st = _stat(pid)
    return st[2] if st else None


def is_running(pid: int, ticks: int) -> bool:
    """The process is there, is the one we recorded, and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[2] == ticks and st[0] not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """Live processes of a session (a service's workers), the leader included."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st and st[1] == sid and st[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ProcessTable:
    """The processes one state folder's deployment started, by service name."""

    def __init__(self, pids_dir: Path) -> None:
        self.dir = pids_dir
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # started by this process: reaped here

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, nice: int = 0) -> Record:
        """Start a service in its own session, output appended to its log, and record it.
        env is its whole environment (None: this process's); nice is added to ours."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True,
                                    preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self._children[name] = proc
        ticks = start_ticks(proc.pid)
        return self._write(Record(name, proc.pid, ticks if ticks is not None else -1, argv, str(log)))

    def adopt(self, name: str, pid: int, log: Path) -> Record | None:
        """Record a process a service of ours made outside its session (epmd)."""
        ticks = start_ticks(pid)
        return None if ticks is None else self._write(Record(name, pid, ticks, cmdline(pid).split(), str(log)))

    def _write(self, rec: Record) -> Record:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{rec.name}.json.tmp"
        tmp.write_text(json.dumps(asdict(rec)))
        tmp.rename(self.dir / f"{rec.name}.json")
        return rec

    def get(self, name: str) -> Record | None:
        path = self.dir / f"{name}.json"
        try:
            return Record(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def records(self) -> list[Record]:
        if not self.dir.is_dir():
            return []
        found = (self.get(p.stem) for p in sorted(self.dir.glob("*.json")))
        return [r for r in found if r is not None]

    def running(self, name: str) -> bool:
        self._reap()
        rec = self.get(name)
        return rec is not None and is_running(rec.pid, rec.start_ticks)

    def exited(self, name: str) -> int | None:
        """The exit code if this process started the service and it has ended."""
        proc = self._children.get(name)
        return None if proc is None else proc.poll()

    def _reap(self) -> None:
        for proc in self._children.values():
            proc.poll()

    def pids(self, rec: Record) -> list[int]:
        """The service's live processes: the recorded one and its session's members."""
        self._reap()
        members = set(session_members(rec.pid)) if start_ticks(rec.pid) in (rec.start_ticks, None) else set()
        if is_running(rec.pid, rec.start_ticks):
            members.add(rec.pid)
        return sorted(members)

    def stop(self, names: list[str], wait_s: float = WAIT_S) -> list[str]:
        """SIGTERM the named services (all at once), wait, SIGKILL what is left; drop their records.

        Returns what had to be killed. Safe to call again: a service already gone is only
        forgotten."""
        recs = [r for r in (self.get(n) for n in names) if r is not None]
        for rec in recs:
            if is_running(rec.pid, rec.start_ticks):
                _signal(rec.pid, signal.SIGTERM)  # uwsgi masters, glance and neutron parents take their workers
            else:
                for pid in self.pids(rec):
                    _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(self.pids(r) for r in recs):
            time.sleep(0.1)
        killed = []
        for rec in recs:
            left = self.pids(rec)
            for pid in left:
                _signal(pid, signal.SIGKILL)
            if left:
                killed.append(rec.name)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self.pids(r) for r in recs):
            time.sleep(0.05)
        for rec in recs:
            if not self.pids(rec):
                (self.dir / f"{rec.name}.json").unlink(missing_ok=True)
                self._children.pop(rec.name, None)
        return killed


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# ---- listeners ----------------------------------------------------------------------------


def _socket_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    return inodes


def listeners(port: int) -> list[int]:
    """PIDs of processes with a TCP socket listening on this port (any address)."""
    inodes = {f"socket:[{i}]" for i in _socket_inodes(port)}
    if not inodes:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        pids.append(int(entry.name))
                        break
    return pids


def port_listened(port: int) -> bool:
    return bool(_socket_inodes(port))
