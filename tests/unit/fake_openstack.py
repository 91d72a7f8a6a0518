"""A fake Nova and Glance, just big enough for the openstack client plugin's unit tests.

It answers the requests the plugin makes, in the shapes Zed's APIs answer them (Nova's error
bodies, Glance's text errors, pagination links), and moves things along as a cloud would: an
image being made goes queued -> saving -> active -> marked by the driver, and servers go BUILD ->
ACTIVE, one step per poll. FakeCloud.handle serves both the in-process FakeAdapter (keystoneauth's
Adapter.request) and, in one test, a real HTTP server behind Debian's `openstack` CLI.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

PAGE = 2  # small pages, so every list follows its next links


@dataclass
class FakeResponse:
    status_code: int
    text: str
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Call:
    service: str
    method: str
    path: str
    params: dict[str, str]
    body: Any
    headers: dict[str, str]


class FakeCloud:
    def __init__(self) -> None:
        self.servers: dict[str, dict[str, Any]] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.flavors: dict[str, dict[str, Any]] = {"f-small": {"id": "f-small", "name": "small"},
                                                    "f-big": {"id": "f-big", "name": "big"}}
        self.calls: list[Call] = []
        self.making: dict[str, int] = {}  # image id -> polls seen while being made
        self.building: dict[str, int] = {}  # server id -> polls seen while BUILD
        self.image_fails = False  # the compute's snapshot fails: Nova deletes the image
        self.marks_live = True  # a vmstream compute marks the image; another would not
        self.server_fault: str | None = None  # the clones go ERROR with this fault
        self.admin = True
        self.instant = False  # images and servers are done at their first poll (the CLI test: no 2 s polls)
        self.base = "http://fake"
        self.compute = FakeAdapter(self, "compute")
        self.image = FakeAdapter(self, "image")

    # ---- set-up helpers -----------------------------------------------------------------

    def add_server(self, name: str, image_id: str = "", status: str = "ACTIVE", flavor: str = "f-small") -> dict[str, Any]:
        sid = str(uuid.uuid4())
        self.servers[sid] = {"id": sid, "name": name, "status": status, "image": {"id": image_id} if image_id else "",
                             "flavor": {"original_name": flavor}, "metadata": {}, "OS-EXT-SRV-ATTR:host": "compute1",
                             "flavor_id": flavor}
        return self.servers[sid]

    def add_image(self, name: str, live: bool = True, **props: Any) -> dict[str, Any]:
        iid = str(uuid.uuid4())
        image = {"id": iid, "name": name, "status": "active", "protected": live, "created_at": "2024-05-01T10:00:00Z"}
        if live:
            image.update({"vmstream_live_image": name, "vmstream_flavor": "f-small",
                          "vmstream_source_server": str(uuid.uuid4()), "vmstream_memory_mb": "256"})
        image.update(props)
        self.images[iid] = image
        return image

    def requests(self, service: str | None = None, method: str | None = None) -> list[Call]:
        return [c for c in self.calls if (service is None or c.service == service) and (method is None or c.method == method)]

    def writes(self) -> list[Call]:
        return [c for c in self.calls if c.method != "GET"]

    # ---- the APIs -----------------------------------------------------------------------

    def handle(self, service: str, method: str, url: str, params: dict[str, str], body: Any,
               headers: dict[str, str]) -> FakeResponse:
        parts = urllib.parse.urlsplit(url)
        path = parts.path.removeprefix("/v2.1")  # Nova's next links are absolute URLs of its versioned root
        query = {**dict(urllib.parse.parse_qsl(parts.query)), **{k: str(v) for k, v in (params or {}).items()}}
        self.calls.append(Call(service, method, path, query, body, dict(headers or {})))
        if service == "compute":
            return self._nova(method, path, query, body, headers or {})
        return self._glance(method, path, query, body, headers or {})

    def _nova_error(self, status: int, kind: str, message: str) -> FakeResponse:
        return FakeResponse(status, json.dumps({kind: {"message": message, "code": status}}), {"Content-Type": "application/json"})

    def _ok(self, body: Any, status: int = 200) -> FakeResponse:
        return FakeResponse(status, json.dumps(body) if body is not None else "", {"Content-Type": "application/json"})

    def _page(self, items: list[dict[str, Any]], query: dict[str, str], key: str, link: str) -> dict[str, Any]:
        ids = [i["id"] for i in items]
        start = ids.index(query["marker"]) + 1 if query.get("marker") in ids else 0
        page = items[start:start + PAGE]
        answer: dict[str, Any] = {key: page}
        if start + PAGE < len(items):
            rest = {k: v for k, v in query.items() if k != "marker"}
            nxt = f"{link}?{urllib.parse.urlencode({**rest, 'marker': page[-1]['id']})}"
            if key == "images":
                answer["next"] = nxt
            else:
                answer[f"{key}_links"] = [{"rel": "next", "href": self.base + "/v2.1" + nxt}]
        return answer

    def _nova(self, method: str, path: str, query: dict[str, str], body: Any, headers: dict[str, str]) -> FakeResponse:
        m = re.fullmatch(r"/servers/([^/]+)/action", path)
        if method == "POST" and m:
            server = self.servers.get(m.group(1))
            if server is None:
                return self._nova_error(404, "itemNotFound", f"Instance {m.group(1)} could not be found.")
            name = body["createImage"]["name"]
            iid = str(uuid.uuid4())
            self.images[iid] = {"id": iid, "name": name, "status": "queued", "protected": False,
                                "created_at": "2024-05-01T10:00:00Z"}
            self.making[iid] = 0
            self._made_from = server
            return self._ok({"image_id": iid}, 202)
        if method == "POST" and path == "/servers":
            return self._create_servers(body["server"])
        if method == "GET" and path == "/servers/detail":
            if query.get("all_tenants") and not self.admin:
                return self._nova_error(403, "forbidden", "Policy doesn't allow os_compute_api:servers:detail:get_all_tenants")
            servers = list(self.servers.values())
            if "name" in query:
                servers = [s for s in servers if re.search(query["name"], s["name"])]
            if "image" in query:
                servers = [s for s in servers if s["image"] and s["image"]["id"] == query["image"]]
            if "reservation_id" in query:
                servers = [s for s in servers if s.get("reservation_id") == query["reservation_id"]]
            page = self._page(servers, query, "servers", "/servers/detail")
            for s in page["servers"]:
                self._advance_server(s)
            return self._ok(page)
        m = re.fullmatch(r"/servers/([^/]+)", path)
        if method == "GET" and m:
            server = self.servers.get(urllib.parse.unquote(m.group(1)))
            if server is None:
                return self._nova_error(404, "itemNotFound", f"Instance {m.group(1)} could not be found.")
            return self._ok({"server": server})
        m = re.fullmatch(r"/flavors/([^/]+)", path)
        if method == "GET" and path == "/flavors/detail":
            return self._ok(self._page(list(self.flavors.values()), query, "flavors", "/flavors/detail"))
        if method == "GET" and m:
            flavor = self.flavors.get(urllib.parse.unquote(m.group(1)))
            if flavor is None:
                return self._nova_error(404, "itemNotFound", f"Flavor {m.group(1)} could not be found.")
            return self._ok({"flavor": flavor})
        return self._nova_error(404, "itemNotFound", f"no route {method} {path}")

    def _create_servers(self, server: dict[str, Any]) -> FakeResponse:
        if server.get("imageRef") not in self.images:
            return self._nova_error(400, "badRequest", f"Can not find requested image {server.get('imageRef')}")
        if server.get("flavorRef") not in self.flavors:
            return self._nova_error(400, "badRequest", f"Flavor {server.get('flavorRef')} could not be found.")
        rid = "r-" + uuid.uuid4().hex[:8]
        count = server["max_count"]
        for n in range(1, count + 1):
            s = self.add_server(server["name"] if count == 1 else f"{server['name']}-{n}", server["imageRef"], "BUILD",
                                server["flavorRef"])
            s.update(reservation_id=rid, metadata=server.get("metadata", {}))
            self.building[s["id"]] = 0
        return self._ok({"reservation_id": rid}, 202)

    def _advance_server(self, server: dict[str, Any]) -> None:
        if server["id"] not in self.building:
            return
        self.building[server["id"]] += 1
        if self.building[server["id"]] >= 2 or self.instant:
            del self.building[server["id"]]
            if self.server_fault and server["name"].endswith("-2"):
                server.update(status="ERROR", fault={"message": self.server_fault, "code": 500})
            else:
                server["status"] = "ACTIVE"

    def _glance(self, method: str, path: str, query: dict[str, str], body: Any, headers: dict[str, str]) -> FakeResponse:
        if method == "GET" and path == "/v2/images":
            images = list(self.images.values())
            if "name" in query:
                images = [i for i in images if i["name"] == query["name"]]
            return self._ok(self._page(images, query, "images", "/v2/images"))
        m = re.fullmatch(r"/v2/images/([^/]+)", path)
        if not m:
            return FakeResponse(404, "404 Not Found\n\nThe resource could not be found.\n\n", {"Content-Type": "text/plain"})
        iid = urllib.parse.unquote(m.group(1))
        image = self.images.get(iid)
        if image is not None and method == "GET":
            self._advance_image(image)
            image = self.images.get(iid)
        if image is None:
            return FakeResponse(404, f"<html><body><h1>404 Not Found</h1>No image found with ID {iid}</body></html>",
                                {"Content-Type": "text/html; charset=UTF-8"})
        if method == "GET":
            return self._ok(image)
        if method == "PATCH":
            if headers.get("Content-Type") != "application/openstack-images-v2.1-json-patch":
                return FakeResponse(415, "Unsupported Media Type", {"Content-Type": "text/plain"})
            for op in json.loads(body):
                assert op["op"] == "replace", op
                image[op["path"].strip("/")] = op["value"]
            return self._ok(image)
        if method == "DELETE":
            if image.get("protected"):
                return FakeResponse(403, f"403 Forbidden\n\nImage {iid} is protected and cannot be deleted.",
                                    {"Content-Type": "text/plain"})
            del self.images[iid]
            return FakeResponse(204, "")
        return FakeResponse(405, "Method Not Allowed", {"Content-Type": "text/plain"})

    def _advance_image(self, image: dict[str, Any]) -> None:
        iid = image["id"]
        if iid not in self.making:
            return
        self.making[iid] += 1
        step = 3 if self.instant and not self.image_fails else self.making[iid]
        if step == 1:
            image["status"] = "saving"
        elif step == 2 and self.image_fails:
            del self.images[iid], self.making[iid]
        elif step == 2:
            image.update(status="active", size=1024)
        elif step == 3 and self.marks_live:
            source = self._made_from
            image.update(status="active", size=1024, protected=True, vmstream_live_image=image["name"], vmstream_flavor=source["flavor_id"],
                         vmstream_source_server=source["id"], vmstream_memory_mb="256")
            del self.making[iid]


class FakeAdapter:
    """keystoneauth1.adapter.Adapter's request(), answered by a FakeCloud."""

    def __init__(self, cloud: FakeCloud, service: str) -> None:
        self.cloud = cloud
        self.service = service

    def request(self, url: str, method: str, **kwargs: Any) -> FakeResponse:
        body = kwargs["json"] if kwargs.get("json") is not None else kwargs.get("data")
        return self.cloud.handle(self.service, method, url, kwargs.get("params") or {}, body, kwargs.get("headers") or {})
