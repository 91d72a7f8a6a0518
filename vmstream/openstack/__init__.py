"""vmstream on OpenStack (issue #16).

`deploy/` stands up a one-machine OpenStack (Zed, from Debian 12's packages) that tests and
benches can start and tear down; `nova/` is the Nova virt driver that runs servers as VMs of
the host's vmstream agent (an adapter over its REST API); `osc/` is the python-openstackclient
plugin (`openstack live-image ...`, an adapter over Nova and Glance). The scheduler weigher comes
next and will live beside them.
"""
