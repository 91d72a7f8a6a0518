"""Every config file of the deployment, rendered from the layout, passwords and computes.

The keys below are the ones that mattered on a real deployment (shared/OPENSTACK-DEPLOY.md);
where a value is there for a measured reason, the comment says so. Files the packages ship
that we only reuse (the paste pipelines) are copied from /etc as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vmstream.openstack.deploy.layout import HOST, PORTS, REGION, VMSTREAM_DRIVER, ComputeSpec, Layout, Secrets

Ini = dict[str, dict[str, str | int | bool]]

KEYSTONE_URL = f"http://{HOST}:{PORTS['keystone']}/v3/"
ENDPOINTS = {  # service type -> (service name, URL) in the catalog
    "image": ("glance", f"http://{HOST}:{PORTS['glance']}"),
    "placement": ("placement", f"http://{HOST}:{PORTS['placement']}"),
    "compute": ("nova", f"http://{HOST}:{PORTS['nova-api']}/v2.1"),
    "network": ("neutron", f"http://{HOST}:{PORTS['neutron']}"),
}
# Paste pipelines shipped by the packages, copied next to our configs.
PASTE_FILES = {
    "/etc/nova/api-paste.ini": ("nova", "api-paste.ini"),
    "/etc/glance/glance-api-paste.ini": ("glance", "glance-api-paste.ini"),
    "/etc/neutron/api-paste.ini": ("neutron", "api-paste.ini"),
}
WSGI_SCRIPTS = {  # uwsgi-served APIs: service -> the package's WSGI script
    "keystone": "/usr/bin/keystone-wsgi-public",
    "placement": "/usr/bin/placement-api",
    "nova-api": "/usr/bin/nova-api-wsgi",
}


def render_ini(sections: Ini) -> str:
    lines: list[str] = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        for key, value in keys.items():
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def db_url(secrets: Secrets, database: str) -> str:
    return f"mysql+pymysql://os:{secrets.database}@{HOST}:{PORTS['mariadb']}/{database}"


def transport_url(secrets: Secrets) -> str:
    return f"rabbit://os:{secrets.rabbitmq}@{HOST}:{PORTS['rabbitmq']}/"


def _password_auth(user: str, password: str) -> dict[str, str | int | bool]:
    """The keystoneauth password plugin's options for a service user in project `service`."""
    return {"auth_type": "password", "auth_url": KEYSTONE_URL, "project_domain_name": "Default",
            "user_domain_name": "Default", "project_name": "service", "username": user, "password": password}


def _authtoken(user: str, secrets: Secrets) -> dict[str, str | int | bool]:
    return {"www_authenticate_uri": KEYSTONE_URL, **_password_auth(user, secrets.services[user])}


def mariadb_cnf(layout: Layout) -> str:
    # The server runs as root with all files under the state folder; a small buffer pool and a
    # lazy log flush because the data is throwaway; 36 connections were seen in use.
    return render_ini({
        "mysqld": {"datadir": str(layout.mysql_data), "socket": str(layout.mysql_socket),
                   "pid-file": str(layout.run / "mysqld.pid"), "port": PORTS["mariadb"], "bind-address": HOST,
                   "user": "root", "skip-name-resolve": 1, "innodb_buffer_pool_size": "128M",
                   "innodb_flush_log_at_trx_commit": 2, "max_connections": 1000,
                   "log-error": str(layout.service_log("mariadb"))},
        "client": {"socket": str(layout.mysql_socket), "user": "root"},
    })


def rabbitmq_env(layout: Layout) -> dict[str, str]:
    """The environment of rabbitmq-server and rabbitmqctl: everything under rabbit/, loopback only."""
    r = layout.rabbit
    return {
        "RABBITMQ_NODENAME": "rabbit@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(PORTS["rabbitmq"]),
        "RABBITMQ_DIST_PORT": str(PORTS["rabbitmq-dist"]),
        "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
        "RABBITMQ_LOG_BASE": str(layout.log / "rabbitmq"),
        "RABBITMQ_PID_FILE": str(layout.run / "rabbitmq.pid"),
        "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(r / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(r / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
        "HOME": str(r),  # the Erlang cookie
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_EPMD_ADDRESS": HOST,
        "ERL_EPMD_PORT": str(PORTS["epmd"]),
    }


def keystone_conf(layout: Layout, secrets: Secrets) -> str:
    k = layout.keystone
    return render_ini({
        "DEFAULT": {},
        "database": {"connection": db_url(secrets, "keystone")},
        "token": {"provider": "fernet"},
        "fernet_tokens": {"key_repository": str(k / "fernet-keys")},
        "fernet_receipts": {"key_repository": str(k / "fernet-receipts")},
        "credential": {"key_repository": str(k / "credential-keys")},
        # Without a cache every token validation took 0.65 s (catalog setup 27 s instead of 3 s,
        # a 10-server delete after 5 min idle 16-19 s): the memory cache is what makes it usable.
        "cache": {"enabled": True, "backend": "dogpile.cache.memory"},
    })


