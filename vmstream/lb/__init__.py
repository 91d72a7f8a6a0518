"""lb: a real load balancer (HAProxy, Debian's package) in front of a group of VMs.

One HAProxy process per balancer, owned by the code that starts it; members are added,
drained and removed at runtime through HAProxy's runtime API (no reloads, no dropped
connections), and its statistics are read for an autoscaler.
"""

from vmstream.lb.haproxy import BackendStats, Balancer, HaproxyError, MemberStats

__all__ = ["BackendStats", "Balancer", "HaproxyError", "MemberStats"]
