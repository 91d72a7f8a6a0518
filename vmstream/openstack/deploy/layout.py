"""The state folder of a deployment: where each file lives, its ports, passwords and computes.

Everything the deployment writes is under one folder (`Layout.root`), so `down` plus removing
that folder leaves the machine as the packages left it.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vmstream.agentapi import ApiClient
from vmstream.openstack.nova import DRIVER as VMSTREAM_DRIVER

HOST = "127.0.0.1"
REGION = "RegionOne"

# Each service's listening port (all on 127.0.0.1). OpenStack's usual ports, so the catalog
# looks like any other cloud's; `up` refuses to start if another process holds one.
PORTS: dict[str, int] = {
    "mariadb": 3306,
    "rabbitmq": 5672,
    "rabbitmq-dist": 25672,  # Erlang distribution (rabbitmqctl talks to the node through it)
    "epmd": 4369,
    "keystone": 5000,
    "glance": 9292,
    "placement": 8778,
    "nova-api": 8774,
    "neutron": 9696,
}

# computeN's vmstream agent listens on AGENT_PORT_BASE + N (`up --vmstream`).
AGENT_PORT_BASE = 8400

# The service users the catalog gets (besides admin), each with a password of its own.
SERVICE_USERS = ("glance", "placement", "nova", "neutron")
DATABASES = ("keystone", "glance", "placement", "nova_api", "nova", "nova_cell0", "neutron")


@dataclass(frozen=True)
class ComputeSpec:
    """One nova-compute service: its host name, virt driver and any config it needs beyond that.

    `extra` is the seam for vmstream's driver: a compute for a vmstream host carries that
    host's agent URL and token file there, as config sections, e.g.
    `{"vmstream": {"agent_url": "http://127.0.0.1:8400", "token_file": "/.../agent.token"}}`.
    """

    host: str
    driver: str = "fake.FakeDriver"
    extra: dict[str, dict[str, str]] = field(default_factory=dict)

    @staticmethod
    def fake(count: int, driver: str = "fake.FakeDriver") -> list[ComputeSpec]:
        """compute1 ... computeN with one driver (the FakeDriver by default)."""
        return [ComputeSpec(f"compute{i}", driver) for i in range(1, count + 1)]

    @staticmethod
    def vmstream(count: int, layout: Layout, migration_mbps: float | None = None) -> list[ComputeSpec]:
        """compute1 ... computeN with vmstream's driver, each with its own agent (data dir
        agents/computeN, port AGENT_PORT_BASE + N); migration_mbps caps their live moves."""
        cap = {"migration_max_bandwidth_mbps": f"{migration_mbps:g}"} if migration_mbps else {}
        return [ComputeSpec(f"compute{i}", VMSTREAM_DRIVER, {"vmstream": {
            "agent_url": f"http://{HOST}:{AGENT_PORT_BASE + i}",
            "token_file": str(layout.agent_home(f"compute{i}") / "agent.token"), **cap}}) for i in range(1, count + 1)]

    @property
    def agent(self) -> Agent | None:
        """The vmstream agent this compute drives, or None (another driver)."""
        conf = self.extra.get("vmstream")
        if self.driver != VMSTREAM_DRIVER or not conf:
            return None
        port = urlsplit(conf["agent_url"]).port
        if port is None:
            raise ValueError(f"{self.host}: [vmstream] agent_url {conf['agent_url']} names no port")
        return Agent(f"agent-{self.host}", Path(conf["token_file"]).parent, port)


@dataclass(frozen=True)
class Agent:
    """A vmstream agent the deployment runs for one compute: service name, data dir, port."""

    name: str
    home: Path
    port: int

    @property
    def host(self) -> str:
        """The compute host it serves: also its name as the other agents' peer (live migration's destination)."""
        return self.name.removeprefix("agent-")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def token_file(self) -> Path:
        return self.home / "agent.token"

    def client(self, timeout: float) -> ApiClient:
        """The project's agent client for this agent (its token read now: the agent writes it at its start)."""
        return ApiClient(self.url, self.token_file.read_text().strip(), f"the vmstream agent {self.name}", timeout)


@dataclass(frozen=True)
class Secrets:
    """Passwords made once per state folder (mode 600), so a restart reuses the databases."""

    database: str
    rabbitmq: str
    admin: str
    services: dict[str, str]

    @classmethod
    def load_or_create(cls, path: Path) -> Secrets:
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        made = cls(secrets.token_hex(12), secrets.token_hex(12), secrets.token_hex(12),
                   {user: secrets.token_hex(12) for user in SERVICE_USERS})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(made), f, indent=2)
        return made


class Layout:
    """Paths under the state folder. Nothing here touches the disk but `make_dirs`."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.etc = self.root / "etc"
        self.log = self.root / "log"
        self.pids = self.root / "pids"
        self.run = self.root / "run"
        self.mysql_data = self.root / "mysql" / "data"
        self.rabbit = self.root / "rabbit"
        self.keystone = self.root / "keystone"
        self.glance = self.root / "glance"
        self.nova = self.root / "nova"
        self.neutron = self.root / "neutron"
        self.locks = self.root / "locks"
        self.agents = self.root / "agents"  # each vmstream compute's agent data dir (VMSTREAM_HOME)
        self.store = self.root / "store"  # the agents' shared chunk store and live-image catalog (NFS on real hosts)
        self.osc = self.root / "osc"  # vmstream's openstack client plugin: PYTHONPATH in openrc
        self.python = self.root / "python"  # the Nova driver's namespace shim: the vmstream computes' PYTHONPATH
        self.secrets_file = self.root / "secrets.json"
        self.spec_file = self.root / "deployment.json"
        self.bootstrapped = self.root / "bootstrapped"  # written last by a bootstrap that finished
        self.openrc = self.root / "openrc"
        self.cloud_json = self.root / "cloud.json"
        self.lock_file = self.root / "deploy.lock"

    @property
    def mysql_socket(self) -> Path:
        return self.run / "mysqld.sock"

    def conf(self, *parts: str) -> Path:
        return self.etc.joinpath(*parts)

    def service_log(self, name: str) -> Path:
        return self.log / f"{name}.log"

    def compute_state(self, host: str) -> Path:
        return self.nova / host

    def agent_home(self, host: str) -> Path:
        return self.agents / host

    def make_dirs(self, computes: list[ComputeSpec]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # passwords and keys live here
        for d in (self.etc, self.log, self.pids, self.run, self.mysql_data, self.rabbit, self.keystone, self.glance,
                  self.nova, self.neutron, self.locks, self.glance / "images", self.glance / "staging", self.glance / "tasks"):
            d.mkdir(parents=True, exist_ok=True)
        for key_dir in ("fernet-keys", "fernet-receipts", "credential-keys"):
            (self.keystone / key_dir).mkdir(mode=0o700, exist_ok=True)
        for c in computes:
            self.compute_state(c.host).mkdir(parents=True, exist_ok=True)

    # ---- the computes this folder was brought up with
    def load_computes(self) -> list[ComputeSpec] | None:
        if not self.spec_file.is_file():
            return None
        data: dict[str, Any] = json.loads(self.spec_file.read_text())
        return [ComputeSpec(**c) for c in data["computes"]]

    def save_computes(self, computes: list[ComputeSpec]) -> None:
        self.spec_file.write_text(json.dumps({"computes": [asdict(c) for c in computes]}, indent=2))
