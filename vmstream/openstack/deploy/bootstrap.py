"""First-run setup of a state folder: databases, schema syncs, cells, the RabbitMQ user and the
Keystone catalog. Debian's packages configure none of it when installed non-interactively.

The schema syncs are independent per database, so they run in two lanes (Nova's chain, and
Keystone then Glance, Placement, Neutron): about 14 s of work in one lane on 2 cores.
"""

from __future__ import annotations

import glob
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vmstream.openstack.deploy.cloud import Cloud, Credentials
from vmstream.openstack.deploy.configs import ENDPOINTS, KEYSTONE_URL
from vmstream.openstack.deploy.errors import DeployError
from vmstream.openstack.deploy.layout import DATABASES, HOST, REGION, SERVICE_USERS, Layout, Secrets
from vmstream.openstack.deploy.processes import log_tail

Progress = Callable[[str], None]


def clean_env() -> dict[str, str]:
    """The environment for Debian's OpenStack programs: no venv or other Python leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's python3, not pyenv's
    return env


def run(argv: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300,
        hide: tuple[str, ...] = ()) -> str:
    """Run a setup command with its output appended to `log`; its output, or a DeployError.
    Strings in `hide` (passwords on the command line) are shown as *** in the log and errors."""
    t0 = time.monotonic()
    shown = " ".join("***" if a in hide else a for a in argv)
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env={**clean_env(), **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`{shown}` did not finish within {timeout:.0f}s") from None
    with open(log, "a") as f:
        f.write(f"==== {shown} (exit {proc.returncode}, {time.monotonic() - t0:.1f}s)\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise DeployError(f"`{shown}` failed (exit {proc.returncode}); end of its output (all in {log}):\n"
                          + log_tail(log, 15))
    return proc.stdout


def rabbitmq_sbin() -> Path:
    """The server's own scripts (the packaged wrappers su to the rabbitmq user and log to /var/log)."""
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    if not found:
        raise DeployError("rabbitmq-server's scripts are not under /usr/lib/rabbitmq/lib: reinstall rabbitmq-server")
    return Path(found[-1])


def mariadb_install_db(layout: Layout, log: Path) -> None:
    run(["mariadb-install-db", f"--defaults-file={layout.conf('mysql', 'my.cnf')}",
         "--auth-root-authentication-method=normal", "--skip-test-db"], log)


def create_databases(layout: Layout, secrets: Secrets, log: Path) -> None:
    sql = [f"CREATE USER IF NOT EXISTS 'os'@'{HOST}' IDENTIFIED BY '{secrets.database}';"]
    for db in DATABASES:
        sql += [f"CREATE DATABASE IF NOT EXISTS {db};", f"GRANT ALL PRIVILEGES ON {db}.* TO 'os'@'{HOST}';"]
    run(["mariadb", f"--defaults-file={layout.conf('mysql', 'my.cnf')}", "-e", " ".join(sql)], log, hide=(" ".join(sql),))


def rabbitmq_user(secrets: Secrets, env: dict[str, str], log: Path) -> None:
    ctl = str(rabbitmq_sbin() / "rabbitmqctl")
    run([ctl, "add_user", "os", secrets.rabbitmq], log, env, hide=(secrets.rabbitmq,))
    run([ctl, "set_permissions", "-p", "/", "os", ".*", ".*", ".*"], log, env)


def sync_schemas(layout: Layout, secrets: Secrets, log: Path, progress: Progress) -> None:
    """Every service's schema, Keystone's keys and admin, Nova's cells; two lanes at once."""
    k = ["--config-file", str(layout.conf("keystone", "keystone.conf"))]
    nova = ["nova-manage", "--config-file", str(layout.conf("nova", "nova.conf")),
            "--config-file", str(layout.conf("nova", "nova-db.conf"))]
    root = ["--keystone-user", "root", "--keystone-group", "root"]
    lane_a = [
        ["keystone-manage", *k, "db_sync"],
        ["keystone-manage", *k, "fernet_setup", *root],
        ["keystone-manage", *k, "credential_setup", *root],
        ["keystone-manage", *k, "bootstrap", "--bootstrap-password", secrets.admin,
         "--bootstrap-admin-url", KEYSTONE_URL, "--bootstrap-internal-url", KEYSTONE_URL,
         "--bootstrap-public-url", KEYSTONE_URL, "--bootstrap-region-id", REGION],
        ["glance-manage", "--config-file", str(layout.conf("glance", "glance-api.conf")), "db_sync"],
        ["placement-manage", "--config-file", str(layout.conf("placement", "placement.conf")), "db", "sync"],
        ["neutron-db-manage", "--config-file", str(layout.conf("neutron", "neutron.conf")),
         "--config-file", str(layout.conf("neutron", "ml2_conf.ini")), "upgrade", "heads"],
    ]
    lane_b = [[*nova, "api_db", "sync"], [*nova, "cell_v2", "map_cell0"],
              [*nova, "cell_v2", "create_cell", "--name=cell1"], [*nova, "db", "sync"]]
    errors: list[BaseException] = []

    def lane(cmds: list[list[str]], lane_log: Path) -> None:
        try:
            for argv in cmds:
                if errors:
                    return
                words = [a for a in argv if not a.startswith(("/", "-"))]
                progress(f"  {' '.join(words[:3])}")
                run(argv, lane_log, hide=(secrets.admin,))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lane, args=(cmds, log.with_name(f"{log.stem}-{n}.log")), daemon=True)
               for n, cmds in (("identity", lane_a), ("nova", lane_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def create_catalog(cloud: Cloud, secrets: Secrets) -> None:
    """Project `service`, role `service`, a user per service (admin and service roles there),
    and each service with public/internal/admin endpoints. Plain HTTP: 3 s against 27 s through
    the CLI without Keystone's cache."""
    def post(path: str, key: str, body: dict[str, object]) -> str:
        return str(cloud.json("identity", "POST", path, json={key: body})[key]["id"])

    def find(path: str, key: str, name: str) -> str | None:
        items = cloud.json("identity", "GET", path, params={"name": name})[key]
        return str(items[0]["id"]) if items else None

    project = find("/projects", "projects", "service") or post("/projects", "project", {"name": "service", "domain_id": "default"})
    roles = {name: find("/roles", "roles", name) or post("/roles", "role", {"name": name}) for name in ("admin", "service")}
    for user in SERVICE_USERS:
        uid = find("/users", "users", user) or post("/users", "user", {"name": user, "domain_id": "default",
                                                                      "password": secrets.services[user]})
        for role in roles.values():
            cloud.request("identity", "PUT", f"/projects/{project}/users/{uid}/roles/{role}")
    for service_type, (name, url) in ENDPOINTS.items():
        if find("/services", "services", name):
            continue
        sid = post("/services", "service", {"name": name, "type": service_type, "enabled": True})
        for interface in ("public", "internal", "admin"):
            post("/endpoints", "endpoint", {"service_id": sid, "interface": interface, "url": url, "region_id": REGION})


def admin_credentials(secrets: Secrets) -> Credentials:
    return Credentials(auth_url=KEYSTONE_URL, password=secrets.admin, region_name=REGION,
                       endpoints={"identity": KEYSTONE_URL, **{t: url for t, (_, url) in ENDPOINTS.items()}})
