"""Where a VM serves a guest port, from the agent API's description of it (VmInfo as JSON):
what a balancer adds as a member, whichever host runs the VM and whoever started it."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from vmstream.errors import InvalidInput


def serving_address(vm: Mapping[str, Any], guest_port: int, where: str = "") -> tuple[str, int]:
    """(host, port) to reach the VM's guest_port: its own address on a bridged host (endpoint
    http://IP/), else its port forward on its host's 127.0.0.1 (endpoint for port 80, `ports`
    for the others), which only a balancer on that machine reaches. where: said in the error."""
    url = urllib.parse.urlsplit(vm["endpoint"])
    host = url.hostname or "127.0.0.1"
    if url.port is None:  # http://IP/: the VM's own address
        return host, guest_port
    if guest_port == 80:
        return host, url.port
    port = (vm.get("ports") or {}).get(str(guest_port))
    if port is None:
        raise InvalidInput(f"VM {vm['name']}{where} does not publish guest port {guest_port}")
    return host, int(port)
