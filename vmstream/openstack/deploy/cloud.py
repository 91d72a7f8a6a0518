"""A small HTTP client for the deployment's APIs: a Keystone token, its catalog, and requests.

Used by `up` (catalog, readiness), `status`, and by tests and benches that want the API's own
timing without the `openstack` CLI's 1-2 s start-up per call.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vmstream.openstack.deploy.errors import DeployError


@dataclass(frozen=True)
class Credentials:
    """The admin's credentials and the endpoints, as written to cloud.json and openrc."""

    auth_url: str
    password: str
    username: str = "admin"
    project_name: str = "admin"
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    region_name: str = "RegionOne"
    endpoints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        return cls(**json.loads(path.read_text()))

    def save(self, cloud_json: Path, openrc: Path, plugin_dir: Path | None = None) -> None:
        """cloud.json and openrc; with plugin_dir, openrc also puts vmstream's openstack client
        plugin on PYTHONPATH (`openstack live-image ...`)."""
        cloud_json.write_text(json.dumps(asdict(self), indent=2) + "\n")
        cloud_json.chmod(0o600)
        openrc.write_text(
            "# admin credentials of vmstream's one-machine OpenStack: . this file, then use `openstack`\n"
            f"export OS_AUTH_URL={self.auth_url}\nexport OS_IDENTITY_API_VERSION=3\n"
            f"export OS_USERNAME={self.username}\nexport OS_PASSWORD={self.password}\n"
            f"export OS_PROJECT_NAME={self.project_name}\nexport OS_USER_DOMAIN_NAME={self.user_domain_name}\n"
            f"export OS_PROJECT_DOMAIN_NAME={self.project_domain_name}\nexport OS_REGION_NAME={self.region_name}\n"
            "export OS_COMPUTE_API_VERSION=2.37  # servers without networks: --nic none\n"
            + (f"export PYTHONPATH={plugin_dir}${{PYTHONPATH:+:$PYTHONPATH}}  # openstack live-image ...\n" if plugin_dir else "")
        )
        openrc.chmod(0o600)

    def env(self) -> dict[str, str]:
        """The OS_* variables of openrc, for running `openstack` as a subprocess."""
        return {"OS_AUTH_URL": self.auth_url, "OS_IDENTITY_API_VERSION": "3", "OS_USERNAME": self.username,
                "OS_PASSWORD": self.password, "OS_PROJECT_NAME": self.project_name,
                "OS_USER_DOMAIN_NAME": self.user_domain_name, "OS_PROJECT_DOMAIN_NAME": self.project_domain_name,
                "OS_REGION_NAME": self.region_name, "OS_COMPUTE_API_VERSION": "2.37"}


DEMO_IMAGE = "vmstream-demo"
DEMO_MARKER = b"vmstream demo guest: the driver boots its own demo guest, these bytes are never read\n"