def uwsgi_ini(layout: Layout, service: str, env: dict[str, str]) -> str:
    ini: Ini = {"uwsgi": {
        "plugins": "python3", "http-socket": f"{HOST}:{PORTS[service]}", "wsgi-file": WSGI_SCRIPTS[service],
        "master": True, "processes": 1, "threads": 4, "lazy-apps": True, "die-on-term": True, "need-app": True,
        "buffer-size": 65535,  # Keystone tokens and service tokens make large headers
        # uwsgi's http-socket closes a connection without saying so; keystoneauth then reuses it and
        # gets ConnectionResetError (placement answered 503 and a compute lost its resource provider).
        "add-header": "Connection: close",
    }}
    text = render_ini(ini)
    return text + "".join(f"env = {k}={v}\n" for k, v in env.items())


def uwsgi_env(layout: Layout, service: str) -> dict[str, str]:
    if service == "keystone":
        return {"OS_KEYSTONE_CONFIG_FILES": str(layout.conf("keystone", "keystone.conf"))}
    if service == "placement":
        return {"OS_PLACEMENT_CONFIG_DIR": str(layout.conf("placement"))}
    # nova-api needs the database config (the computes must not see it); the first file is the paste pipeline
    return {"OS_NOVA_CONFIG_DIR": str(layout.conf("nova")), "OS_NOVA_CONFIG_FILES": "api-paste.ini;nova.conf;nova-db.conf"}


def placement_conf(layout: Layout, secrets: Secrets) -> str:
    return render_ini({
        "DEFAULT": {},
        "api": {"auth_strategy": "keystone"},
        "placement_database": {"connection": db_url(secrets, "placement")},
        "keystone_authtoken": _authtoken("placement", secrets),
    })


def glance_conf(layout: Layout, secrets: Secrets) -> str:
    g = layout.glance
    return render_ini({
        "DEFAULT": {"bind_host": HOST, "bind_port": PORTS["glance"], "workers": 1, "enabled_backends": "file:file",
                    "image_cache_dir": str(g / "cache")},
        "database": {"connection": db_url(secrets, "glance")},
        "keystone_authtoken": _authtoken("glance", secrets),
        "paste_deploy": {"flavor": "keystone", "config_file": str(layout.conf("glance", "glance-api-paste.ini"))},
        "glance_store": {"default_backend": "file"},
        "file": {"filesystem_store_datadir": str(g / "images")},
        "os_glance_staging_store": {"filesystem_store_datadir": str(g / "staging")},
        "os_glance_tasks_store": {"filesystem_store_datadir": str(g / "tasks")},
        "oslo_concurrency": {"lock_path": str(layout.locks / "glance")},
    })


def neutron_conf(layout: Layout, secrets: Secrets) -> str:
    return render_ini({
        "DEFAULT": {"bind_host": HOST, "bind_port": PORTS["neutron"], "core_plugin": "ml2", "service_plugins": "",
                    "auth_strategy": "keystone", "transport_url": transport_url(secrets),
                    "api_workers": 0, "rpc_workers": 1, "rpc_state_report_workers": 0,
                    # no agents and no port binding: Nova need not hear about ports
                    "notify_nova_on_port_status_changes": False, "notify_nova_on_port_data_changes": False,
                    "state_path": str(layout.neutron), "api_paste_config": str(layout.conf("neutron", "api-paste.ini")),
                    # its parent waits this long for its RPC worker on SIGTERM (default 60 s: `down` had to SIGKILL it)
                    "graceful_shutdown_timeout": 3},
        "database": {"connection": db_url(secrets, "neutron")},
        "keystone_authtoken": _authtoken("neutron", secrets),
        "oslo_concurrency": {"lock_path": str(layout.locks / "neutron")},
    })


def ml2_conf() -> str:
    # Servers boot with --nic none; Neutron is here because a delete asks it for the ports.
    return render_ini({"ml2": {"type_drivers": "flat", "tenant_network_types": "", "mechanism_drivers": "",
                               "extension_drivers": ""}})


WEIGHER = "vmstream.openstack.nova.weigher.LiveImageCacheWeigher"
SPREAD_WEIGHT = 20  # Nova's soft_anti_affinity_weight_multiplier (default 1.0) against the cache weigher's 10


