"""What every bench needs: the agent, tagged names, cleanup, memory and HTTP probes."""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmstream.agentapi import AgentClient
from vmstream.guest.status import get_status
from vmstream.host.footprint import meminfo

MIB = 1 << 20


def say(msg: str) -> None:
    """Progress goes to stderr: stdout carries the result (with --json, exactly one JSON object)."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class HostFacts:
    accelerator: str
    accelerator_reason: str
    qemu_version: str
    kernel: Path
    initrd: Path
    kernel_release: str
    cpus: int
    mem_total_bytes: int


def mem_available() -> int:
    return meminfo()["MemAvailable"]


def pss(pid: int) -> int:
    """Proportional set size of one process: shared pages count 1/n to each of n mappers."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no Pss line in /proc/{pid}/smaps_rollup")


async def http_answer(port: int, timeout: float = 1.0) -> dict[str, Any]:
    """GET the demo guest's /status.json over a bare socket (no httpx client set-up cost)."""
    return await get_status(port, timeout=timeout)


# Clone starts measured one by one are this far apart (after the previous clone is gone), as
# requests from users would be, not back to back: the agent refills its clone pool in between.
# Both the pooled and the pool-off runs are spaced alike.
CLONE_SPACING_S = 0.25


class Bench:
    """One bench run: its agent client, its name tag, and what it must remove.

    Every VM and image is named '<tag>-...', and cleanup removes by tag, so an
    interrupted run leaves nothing behind even if a request was in flight.
    """

    def __init__(self, out: Path, client: AgentClient) -> None:
        self.data_dir = client.data_dir
        self.client = client
        self.tag = "bn" + secrets.token_hex(2)
        self.out = out
        self.scratch = self.data_dir / "bench" / self.tag  # QEMU baseline state files and run dirs
        self._facts: HostFacts | None = None

    def name(self, *parts: object) -> str:
        return "-".join([self.tag, *(str(p) for p in parts)])

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.call(method, path, **kwargs)

    def facts(self) -> HostFacts:
        if self._facts is None:
            self.call("POST", "/v1/guest/build", json={})
            info = self.call("GET", "/v1/info")
            import os

            self._facts = HostFacts(
                accelerator=info["accelerator"], accelerator_reason=info["accelerator_reason"],
                qemu_version=info["qemu_version"], kernel=Path(info["guest"]["kernel"]),
                initrd=Path(info["guest"]["initrd"]), kernel_release=info["guest"]["kernel_release"],
                cpus=os.cpu_count() or 1, mem_total_bytes=meminfo()["MemTotal"],
            )
        return self._facts

    # ---- agent operations, timed from the client's side (what a user waits) ----

    def boot(self, name: str, mib: int, client: AgentClient | None = None, disk: str | None = None) -> tuple[dict[str, Any], float]:
        """Cold-boot the demo guest, or a disk guest (disk: 'debian' or an image path); returns when it is ready."""
        body: dict[str, Any] = {"name": name, "memory": f"{mib}M", "cpus": 1}
        if disk is not None:
            body["disk"] = disk
        t0 = time.perf_counter()
        vm = (client or self.client).call("POST", "/v1/vms", json=body)
        return vm, time.perf_counter() - t0

    def create_image(self, vm: str, image: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "/v1/live-images", json={"vm": vm, "name": image})
        return result

    def start(self, image: str, count: int, prefix: str, pool: bool = True) -> tuple[list[dict[str, Any]], float]:
        t0 = time.perf_counter()
        res = self.call("POST", f"/v1/live-images/{image}/start", json={"count": count, "name": prefix, "pool": pool})
        return res["vms"], time.perf_counter() - t0

    def destroy(self, *names: str) -> None:
        for n in names:
            with contextlib.suppress(Exception):
                self.call("DELETE", f"/v1/vms/{n}")

    def delete_image(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.call("DELETE", f"/v1/live-images/{name}")

    def cleanup(self) -> None:
        """Destroy every VM and image carrying this run's tag; remove scratch files."""
        import shutil

        with contextlib.suppress(Exception):  # a group first: it would start its members again
            for group in self.call("GET", "/v1/groups"):
                if group["name"].startswith(self.tag + "-"):
                    self.call("DELETE", f"/v1/groups/{group['name']}", timeout=120)
        with contextlib.suppress(Exception):
            vms = [v["name"] for v in self.call("GET", "/v1/vms") if v["name"].startswith(self.tag + "-")]
            self.destroy(*reversed(vms))
            for img in self.call("GET", "/v1/live-images"):
                if img["name"].startswith(self.tag + "-"):
                    self.delete_image(img["name"])
        shutil.rmtree(self.scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.scratch.parent.rmdir()

    @contextlib.contextmanager
    def session(self) -> Iterator[Bench]:
        """Clean up on the way out, also after an error or Ctrl-C."""
        try:
            yield self
        finally:
            say("cleaning up")
            self.cleanup()
