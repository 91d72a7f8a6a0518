"""vmstream on OpenStack (issue #16).

`deploy/` stands up a one-machine OpenStack (Zed, from Debian 12's packages) that tests and
benches can start and tear down; the Nova virt driver, the scheduler weigher and the client
plugin come next and will live beside it.
"""
