"""The python-openstackclient plugin module (entry point `openstack.cli.extension: vmstream`).

osc imports it at start-up, registers the command group `openstack.vmstream.v1` from API_NAME
and the version, and calls make_client the first time a command touches
`client_manager.vmstream` (after osc authenticated, so instance.session is ready).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from keystoneauth1.adapter import Adapter

import vmstream
from vmstream.openstack.osc import logic
from vmstream.openstack.osc.client import LiveImageClient

API_NAME = "vmstream"
API_VERSION_OPTION = "os_vmstream_api_version"
DEFAULT_API_VERSION = "1"
API_VERSIONS = {"1": "vmstream.openstack.osc.client.LiveImageClient"}


def make_client(instance: Any) -> LiveImageClient:
    """Nova and Glance adapters on osc's authenticated session, in the user's region and interface."""
    common: dict[str, Any] = {
        "session": instance.session,
        "interface": instance.interface,
        "region_name": instance.region_name,
        "client_name": "vmstream-osc-plugin",
        "client_version": vmstream.__version__,
        "raise_exc": False,  # the client reads Nova's and Glance's error bodies itself
    }
    compute = Adapter(service_type="compute", default_microversion=logic.COMPUTE_MICROVERSION, **common)
    image = Adapter(service_type="image", **common)
    return LiveImageClient(compute, image)


def build_option_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """osc's global option for this plugin's API version (there is one: 1)."""
    parser.add_argument(
        "--os-vmstream-api-version",
        metavar="<vmstream-api-version>",
        default=os.environ.get("OS_VMSTREAM_API_VERSION", DEFAULT_API_VERSION),
        help=f"vmstream live-image commands' API version, default={DEFAULT_API_VERSION} (Env: OS_VMSTREAM_API_VERSION)",
    )
    return parser