class Cloud:
    """Requests to the deployment as its admin. The token is fetched once and renewed on 401."""

    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        self.http = httpx.Client(timeout=timeout)
        self._token: str | None = None
        self._catalog: dict[str, str] = {}

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Cloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def token(self) -> str:
        if self._token is None:
            c = self.creds
            body = {"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": c.username, "domain": {"name": c.user_domain_name}, "password": c.password}}},
                "scope": {"project": {"name": c.project_name, "domain": {"name": c.project_domain_name}}}}}
            r = self.http.post(c.auth_url.rstrip("/") + "/auth/tokens", json=body)
            if r.status_code != 201:
                raise DeployError(f"Keystone refused the admin's credentials ({r.status_code}): {r.text[:200]}")
            self._token = r.headers["X-Subject-Token"]
            for svc in r.json()["token"].get("catalog", []):
                for ep in svc["endpoints"]:
                    if ep["interface"] == "public" and ep.get("region_id", c.region_name) == c.region_name:
                        self._catalog[svc["type"]] = ep["url"].rstrip("/")
        return self._token

    def endpoint(self, service_type: str) -> str:
        """An endpoint from the token's catalog ('compute', 'image', ...; 'identity' is the auth URL)."""
        if service_type == "identity":
            return self.creds.auth_url.rstrip("/")
        self.token()
        try:
            return self._catalog[service_type]
        except KeyError:
            raise DeployError(f"the catalog has no '{service_type}' endpoint: run `vmstream openstack up` again") from None

    def request(self, service_type: str, method: str, path: str, *, microversion: str | None = None,
                expect: tuple[int, ...] = (200, 201, 202, 204), **kw: Any) -> httpx.Response:
        """One request; raises DeployError on an unexpected status (the body says why)."""
        headers = dict(kw.pop("headers", None) or {})
        if microversion:
            headers["OpenStack-API-Version"] = f"{service_type} {microversion}"
        for attempt in (1, 2):
            headers["X-Auth-Token"] = self.token()
            r = self.http.request(method, self.endpoint(service_type) + path, headers=headers, **kw)
            if r.status_code == 401 and attempt == 1:
                self._token = None
                continue
            break
        if expect and r.status_code not in expect:
            raise DeployError(f"{method} {service_type} {path} answered {r.status_code}: {r.text[:300]}")
        return r

    def json(self, service_type: str, method: str, path: str, **kw: Any) -> Any:
        r = self.request(service_type, method, path, **kw)
        return r.json() if r.content else None

    # ---- what tests and benches need ------------------------------------------------------

    def ensure_flavor(self, name: str = "vmstream.tiny", ram_mib: int = 256, vcpus: int = 1, disk_gb: int = 1) -> str:
        """A flavor's id, made if missing."""
        for f in self.json("compute", "GET", "/flavors")["flavors"]:
            if f["name"] == name:
                return str(f["id"])
        body = {"flavor": {"name": name, "ram": ram_mib, "vcpus": vcpus, "disk": disk_gb}}
        return str(self.json("compute", "POST", "/flavors", json=body)["flavor"]["id"])

    def ensure_demo_image(self, name: str = DEMO_IMAGE) -> str:
        """The Glance image that stands for vmstream's demo guest (property vmstream_guest=demo:
        the driver boots its own demo guest and never reads these bytes), made if missing."""
        found = self.json("image", "GET", "/v2/images", params={"name": name})["images"]
        return str(found[0]["id"]) if found else self.upload_image(name, DEMO_MARKER, vmstream_guest="demo")

    def upload_image(self, name: str, data: bytes, disk_format: str = "raw", **properties: str) -> str:
        """A Glance image made from bytes (active when this returns)."""
        body = {"name": name, "disk_format": disk_format, "container_format": "bare", **properties}
        image_id = str(self.json("image", "POST", "/v2/images", json=body)["id"])
        self.request("image", "PUT", f"/v2/images/{image_id}/file", content=data,
                     headers={"Content-Type": "application/octet-stream"})
        return image_id

    def create_servers(self, name: str, image: str, flavor: str, count: int = 1, host: str | None = None,
                       metadata: dict[str, str] | None = None, server_group: str | None = None) -> str:
        """POST /servers with min_count = max_count = count and no network; returns the
        reservation. host: put them on that compute (admin's `nova:HOST` availability zone);
        server_group: members of that server group (its policy places them)."""
        server: dict[str, Any] = {"name": name, "imageRef": image, "flavorRef": flavor, "networks": "none",
                                  "min_count": count, "max_count": count, "return_reservation_id": True}
        if host:
            server["availability_zone"] = f"nova:{host}"
        if metadata:
            server["metadata"] = metadata
        body: dict[str, Any] = {"server": server}
        if server_group:
            body["os:scheduler_hints"] = {"group": server_group}
        return str(self.json("compute", "POST", "/servers", json=body, microversion="2.37")["reservation_id"])

    def create_server_group(self, name: str, policy: str = "soft-anti-affinity") -> str:
        """A server group (its policy: where Nova places its members); returns its id."""
        body = {"server_group": {"name": name, "policy": policy}}
        return str(self.json("compute", "POST", "/os-server-groups", json=body, microversion="2.64")["server_group"]["id"])

    def delete_server_group(self, group_id: str) -> None:
        self.request("compute", "DELETE", f"/os-server-groups/{group_id}", expect=(204, 404))

    def live_image(self, server_id: str, name: str, timeout: float = 300.0) -> str:
        """`openstack server image create`: the Glance image's id once it is active and marked
        as a live image by vmstream's driver."""
        r = self.request("compute", "POST", f"/servers/{server_id}/action", json={"createImage": {"name": name}},
                         microversion="2.45")
        image_id = str(r.json()["image_id"])
        deadline = time.monotonic() + timeout
        while True:
            image = self.json("image", "GET", f"/v2/images/{image_id}")
            if image["status"] == "active" and image.get("vmstream_live_image"):
                return image_id
            if image["status"] in ("killed", "deleted") or time.monotonic() > deadline:
                raise DeployError(f"live image {name} of server {server_id} not made: image {image_id} is {image['status']}")
            time.sleep(0.5)

    def delete_image(self, image_id: str) -> None:
        """Delete a Glance image, unprotecting it first (the driver protects live images)."""
        patch = json.dumps([{"op": "replace", "path": "/protected", "value": False}]).encode()
        self.request("image", "PATCH", f"/v2/images/{image_id}", content=patch,
                     headers={"Content-Type": "application/openstack-images-v2.1-json-patch"})
        self.request("image", "DELETE", f"/v2/images/{image_id}")

    def delete_servers(self, ids: list[str], timeout: float = 300.0) -> None:
        """Delete servers and wait until Nova lists none of them (one already gone is fine)."""
        for server_id in ids:
            self.request("compute", "DELETE", f"/servers/{server_id}", expect=(202, 204, 404))
        gone = set(ids)
        self.wait_servers(lambda ss: not gone & {s["id"] for s in ss}, "deleted", timeout=timeout)

    def servers(self, **query: str) -> list[dict[str, Any]]:
        servers: list[dict[str, Any]] = self.json("compute", "GET", "/servers/detail", params=query)["servers"]
        return servers

    def wait_servers(self, done: Any, what: str, timeout: float = 120.0, poll_s: float = 0.5,
                     **query: str) -> list[dict[str, Any]]:
        """Poll the server list until done(servers) holds. Each poll costs Nova a Neutron port
        query, so no faster than every 0.5 s."""
        deadline = time.monotonic() + timeout
        while True:
            servers = self.servers(**query)
            if done(servers):
                return servers
            if time.monotonic() > deadline:
                states = {s["name"]: s["status"] for s in servers}
                raise DeployError(f"servers not {what} within {timeout:.0f}s: {states}")
            time.sleep(poll_s)
