"""The Debian packages the deployment runs on, installed with apt-get when any is missing.

Not the nova-compute package: it pulls libvirt and nova-compute-kvm; the compute service is
run from python3-nova (which nova-api brings). ML2 is in python3-neutron; uwsgi comes in as
a dependency of the API packages.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vmstream.openstack.deploy.errors import DeployError

PACKAGES = ("mariadb-server", "rabbitmq-server", "keystone", "glance-api", "placement-api", "nova-api",
            "nova-conductor", "nova-scheduler", "neutron-server", "python3-openstackclient",
            "python3-httpx")  # vmstream's Nova driver talks to its agent with httpx, under Debian's python3
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Exit 101 tells invoke-rc.d "action forbidden": the packages' postinst scripts then start no
# service (they would bind the usual ports on all addresses, with /etc's configs).
_POLICY = "#!/bin/sh\n# written by vmstream openstack up while it installs packages; removed afterwards\nexit 101\n"


def missing_packages(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """The packages not installed (one dpkg-query; cheap when all are there)."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages],
                         capture_output=True, text=True).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith("install ok installed")}
    return [p for p in packages if p not in installed]


@contextlib.contextmanager
def services_kept_down() -> Iterator[None]:
    """A policy-rc.d that forbids starting services, for the install only; one already there
    (containers often have one) is left as it is."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text(_POLICY)
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def install(packages: list[str], log: Path, progress: Callable[[str], None]) -> float:
    """apt-get update, then install the given packages without recommends; returns seconds taken."""
    if os.geteuid() != 0:
        raise DeployError(f"installing {' '.join(packages)} needs root: run as root, or install them with apt-get first")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    steps = [["apt-get", "update", "-q"],
             ["apt-get", "install", "-y", "-q", "--no-install-recommends",
              "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold", *packages]]
    with services_kept_down(), open(log, "ab") as out:
        for argv in steps:
            progress(f"  {' '.join(argv[:2])} ({len(packages)} packages and their dependencies; log: {log})"
                     if argv[1] == "install" else "  apt-get update")
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
            if rc != 0:
                raise DeployError(f"`{' '.join(argv[:2])}` failed (exit {rc}); its output is in {log}:\n"
                                  + _tail(log))
    still = missing_packages(tuple(packages))
    if still:
        raise DeployError(f"apt-get finished but {' '.join(still)} is not installed; see {log}")
    return time.monotonic() - t0


def _tail(log: Path, lines: int = 12) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
