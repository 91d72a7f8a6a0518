"""Commands of the plugin's API version 1 (osc's command group `openstack.vmstream.v1`)."""
