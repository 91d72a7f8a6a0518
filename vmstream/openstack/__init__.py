"""vmstream on OpenStack (issue #16).

`deploy/` stands up a one-machine OpenStack (Zed, from Debian 12's packages) that tests and
benches can start and tear down; `nova/` is the Nova virt driver that runs servers as VMs of
the host's vmstream agent (an adapter over its REST API). The scheduler weigher and the client
plugin come next and will live beside them.
"""
