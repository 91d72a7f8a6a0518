"""AgentClient: finds this data dir's agent, starting it if none runs."""

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

from vmstream.config import agent_token
from vmstream.errors import BY_NAME, AgentUnavailable, VmstreamError

START_TIMEOUT_S = 30.0


class AgentClient:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = env or {}  # for an agent this client starts, e.g. VMSTREAM_STORE of another host
        self.started_agent = False  # True if this client launched the agent
        self._http: httpx.Client | None = None
        self._agent_proc: subprocess.Popen[bytes] | None = None

    def _running(self) -> tuple[int, int] | None:
        """(pid, port) of a live agent for this data dir, or None."""
        try:
            info = json.loads((self.data_dir / "agent.json").read_text())
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

    def connect(self, start: bool = True) -> httpx.Client:
        if self._http is not None:
            return self._http
        found = self._running()
        if found is None and start:
            found = self._start()
        if found is None:
            raise AgentUnavailable(f"no vmstream agent is running for {self.data_dir}")
        self._http = httpx.Client(
            base_url=f"http://127.0.0.1:{found[1]}",
            headers={"Authorization": f"Bearer {agent_token(self.data_dir)}"},
            timeout=httpx.Timeout(600.0, connect=5.0),
        )
        return self._http

    def _start(self) -> tuple[int, int]:
        """Launch `vmstream agent` in the background, detached, logging to agent.log."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "agent.log", "ab") as log:
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
        lines = (self.data_dir / "agent.log").read_text(errors="replace").strip().splitlines()
        errors = [ln for ln in lines[-40:] if re.match(r"^[\w.]+(Error|Exception|Conflict|Input): ", ln)]
        why = errors[-1] if errors else " / ".join(lines[-3:]) or "no output"
        raise AgentUnavailable(f"the vmstream agent did not start: {why} (full log: {self.data_dir / 'agent.log'})")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        http = self.connect()
        try:
            r = http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AgentUnavailable(f"lost contact with the vmstream agent: {exc}") from exc
        if r.status_code >= 400:
            try:
                body = r.json()
                cls = BY_NAME.get(body.get("error", ""), VmstreamError)
                message = body.get("message") or body.get("detail") or r.text
            except ValueError:
                cls, message = VmstreamError, r.text
            raise cls(str(message))
        return r.json()

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
        if self._http is not None:
            self._http.close()
            self._http = None
