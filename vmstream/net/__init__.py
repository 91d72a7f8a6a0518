"""Network resources owned like processes: namespaces, bridges, veths, taps, and a multi-host test bed."""

from vmstream.net.links import Bridge, NetError, Netns, Tap, Veth, in_netns, namespaces_with_prefix, unique_prefix
from vmstream.net.testbed import FabricSwitch, HostNet, TestBed

__all__ = [
    "Bridge", "FabricSwitch", "HostNet", "NetError", "Netns", "Tap", "TestBed", "Veth", "in_netns", "namespaces_with_prefix",
    "unique_prefix",
]
