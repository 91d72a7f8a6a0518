"""`Deployment`: bring the one-machine OpenStack up, down, and say how it is.

Bring-up order and its readiness checks follow what a real run showed (OPENSTACK-DEPLOY.md):
MariaDB and RabbitMQ; on the first run the databases, schemas and catalog; Keystone; the
other APIs, conductor and scheduler together; the computes once the conductor consumes its
queue (started with it, they lose 10 s to a ping timeout); ready when every compute has sent
a heartbeat newer than its start (a server scheduled to a compute still starting is set to
ERROR by its start-up check) and is mapped to the cell.

Every start goes through one guard: if anything fails, or Ctrl-C or SIGTERM arrives, what
was started is stopped before the error goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from vmstream.errors import Conflict, VmstreamError
from vmstream.openstack.deploy import bootstrap, configs, packages
from vmstream.openstack.deploy.cloud import Cloud, Credentials
from vmstream.openstack.deploy.errors import DeployError, NotRoot, PortInUse, ServiceFailed
from vmstream.openstack.deploy.layout import HOST, PORTS, Agent, ComputeSpec, Layout, Secrets
from vmstream.openstack.deploy.processes import ProcessTable, cmdline, listeners, log_tail, start_ticks
from vmstream.openstack.nova.shim import install_shim
from vmstream.openstack.osc.install import install_plugin

Progress = Callable[[str], None]
DEFAULT_COMPUTES = 2
# Services that answer HTTP, and the URL that says they do (no token needed).
HTTP_ROOTS = {"keystone": f"http://{HOST}:{PORTS['keystone']}/v3", "placement": f"http://{HOST}:{PORTS['placement']}/",
              "glance": f"http://{HOST}:{PORTS['glance']}/", "neutron": f"http://{HOST}:{PORTS['neutron']}/",
              "nova-api": f"http://{HOST}:{PORTS['nova-api']}/"}
NOVA_RPC = ("nova-conductor", "nova-scheduler")
BACKENDS = ("mariadb", "rabbitmq", "epmd")
COMPUTE_PY = "import sys; from nova.cmd.compute import main; sys.exit(main())"
GUEST_BUILD_TIMEOUT_S = 900.0  # a first build of the demo guest on a busy machine
CONTROL_NICE = -5  # the OpenStack services' priority against the guests (the agents and their QEMUs stay at 0)
AGENT_STOP_TIMEOUT_S = 180.0  # destroying every VM of a busy agent


@dataclass
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    answers: bool | None  # None: could not be asked (what it depends on is down)
    detail: str = ""


@dataclass
class UpResult:
    already_up: bool
    timings: dict[str, float] = field(default_factory=dict)
    credentials: Path | None = None
    openrc: Path | None = None


class Deployment:
    """One state folder's OpenStack. `computes`: what `up` starts (default: as last time, or 2
    FakeDriver computes); `progress` gets one line per step (the CLI prints them to stderr)."""

    def __init__(self, root: Path, computes: list[ComputeSpec] | None = None,
                 progress: Progress = packages.stderr_progress) -> None:
        self.layout = Layout(root)
        self.procs = ProcessTable(self.layout.pids)
        self._computes = computes
        self._progress = progress
        self._t0 = time.monotonic()

    def progress(self, line: str) -> None:
        """One progress line, with the seconds since `up` or `down` began."""
        self._progress(f"[{time.monotonic() - self._t0:5.1f}s] {line}")

    # ---- what is there ---------------------------------------------------------------------

    @property
    def computes(self) -> list[ComputeSpec]:
        return self._computes or self.layout.load_computes() or ComputeSpec.fake(DEFAULT_COMPUTES)

    def service_names(self, computes: list[ComputeSpec] | None = None) -> list[str]:
        """Every service in start order."""
        computes = computes or self.computes
        return [*BACKENDS, "keystone", "placement", "glance", "neutron", "nova-api", *NOVA_RPC,
                *(a.name for a in _agents(computes)), *(c.host for c in computes)]

    def credentials(self) -> Credentials:
        if not self.layout.cloud_json.is_file():
            raise DeployError(f"no deployment in {self.layout.root}: run `vmstream openstack up` first")
        return Credentials.load(self.layout.cloud_json)

    def is_up(self) -> bool:
        recorded = self.layout.load_computes()
        return recorded is not None and all(self.procs.running(n) for n in self.service_names(recorded))

    def status(self) -> list[ServiceStatus]:
        """Each service: its PID, whether it runs, and whether it answers (HTTP, TCP, or for the
        Nova RPC services their heartbeat as Nova's service list shows it)."""
        recorded = self.layout.load_computes() or []
        names = self.service_names(recorded) if recorded else list(BACKENDS)
        names += [r.name for r in self.procs.records() if r.name not in names]
        nova_states = self._nova_service_states()
        agent_health = {a.name: a.url + "/health" for a in _agents(recorded)}
        out = []
        for name in names:
            rec = self.procs.get(name)
            running = rec is not None and self.procs.running(name)
            answers: bool | None
            detail = ""
            if not running:
                answers, detail = False, "not running" if rec is None else "exited: see " + rec.log
            elif name in HTTP_ROOTS:
                answers = _http_answers(HTTP_ROOTS[name])
            elif name in agent_health:
                answers = _http_answers(agent_health[name])
            elif name in PORTS:
                answers = _tcp_answers(PORTS[name])
            elif nova_states is None:
                answers, detail = None, "Nova's API does not answer"
            else:
                state = nova_states.get(name)
                answers = state == "up"
                detail = f"nova service {state or 'not registered'}"
            out.append(ServiceStatus(name, rec.pid if rec else None, running, answers, detail))
        return out

    def _nova_service_states(self) -> dict[str, str] | None:
        """host (computes) or binary (conductor, scheduler) -> 'up'/'down', or None if Nova cannot say."""
        if not self.layout.cloud_json.is_file() or not _http_answers(HTTP_ROOTS["nova-api"]):
            return None
        try:
            with Cloud(self.credentials(), timeout=10) as cloud:
                services = cloud.json("compute", "GET", "/os-services")["services"]
        except (DeployError, httpx.HTTPError):
            return None
        return {(s["host"] if s["binary"] == "nova-compute" else s["binary"]): s["state"] for s in services}

    # ---- up --------------------------------------------------------------------------------

    def up(self, install: bool = True) -> UpResult:
        """Install what is missing, bootstrap on the first run, start everything; idempotent."""
        _need_root("run OpenStack's services")
        computes = self.computes
        with self._locked():
            recorded = self.layout.load_computes()
            if recorded is not None and all(self.procs.running(n) for n in self.service_names(recorded)):
                if self._computes is not None and computes != recorded:
                    raise Conflict(f"the deployment in {self.layout.root} is up with computes "
                                   f"{', '.join(c.host for c in recorded)} ({recorded[0].driver}): "
                                   "run `vmstream openstack down` first to change them")
                return UpResult(True, credentials=self.layout.cloud_json, openrc=self.layout.openrc)
            if self.procs.records():
                self.progress(f"partly up ({', '.join(r.name for r in self.procs.records())} recorded): "
                              "stopping what is left, then starting everything")
                self._stop_all()
            timings: dict[str, float] = {}
            t_all = self._t0 = time.monotonic()
            if install:
                missing = packages.missing_packages()
                if missing:
                    self.progress(f"installing {len(missing)} Debian packages: {' '.join(missing)}")
                    timings["install_s"] = packages.install(missing, self.layout.log / "apt.log", self.progress)
                    self.progress(f"installed in {timings['install_s']:.0f}s")
            self._check_ports(computes)
            with _sigterm_raises(), self._stopped_on_failure():
                self._start_all(computes, timings)
            timings["total_s"] = time.monotonic() - t_all
            return UpResult(False, timings, self.layout.cloud_json, self.layout.openrc)

    def _start_all(self, computes: list[ComputeSpec], timings: dict[str, float]) -> None:
        lay = self.layout
        fresh = not lay.bootstrapped.exists()
        if fresh:
            self._wipe_state()
        lay.make_dirs(computes)
        lay.save_computes(computes)
        secrets = Secrets.load_or_create(lay.secrets_file)
        configs.write_configs(lay, secrets, computes)
        agents = _agents(computes)
        if agents:
            install_shim(lay.python)  # Nova imports nova.virt.vmstream from here (the computes' PYTHONPATH)
            install_plugin(lay.osc)  # `openstack live-image ...` with openrc's PYTHONPATH
        boot_log = lay.log / "bootstrap.log"
        t0 = time.monotonic()

        self.progress("starting MariaDB and RabbitMQ" + (" (first run: bootstrapping the databases and catalog)" if fresh else ""))
        if not (lay.mysql_data / "mysql").is_dir():
            bootstrap.mariadb_install_db(lay, boot_log)
        self._start("mariadb", ["/usr/sbin/mariadbd", f"--defaults-file={lay.conf('mysql', 'my.cnf')}"])
        rabbit_env = configs.rabbitmq_env(lay)
        self._start("rabbitmq", [str(bootstrap.rabbitmq_sbin() / "rabbitmq-server")], env=rabbit_env)
        self._wait_port("mariadb", PORTS["mariadb"], 60, also=lay.mysql_socket.exists)
        if fresh:
            bootstrap.create_databases(lay, secrets, boot_log)
        self._wait_port("rabbitmq", PORTS["rabbitmq"], 90, also=self._adopt_epmd)
        self.progress("MariaDB and RabbitMQ answer")
        if fresh:
            rabbit_user = threading.Thread(target=bootstrap.rabbitmq_user, args=(secrets, rabbit_env, boot_log), daemon=True)
            rabbit_user.start()
            bootstrap.sync_schemas(lay, secrets, boot_log, self.progress)
            rabbit_user.join()

        self._start_uwsgi("keystone")
        self._wait_http("keystone", 60)
        self.progress("Keystone answers")
        creds = bootstrap.admin_credentials(secrets)
        creds.save(lay.cloud_json, lay.openrc, lay.osc if agents else None)
        if fresh:
            with Cloud(creds) as cloud:
                bootstrap.create_catalog(cloud, secrets)
            lay.bootstrapped.write_text(datetime.now(UTC).isoformat() + "\n")
            timings["bootstrap_s"] = time.monotonic() - t0
            self.progress(f"bootstrapped in {timings['bootstrap_s']:.0f}s")
        t_start = time.monotonic()

        self.progress("starting Placement, Glance, Neutron, nova-api, nova-conductor, nova-scheduler")
        env = bootstrap.clean_env()
        nova_db = ["--config-file", str(lay.conf("nova", "nova.conf")), "--config-file", str(lay.conf("nova", "nova-db.conf"))]
        self._start_uwsgi("placement")
        self._start("glance", ["/usr/bin/glance-api", "--config-file", str(lay.conf("glance", "glance-api.conf"))], env)
        self._start("neutron", ["/usr/bin/neutron-server", "--config-file", str(lay.conf("neutron", "neutron.conf")),
                                "--config-file", str(lay.conf("neutron", "ml2_conf.ini"))], env)
        self._start_uwsgi("nova-api")
        self._start("nova-conductor", ["/usr/bin/nova-conductor", *nova_db], env)
        # the scheduler loads vmstream's weigher through the same directory as the computes' driver
        self._start("nova-scheduler", ["/usr/bin/nova-scheduler", *nova_db], {**env, "PYTHONPATH": str(lay.python)} if agents else env)
        for agent in agents:
            self._start_agent(agent)
        self._wait_conductor_consumes(rabbit_env, 120)
        self.progress("nova-conductor consumes its queue")
        if agents:
            self._agents_ready(agents)
        self.progress(f"starting {len(computes)} computes ({', '.join(c.host for c in computes)})")
        started = datetime.now(UTC).replace(microsecond=0, tzinfo=None)  # Nova's times: naive UTC, whole seconds in MariaDB
        for c in computes:
            # Debian's python3 finds the vmstream driver through the shim (and vmstream through its link there)
            compute_env = {**env, "PYTHONPATH": str(lay.python)} if c.agent else env
            self._start(c.host, ["/usr/bin/python3", "-c", COMPUTE_PY, "--config-file", str(lay.conf("nova", "nova.conf")),
                                 "--config-file", str(lay.conf("nova", f"{c.host}.conf"))], compute_env)
        for name in ("placement", "glance", "neutron", "nova-api"):
            self._wait_http(name, 120)
        self.progress("the APIs answer; waiting for the computes' first heartbeats")
        with Cloud(creds) as cloud:
            # Neutron bug: if its first request is a port list (nova-api makes one per server list and
            # per delete), every port list fails with 500 until another query has run.
            cloud.request("network", "GET", "/v2.0/networks")
            self._wait_heartbeats(cloud, computes, started, 120)
            self.progress("every compute has sent a heartbeat")
            self._discover_hosts(cloud, computes, nova_db, boot_log)
            if agents:  # what a first server needs: a flavor and the demo guest's Glance image
                cloud.ensure_flavor()
                cloud.ensure_demo_image()
        timings["start_s"] = time.monotonic() - t_start
        self.progress(f"up in {time.monotonic() - t0:.0f}s: credentials in {lay.openrc} (`. {lay.openrc}; openstack server list`)")

    # ---- starting and waiting ------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """An OpenStack service, at CONTROL_NICE: on this one machine the control plane shares
        two cores with the guests, which on a cloud run on other hosts than its controllers."""
        self.procs.start(name, argv, self.layout.service_log(name), env={**bootstrap.clean_env(), **(env or {})},
                         cwd=self.layout.run, nice=CONTROL_NICE)

    def _start_agent(self, agent: Agent) -> None:
        """A vmstream agent for one compute: this vmstream's Python, its own data dir and port,
        none of the caller's other VMSTREAM_* settings (they belong to the caller's agent)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMSTREAM_")}
        env["VMSTREAM_HOME"] = str(agent.home)
        env["VMSTREAM_STORE"] = str(self.layout.store)  # one store for all: a live image made on one host starts on any
        agent.home.mkdir(parents=True, exist_ok=True)
        self.procs.start(agent.name, [sys.executable, "-m", "vmstream", "agent", "--port", str(agent.port)],
                         self.layout.service_log(agent.name), env=env, cwd=self.layout.run)

    def _agents_ready(self, agents: list[Agent]) -> None:
        """Each agent answers and has its demo guest built (a first build takes minutes; in the
        first server's boot it would be counted as boot time)."""
        for agent in agents:
            def answers(a: Agent = agent) -> bool:
                return a.token_file.is_file() and _http_answers(a.url + "/health")

            self._wait(agent.name, answers, 60, f"answer {agent.url}/health")
        self.progress(f"{len(agents)} vmstream agents answer; building their demo guests (cached in their data dirs)")

        def build(agent: Agent) -> None:
            try:
                with agent.client(GUEST_BUILD_TIMEOUT_S) as client:
                    client.call("POST", "/v1/guest/build", json={})
            except VmstreamError as exc:
                raise self._failed(agent.name, f"could not build the demo guest ({exc})") from exc

        with ThreadPoolExecutor(len(agents)) as pool:
            list(pool.map(build, agents))
        self._peer_agents(agents)

    def _peer_agents(self, agents: list[Agent]) -> None:
        """Every agent knows every other as a peer named after its compute host: Nova's live
        migration names the destination compute, and the source agent moves the VM there."""
        for agent in agents:
            with agent.client(30) as client:
                for other in agents:
                    if other is not agent:
                        client.call("PUT", f"/v1/peers/{other.host}",
                                    json={"url": other.url, "token": other.token_file.read_text().strip()})

    def _start_uwsgi(self, service: str) -> None:
        ini = self.layout.conf(service.split("-")[0], "uwsgi.ini")
        self._start(service, ["/usr/bin/uwsgi", "--ini", str(ini)])

    def _failed(self, name: str, why: str) -> ServiceFailed:
        log = self.layout.service_log(name)
        return ServiceFailed(f"{name} {why}; the end of its log ({log}):\n{log_tail(log)}")

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.2) -> None:
        """Until ready() holds; a ServiceFailed with the log's end if the service exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.procs.running(name):
                code = self.procs.exited(name)
                raise self._failed(name, "exited" + (f" with {code}" if code is not None else "") + f" before {what}")
            if time.monotonic() > deadline:
                raise self._failed(name, f"did not {what} within {timeout:.0f}s")
            time.sleep(poll_s)

    def _wait_port(self, name: str, port: int, timeout: float, also: Callable[[], Any] = lambda: True) -> None:
        self._wait(name, lambda: bool(also()) and _tcp_answers(port), timeout, f"listen on {HOST}:{port}")

    def _wait_http(self, name: str, timeout: float) -> None:
        self._wait(name, lambda: _http_answers(HTTP_ROOTS[name]), timeout, f"answer {HTTP_ROOTS[name]}", 0.25)

    def _adopt_epmd(self) -> bool:
        """Record the epmd RabbitMQ started (it daemonises out of our session): the process
        listening on its port, started after RabbitMQ was (the port was free before)."""
        if self.procs.get("epmd"):
            return True
        rabbit = self.procs.get("rabbitmq")
        for pid in listeners(PORTS["epmd"]):
            ticks = start_ticks(pid)
            if rabbit and ticks is not None and ticks >= rabbit.start_ticks and "epmd" in cmdline(pid):
                self.procs.adopt("epmd", pid, self.layout.service_log("rabbitmq"))
                return True
        return False

    def _wait_conductor_consumes(self, rabbit_env: dict[str, str], timeout: float) -> None:
        ctl = [str(bootstrap.rabbitmq_sbin() / "rabbitmqctl"), "list_queues", "--quiet", "--no-table-headers", "name", "consumers"]

        def consumes() -> bool:
            out = subprocess.run(ctl, capture_output=True, text=True, env={**bootstrap.clean_env(), **rabbit_env}).stdout
            return any(line.split()[:1] == ["conductor"] and line.split()[-1] != "0" for line in out.splitlines())

        self._wait("nova-conductor", consumes, timeout, "consume its RabbitMQ queue", 0.5)

    def _wait_heartbeats(self, cloud: Cloud, computes: list[ComputeSpec], since: datetime, timeout: float) -> None:
        """Until every compute is up with a heartbeat after `since`: one still starting would set a
        server it is given to ERROR (and 'up' is stale for 60 s after a restart)."""
        pending = {c.host for c in computes}

        def fresh() -> bool:
            for s in cloud.json("compute", "GET", "/os-services", params={"binary": "nova-compute"})["services"]:
                beat = s.get("updated_at")
                if s["host"] in pending and s["state"] == "up" and beat and datetime.fromisoformat(beat[:19]) >= since:
                    pending.discard(s["host"])
            return not pending

        deadline = time.monotonic() + timeout
        while not fresh():
            for host in pending:
                if not self.procs.running(host):
                    raise self._failed(host, "exited before its first heartbeat")
            if time.monotonic() > deadline:
                host = sorted(pending)[0]
                raise self._failed(host, f"sent no heartbeat within {timeout:.0f}s (waiting for {', '.join(sorted(pending))})")
            time.sleep(0.5)

    def _discover_hosts(self, cloud: Cloud, computes: list[ComputeSpec], nova_db: list[str], log: Path) -> None:
        """Map new computes to cell1 at once (the scheduler would within 10 s); known ones need nothing."""
        mapped_file = self.layout.root / "mapped_hosts.json"
        mapped = set(json.loads(mapped_file.read_text())) if mapped_file.is_file() else set()
        new = {c.host for c in computes} - mapped
        if not new:
            return
        deadline = time.monotonic() + 60
        while True:  # the compute node row is written by the compute's first resource update
            hypervisors = {h["hypervisor_hostname"] for h in cloud.json("compute", "GET", "/os-hypervisors")["hypervisors"]}
            if not new - hypervisors:
                break
            if time.monotonic() > deadline:
                raise DeployError(f"computes {', '.join(sorted(new - hypervisors))} sent heartbeats but made no compute "
                                  f"node within 60s (hypervisors: {sorted(hypervisors)}): see their logs in {self.layout.log}")
            time.sleep(0.5)
        bootstrap.run(["nova-manage", *nova_db, "cell_v2", "discover_hosts"], log)
        mapped_file.write_text(json.dumps(sorted(mapped | new)))

    # ---- down ------------------------------------------------------------------------------

    def down(self) -> dict[str, Any]:
        """Stop every process this folder's deployment started, and nothing else; idempotent."""
        _need_root("stop OpenStack's services")
        with self._locked():
            if not self.procs.records():
                return {"stopped": [], "killed": [], "seconds": 0.0}
            t0 = self._t0 = time.monotonic()
            stopped = [r.name for r in self.procs.records()]
            killed = self._stop_all()
            return {"stopped": stopped, "killed": killed, "seconds": round(time.monotonic() - t0, 2)}

    def _stop_all(self) -> list[str]:
        """APIs and Nova at once, then RabbitMQ (shut down through rabbitmqctl) and epmd, then MariaDB."""
        self._adopt_epmd()  # a failed start may not have recorded it yet
        self._stop_agents_vms()
        names = [r.name for r in self.procs.records()]
        killed = self.procs.stop([n for n in names if n not in BACKENDS])
        if self.procs.running("rabbitmq"):
            ctl = [str(bootstrap.rabbitmq_sbin() / "rabbitmqctl"), "shutdown", "--timeout", "20"]
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(ctl, capture_output=True, timeout=40,
                               env={**bootstrap.clean_env(), **configs.rabbitmq_env(self.layout)})
        killed += self.procs.stop(["rabbitmq", "epmd"])
        killed += self.procs.stop(["mariadb"], wait_s=30)  # InnoDB's clean shutdown
        self._kill_agents_leftovers()
        left = [r.name for r in self.procs.records()]
        if left:
            raise DeployError(f"could not stop {', '.join(left)}: see `ps` and {self.layout.pids}")
        return killed

    def _recorded_agents(self) -> list[Agent]:
        return _agents(self.layout.load_computes() or [])

    def _stop_agents_vms(self) -> None:
        """Ask each running agent to destroy its VMs and exit: its QEMUs and memfs run in
        sessions of their own (VMs outlive an agent by design), so SIGTERM alone would leave them."""
        def shutdown(agent: Agent) -> None:
            if not self.procs.running(agent.name):
                return
            try:
                with agent.client(AGENT_STOP_TIMEOUT_S) as client:
                    client.call("POST", "/v1/agent/shutdown", params={"destroy_vms": True})
            except (OSError, VmstreamError) as exc:
                self.progress(f"{agent.name} did not destroy its VMs ({exc}); its leftovers are stopped after it")

        agents = self._recorded_agents()
        if agents:
            self.progress(f"destroying the VMs of {len(agents)} vmstream agents")
            with ThreadPoolExecutor(len(agents)) as pool:
                list(pool.map(shutdown, agents))

    def _kill_agents_leftovers(self) -> None:
        """After the agents: any process still running from an agent's data dir (a QEMU or memfs
        it could not stop) is ours by its command line, and goes."""
        for agent in self._recorded_agents():
            marker = str(agent.home) + "/"
            pids = [p for p in _pids_mentioning(marker) if p != os.getpid()]
            for pid in pids:
                self.progress(f"stopping PID {pid} left by {agent.name}: {cmdline(pid)[:80]}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # ---- guards ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        with open(self.layout.lock_file, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict(f"another `vmstream openstack` up or down is running on {self.layout.root}: "
                               "wait for it to finish") from None
            yield

    @contextlib.contextmanager
    def _stopped_on_failure(self) -> Iterator[None]:
        """The start guard: any failure or interruption stops what was started, then goes on."""
        try:
            yield
        except BaseException:
            self.progress("stopping what was started")
            with contextlib.suppress(Exception):
                self._stop_all()
            raise

    def _check_ports(self, computes: list[ComputeSpec]) -> None:
        ports = {**PORTS, **{a.name: a.port for a in _agents(computes)}}
        for service, port in ports.items():
            pids = listeners(port)
            if pids:
                who = ", ".join(f"PID {p} ({cmdline(p)[:60]})" for p in pids)
                raise PortInUse(f"port {port} ({service}) on this machine is in use by {who}: stop that process "
                                "(it is not one this deployment started), then run `vmstream openstack up` again")

    def _wipe_state(self) -> None:
        """A first run, or one whose bootstrap did not finish: start from empty databases."""
        lay = self.layout
        for d in (lay.mysql_data, lay.rabbit / "mnesia", lay.keystone, lay.glance, lay.nova, lay.neutron, lay.locks):
            shutil.rmtree(d, ignore_errors=True)
        (lay.root / "mapped_hosts.json").unlink(missing_ok=True)


# ---- helpers ---------------------------------------------------------------------------------


def _agents(computes: list[ComputeSpec]) -> list[Agent]:
    return [a for a in (c.agent for c in computes) if a is not None]


def _pids_mentioning(text: str) -> list[int]:
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRoot(f"`vmstream openstack` must run as root to {what} (it installs packages and runs "
                      "MariaDB, RabbitMQ and OpenStack's services as root): run it with sudo or as root")


def _tcp_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


def _http_answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code < 500
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM during `up` unwinds like Ctrl-C, so the start guard stops what was started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
