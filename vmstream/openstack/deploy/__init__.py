"""A one-machine OpenStack from Debian's packages, started and stopped by vmstream.

    packages.py    what to apt-get install (only what is missing), services kept from starting
    layout.py      the state folder: paths, ports, passwords, the computes' specs
    configs.py     every config file, rendered from the layout (pure: no I/O but writing)
    processes.py   the PID table: start, identify, stop exactly what was started
    cloud.py       a small HTTP client for Keystone, Nova, Glance, Placement, Neutron
    bootstrap.py   databases, db syncs, cells, the RabbitMQ user, the Keystone catalog
    deployment.py  `Deployment`: up (under one guard), down, status

Everything listens on 127.0.0.1 and every file lives in the state folder; the packages are
the only thing put elsewhere.
"""

from vmstream.openstack.deploy.deployment import Deployment, ServiceStatus
from vmstream.openstack.deploy.errors import DeployError, NotRoot, PortInUse, ServiceFailed
from vmstream.openstack.deploy.layout import ComputeSpec, Layout

__all__ = ["ComputeSpec", "DeployError", "Deployment", "Layout", "NotRoot", "PortInUse", "ServiceFailed", "ServiceStatus"]
