"""vmstream's Nova virt driver: Nova servers run as vmstream VMs through the host's agent.

    translate.py   Nova's terms in the agent's (pure: VM names, power states, boot requests,
                   the inventory a host reports); unit-tested without Nova
    driver.py      VmstreamDriver(nova.virt.driver.ComputeDriver): an adapter over the agent's
                   REST API (vmstream.agentapi), imported only inside nova-compute
    weigher.py     LiveImageCacheWeigher, imported only inside nova-scheduler
    service_glance.py  Glance as nova.conf's [service_user], for the driver's periodic tasks and the weigher
    shim.py        the `nova.virt.vmstream` namespace shim that makes Nova find the driver

The driver runs inside nova-compute under Debian's /usr/bin/python3 with python3-nova, so
this package imports nothing but the standard library, vmstream.agentapi, vmstream.errors
(httpx: Debian's python3-httpx) and, in driver.py, Nova itself.
"""

DRIVER = "vmstream.VmstreamDriver"  # nova.conf: compute_driver = vmstream.VmstreamDriver

__all__ = ["DRIVER"]
