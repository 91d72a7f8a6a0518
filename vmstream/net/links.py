"""Owner objects for network resources: each removes what it made.

Everything here lives inside network namespaces this package creates, so a
mistake can never touch the root namespace's routing or a device someone
else made. Each object is a context manager; creation that fails half-way
removes the part already made before the error propagates.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from vmstream.errors import VmstreamError

IFNAMSIZ = 15  # usable characters in a Linux interface name
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


class NetError(VmstreamError):
    """An ip/bridge command failed; the message carries its stderr."""


def _check_name(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or " " in name:
        raise NetError(f"bad interface/namespace name {name!r}: 1-{IFNAMSIZ} characters, no '/' or space")
    return name


def run(args: list[str], netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ip/bridge (or any command) inside netns; NetError with stderr on failure."""
    cmd = args if netns is None else ["ip", "netns", "exec", netns, *args]
    if netns is not None and args and args[0] in ("ip", "bridge"):
        cmd = [args[0], "-n", netns, *args[1:]]  # no mount namespace needed: cheaper
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetError(f"'{' '.join(cmd)}' failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def unique_prefix(base: str = "vm") -> str:
    """A short random prefix (e.g. 'vm3fa2'), so concurrent test runs never collide."""
    return f"{base}{secrets.token_hex(2)}"


def random_mac(first: str = "52") -> str:
    """A random unicast MAC; '02' makes it locally administered."""
    return f"{first}:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


class _Owned:
    """A resource made in __enter__ and removed in close(), also on failure."""

    def __enter__(self) -> _Owned:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def create(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Netns(_Owned):
    """A network namespace (a 'host' of the test bed); deleting it removes its devices."""

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)
        self._made = False

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def create(self) -> None:
        if self.path.exists():
            raise NetError(f"network namespace {self.name} already exists: choose another prefix")
        run(["ip", "netns", "add", self.name])
        self._made = True
        run(["ip", "link", "set", "lo", "up"], self.name)

    def close(self) -> None:
        if self._made:
            run(["ip", "netns", "del", self.name], check=False)
            self._made = False

    def exists(self) -> bool:
        return self.path.exists()


class Bridge(_Owned):
    """A Linux bridge inside a namespace, optionally with an address (the host's own)."""

    def __init__(self, name: str, netns: str, address: str | None = None) -> None:
        self.name = _check_name(name)
        self.netns = netns
        self.address = address
        self._made = False

    def create(self) -> None:
        # forward_delay 0 and no STP: a port forwards at once when a tap or veth joins.
        # A fixed MAC: otherwise the bridge takes its lowest port's, which changes as
        # VM taps come and go, and peers keep sending to the old one for seconds.
        run(["ip", "link", "add", self.name, "address", random_mac("02"), "type", "bridge", "stp_state", "0",
             "forward_delay", "0"], self.netns)
        self._made = True
        if self.address:
            run(["ip", "addr", "add", self.address, "dev", self.name], self.netns)
        run(["ip", "link", "set", self.name, "up"], self.netns)

    def close(self) -> None:
        if self._made:
            run(["ip", "link", "del", self.name], self.netns, check=False)
            self._made = False


class Veth(_Owned):
    """A veth pair from (ns_a, name_a) to (ns_b, name_b); either end may join a bridge and get an address."""

    def __init__(
        self, ns_a: str, name_a: str, ns_b: str, name_b: str,
        master_a: str | None = None, master_b: str | None = None, address_b: str | None = None,
    ) -> None:
        self.ns_a, self.name_a = ns_a, _check_name(name_a)
        self.ns_b, self.name_b = ns_b, _check_name(name_b)
        self.master_a, self.master_b, self.address_b = master_a, master_b, address_b
        self._made = False

    def create(self) -> None:
        run(["ip", "link", "add", self.name_a, "type", "veth", "peer", "name", self.name_b, "netns", self.ns_b], self.ns_a)
        self._made = True
        for ns, name, master in ((self.ns_a, self.name_a, self.master_a), (self.ns_b, self.name_b, self.master_b)):
            if master:
                run(["ip", "link", "set", name, "master", master], ns)
            run(["ip", "link", "set", name, "up"], ns)
        if self.address_b:
            run(["ip", "addr", "add", self.address_b, "dev", self.name_b], self.ns_b)

    def close(self) -> None:
        if self._made:
            run(["ip", "link", "del", self.name_a], self.ns_a, check=False)  # takes its peer along
            self._made = False


class Tap(_Owned):
    """A tap device for one VM, in a host namespace, enslaved to that host's bridge.

    QEMU attaches to it by name (-netdev tap,ifname=...), so QEMU must run in
    the same namespace.
    """

    def __init__(self, name: str, netns: str, bridge: str) -> None:
        self.name = _check_name(name)
        self.netns = netns
        self.bridge = bridge
        self._made = False

    def create(self) -> None:
        run(["ip", "tuntap", "add", "dev", self.name, "mode", "tap", "vnet_hdr"], self.netns)
        self._made = True
        run(["ip", "link", "set", self.name, "master", self.bridge, "up"], self.netns)

    def close(self) -> None:
        if self._made:
            run(["ip", "link", "del", self.name], self.netns, check=False)
            self._made = False


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in netns `name` (this thread only), then switch back.

    Sockets created inside stay in that namespace after the block: that is
    how one process holds a listening socket on host B and a client socket
    on host A of the test bed.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise NetError(f"cannot enter network namespace {name}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread astray
                raise NetError(f"cannot return from network namespace {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(target)
        os.close(own)


def in_netns_if(name: str | None) -> contextlib.AbstractContextManager[None]:
    """in_netns(name), or this thread's own namespace when name is None."""
    return in_netns(name) if name else contextlib.nullcontext()


def namespaces_with_prefix(prefix: str) -> list[str]:
    """Namespaces whose name starts with prefix: what a test session checks is gone at its end."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def root_links_with_prefix(prefix: str) -> list[str]:
    """Interfaces in the root namespace whose name starts with prefix (there should be none of ours)."""
    return sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(prefix))
