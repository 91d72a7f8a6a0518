"""vmstream's python-openstackclient plugin: `openstack live-image create|start|list|servers|delete`.

    logic.py            the pure part: request bodies, answer checks, rows, error messages
    client.py           Nova and Glance calls over keystoneauth1 Adapters, and the waits
    plugin.py           the module osc loads (API_NAME, make_client, build_option_parser)
    v1/live_image.py    the commands (osc-lib's ShowOne, Lister, Command)
    install.py          a directory that, on PYTHONPATH, gives Debian's `openstack` the plugin

The verbs are cobalt's (live-image-create/start/list/servers/delete) over today's Nova: a live
image is a Glance image the vmstream Nova driver made with createImage and marked with the
property `vmstream_live_image`; starting it is one POST /servers with min_count = max_count.
It runs under Debian's /usr/bin/python3, so it imports only the standard library, osc-lib,
keystoneauth1 and vmstream.errors (import-linter checks the vmstream side).
"""

# Entry points, for pyproject.toml (pip installs) and install.py (Debian's python3) alike.
# cliff turns `_` into a space: `live-image_create` is `openstack live-image create`.
_V1 = "vmstream.openstack.osc.v1.live_image"
ENTRY_POINTS: dict[str, dict[str, str]] = {
    "openstack.cli.extension": {"vmstream": "vmstream.openstack.osc.plugin"},
    "openstack.vmstream.v1": {
        "live-image_create": f"{_V1}:CreateLiveImage",
        "live-image_start": f"{_V1}:StartLiveImage",
        "live-image_list": f"{_V1}:ListLiveImage",
        "live-image_servers": f"{_V1}:ServersLiveImage",
        "live-image_delete": f"{_V1}:DeleteLiveImage",
    },
}

__all__ = ["ENTRY_POINTS"]
