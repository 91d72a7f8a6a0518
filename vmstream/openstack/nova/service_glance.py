"""Glance as nova.conf's [service_user]: what the driver's periodic tasks and the weigher ask it.

A periodic task's context has no token and no catalog, and the scheduler has no user's
context at all, so both ask as the service user the deployment configures for Nova.
"""

from __future__ import annotations

from typing import Any

from keystoneauth1 import loading as ks_loading
from nova.conf import CONF


class ServiceGlance:
    """A keystoneauth session as [service_user], made on first use."""

    def __init__(self) -> None:
        self._session: Any = None

    def image(self, image_id: str) -> Any | None:
        """The answer to GET /v2/images/ID (any status; transport errors raise), or None when
        nova.conf has no [service_user] credentials."""
        if self._session is None:
            auth = ks_loading.load_auth_from_conf_options(CONF, "service_user")
            if auth is None:
                return None
            self._session = ks_loading.load_session_from_conf_options(CONF, "service_user", auth=auth)
        return self._session.get(f"/v2/images/{image_id}", raise_exc=False, endpoint_filter={
            "service_type": "image", "interface": "public", "region_name": CONF.glance.region_name})