def nova_conf(layout: Layout, secrets: Secrets, vmstream: bool = False) -> str:
    """What every nova process reads (no database: nova-compute refuses to run with one).
    With vmstream computes: the scheduler weighs hosts by the live images they hold and run
    (the stats at Nova's 60 s refresh: each refresh holds the lock claims queue on), and the
    computes reap deleted live images every 60 s."""
    nova_auth = _password_auth("nova", secrets.services["nova"])
    extra: Ini = {}
    if vmstream:
        # a server group asking for soft anti-affinity (a scaling group's members) spreads over hosts
        # even where only one holds the image: its weigher outweighs the cache weigher's 10
        extra = {"filter_scheduler": {"weight_classes": f"nova.scheduler.weights.all_weighers,{WEIGHER}",
                                      "soft_anti_affinity_weight_multiplier": SPREAD_WEIGHT},
                 "image_cache": {"manager_interval": 60}}
    return render_ini({
        "DEFAULT": {"transport_url": transport_url(secrets), "state_path": str(layout.nova), "my_ip": HOST,
                    "enabled_apis": "osapi_compute", "osapi_compute_workers": 1,
                    # 0: no periodic refresh of every instance's network info from Neutron
                    "heal_instance_info_cache_interval": 0},
        "api": {"auth_strategy": "keystone"},
        "wsgi": {"api_paste_config": str(layout.conf("nova", "api-paste.ini"))},
        "conductor": {"workers": 2},  # a batch of 10 servers: ~3 s of instance saves from the computes, now on both cores
        "scheduler": {"workers": 1, "discover_hosts_in_cells_interval": 10},
        # A live image plus 10 clones is past the default quota of 10 instances.
        "quota": {"instances": 1000, "cores": 2000, "ram": 5120000},
        "keystone_authtoken": _authtoken("nova", secrets),
        "placement": {"region_name": REGION, **_password_auth("placement", secrets.services["placement"])},
        "neutron": {"region_name": REGION, **_password_auth("neutron", secrets.services["neutron"])},
        "service_user": {"send_service_user_token": True, **nova_auth},
        "glance": {"region_name": REGION},
        "vnc": {"enabled": False},
        "oslo_messaging_notifications": {"driver": "noop"},
        "oslo_concurrency": {"lock_path": str(layout.locks / "nova")},
        **extra,
    })


def nova_db_conf(secrets: Secrets) -> str:
    """The database part: nova-api, conductor, scheduler and nova-manage only."""
    return render_ini({"api_database": {"connection": db_url(secrets, "nova_api")},
                       "database": {"connection": db_url(secrets, "nova")}})


def compute_conf(layout: Layout, compute: ComputeSpec) -> str:
    """One compute's overrides: its host name (= its node and resource provider), driver and state."""
    state = layout.compute_state(compute.host)
    sections: Ini = {
        "DEFAULT": {"host": compute.host, "compute_driver": compute.driver, "state_path": str(state),
                    "instances_path": str(state / "instances")},
        "oslo_concurrency": {"lock_path": str(state / "locks")},
    }
    for name, keys in compute.extra.items():
        sections.setdefault(name, {}).update(keys)
    return render_ini(sections)


def rendered(layout: Layout, secrets: Secrets, computes: list[ComputeSpec]) -> dict[Path, str]:
    """Every file we write, by path."""
    files = {
        layout.conf("mysql", "my.cnf"): mariadb_cnf(layout),
        layout.rabbit / "rabbitmq.conf": f"listeners.tcp.1 = {HOST}:{PORTS['rabbitmq']}\n",
        layout.rabbit / "enabled_plugins": "[].\n",
        layout.rabbit / "advanced.config": "[].\n",
        layout.rabbit / "rabbitmq-env.conf": "",
        layout.rabbit / "env.sh": "".join(f"export {k}='{v}'\n" for k, v in rabbitmq_env(layout).items()),
        layout.conf("keystone", "keystone.conf"): keystone_conf(layout, secrets),
        layout.conf("placement", "placement.conf"): placement_conf(layout, secrets),
        layout.conf("glance", "glance-api.conf"): glance_conf(layout, secrets),
        layout.conf("neutron", "neutron.conf"): neutron_conf(layout, secrets),
        layout.conf("neutron", "ml2_conf.ini"): ml2_conf(),
        layout.conf("nova", "nova.conf"): nova_conf(layout, secrets, any(c.driver == VMSTREAM_DRIVER for c in computes)),
        layout.conf("nova", "nova-db.conf"): nova_db_conf(secrets),
    }
    for service in WSGI_SCRIPTS:
        files[layout.conf(service.split("-")[0], "uwsgi.ini")] = uwsgi_ini(layout, service, uwsgi_env(layout, service))
    for c in computes:
        files[layout.conf("nova", f"{c.host}.conf")] = compute_conf(layout, c)
    return files


def write_configs(layout: Layout, secrets: Secrets, computes: list[ComputeSpec]) -> None:
    """Write every config (mode 600: they hold passwords) and copy the packages' paste files."""
    for path, text in rendered(layout, secrets, computes).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
    for source, (service, name) in PASTE_FILES.items():
        shutil.copyfile(source, layout.conf(service, name))
