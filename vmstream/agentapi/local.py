"""AgentClient: this data dir's agent, found through agent.json and started if none runs.

The agent writes agent.json (pid, port) once it listens and keeps its token in agent.token
(vmstream.host.server); this side only reads them, so it needs nothing above vmstream.errors.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from vmstream.agentapi.client import ApiClient
from vmstream.errors import AgentUnavailable

START_TIMEOUT_S = 30.0
TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # a boot or a big capture answers when it is done
INFO_FILE = "agent.json"
TOKEN_FILE = "agent.token"
LOG_FILE = "agent.log"


class AgentClient:
    """The agent of one data dir, started in the background (detached, logging to agent.log) when none runs."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = env or {}  # for an agent this client starts, e.g. VMSTREAM_STORE of another host
        self.started_agent = False  # True if this client launched the agent
        self._api: ApiClient | None = None
        self._agent_proc: subprocess.Popen[bytes] | None = None

    def _running(self) -> tuple[int, int] | None:
        """(pid, port) of a live agent for this data dir, or None."""
        try:
            info = json.loads((self.data_dir / INFO_FILE).read_text())
            pid, port = int(info["pid"]), int(info["port"])
        except (FileNotFoundError, ValueError, KeyError):
            return None
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0)
            if r.status_code == 200 and r.json().get("pid") == pid:
                return pid, port
        except httpx.HTTPError:
            pass
        return None

    def _token(self, pid: int) -> str:
        try:
            return (self.data_dir / TOKEN_FILE).read_text().strip()
        except OSError as exc:
            raise AgentUnavailable(f"the vmstream agent for {self.data_dir} runs (pid {pid}) but its token "
                                   f"{self.data_dir / TOKEN_FILE} cannot be read ({exc.strerror}): stop that process and "
                                   "run the command again to start a new agent") from exc

    def connect(self, start: bool = True) -> ApiClient:
        """The API client of the running agent; starts the agent first if none runs and start is True."""
        if self._api is not None:
            return self._api
        found = self._running()
        if found is None and start:
            found = self._start()
        if found is None:
            raise AgentUnavailable(f"no vmstream agent is running for {self.data_dir}")
        pid, port = found
        self._api = ApiClient(
            f"http://127.0.0.1:{port}", self._token(pid), "the vmstream agent", TIMEOUT, prefix_errors=False,
            token_fix=f"it holds another token than {self.data_dir / TOKEN_FILE}: stop that agent (pid {pid}) and run the "
                      "command again to start one with the current token",
        )
        return self._api

    def _start(self) -> tuple[int, int]:
        """Launch `vmstream agent` in the background, detached, logging to agent.log."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the agent keeps it 0700 (vmstream.config.private_dir)
        with open(os.open(self.data_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmstream", "agent"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **self.env, "VMSTREAM_HOME": str(self.data_dir)},
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = self._running()
            if found is not None:
                self.started_agent = True
                self._agent_proc = proc
                return found
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        lines = (self.data_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()
        errors = [ln for ln in lines[-40:] if re.match(r"^[\w.]+(Error|Exception|Conflict|Input): ", ln)]
        why = errors[-1] if errors else " / ".join(lines[-3:]) or "no output"
        raise AgentUnavailable(f"the vmstream agent did not start: {why} (full log: {self.data_dir / LOG_FILE})")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call (kwargs as httpx); starts the agent if none runs."""
        try:
            return self.connect().call(method, path, **kwargs)
        except AgentUnavailable as exc:
            if not isinstance(exc.__cause__, httpx.HTTPError):  # the agent's own answer (e.g. a peer it cannot reach)
                raise
            raise AgentUnavailable(f"{exc} (the agent's log: {self.data_dir / LOG_FILE})") from exc.__cause__

    def stop_agent(self, destroy_vms: bool = False, timeout: float = 30.0) -> bool:
        """Ask the agent to exit (optionally destroying every VM first); wait for it."""
        found = self._running()
        if found is None:
            return False
        self.call("POST", "/v1/agent/shutdown", params={"destroy_vms": destroy_vms})
        pid = found[0]
        if self._agent_proc is not None and self._agent_proc.pid == pid:
            try:
                self._agent_proc.wait(timeout)  # our own child: reap it, or kill -0 sees a zombie
                return True
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        return True

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None
