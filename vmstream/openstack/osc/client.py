"""The plugin's client: Nova and Glance calls over two keystoneauth1 Adapters, and the waits.

The adapters come from osc's session (plugin.make_client); anything with keystoneauth's
`request(url, method, **kwargs)` returning a response works, which is how the unit tests run
the commands without a cloud. Adapters are made with raise_exc=False: Nova's error bodies are
not in a shape keystoneauth parses, so _call turns them into vmstream errors naming the cause.
Paths are Glance's `/v2/...` on its catalog endpoint, which is unversioned by convention (as in
`vmstream openstack up`), and Nova's on its versioned `/v2.1` one: no version discovery round trip.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from vmstream.errors import NotFound, VmstreamError
from vmstream.openstack.osc import logic


class Response(Protocol):
    """What the client reads of a requests.Response."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


class Adapter(Protocol):
    def request(self, url: str, method: str, **kwargs: Any) -> Response: ...


Progress = Callable[[str], None]


class Forbidden(VmstreamError):
    """The API's policy refused (403): e.g. all_tenants for a user who is not an admin."""


def _quote(ref: str) -> str:
    return urllib.parse.quote(ref, safe="")


class LiveImageClient:
    """Nova (compute, microversion logic.COMPUTE_MICROVERSION) and Glance (image, v2) for the verbs."""

    def __init__(self, compute: Adapter, image: Adapter, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 2.0, report_every_s: float = 15.0) -> None:
        self.compute = compute
        self.image = image
        self.sleep = sleep
        self.clock = clock
        self.poll_s = poll_s  # each server poll costs Nova a Neutron query: not faster than 0.5 s
        self.report_every_s = report_every_s

    # ---- HTTP ---------------------------------------------------------------------------

    def _call(self, adapter: Adapter, method: str, url: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """One request; its JSON answer, or a NotFound / VmstreamError with the API's own words."""
        r = adapter.request(url, method, **kwargs)
        if r.status_code in ok:
            return r.json() if r.text else None
        service = "Nova" if adapter is self.compute else "Glance"
        message = logic.error_message(r.status_code, r.headers.get("Content-Type", ""), r.text)
        error = {404: NotFound, 403: Forbidden}.get(r.status_code, VmstreamError)
        raise error(f"{service} answered {method} {url.split('?')[0]} with {r.status_code}: {message}")

    def _list(self, adapter: Adapter, url: str, key: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """All pages of a list."""
        items: list[dict[str, Any]] = []
        next_url: str | None = url
        while next_url:
            answer = self._call(adapter, "GET", next_url, params=params)
            items.extend(answer.get(key) or ())
            nxt = logic.next_link(answer, key)
            # Glance's next is a path from its root; Nova's an absolute URL, which keystoneauth takes as is.
            next_url, params = (nxt, None) if nxt and nxt != next_url else (None, None)
        return items

    # ---- lookups ------------------------------------------------------------------------

    def get_image(self, image_id: str) -> dict[str, Any] | None:
        try:
            image: dict[str, Any] = self._call(self.image, "GET", f"/v2/images/{_quote(image_id)}")
        except NotFound:
            return None
        return image

    def find_image(self, ref: str) -> dict[str, Any]:
        """A Glance image by id or exact name."""
        if logic.looks_like_uuid(ref):
            image = self.get_image(ref)
            if image is not None:
                return image
        named = self._list(self.image, "/v2/images", "images", {"name": ref})
        return logic.pick_named(named, ref, "image", "see `openstack live-image list`")

    def images_named(self, name: str) -> list[dict[str, Any]]:
        return self._list(self.image, "/v2/images", "images", {"name": name})

    def live_images(self) -> list[dict[str, Any]]:
        """Glance filters properties by value only, so every image is listed and the live ones kept."""
        return [i for i in self._list(self.image, "/v2/images", "images", {"limit": "1000"}) if logic.is_live(i)]

    def find_server(self, ref: str) -> dict[str, Any]:
        """A Nova server by id or exact name (Nova's name filter is a regular expression)."""
        if logic.looks_like_uuid(ref):
            try:
                server: dict[str, Any] = self._call(self.compute, "GET", f"/servers/{_quote(ref)}")["server"]
                return server
            except NotFound:
                pass
        named = self._list(self.compute, "/servers/detail", "servers", {"name": f"^{_regex(ref)}$"})
        return logic.pick_named(named, ref, "server", "see `openstack server list`")

    def find_flavor(self, ref: str) -> dict[str, Any]:
        """A flavor by id (any string in Nova) or name."""
        try:
            flavor: dict[str, Any] = self._call(self.compute, "GET", f"/flavors/{_quote(ref)}")["flavor"]
            return flavor
        except NotFound:
            pass
        flavors = self._list(self.compute, "/flavors/detail", "flavors", {"is_public": "None"})
        return logic.pick_named(flavors, ref, "flavor", "see `openstack flavor list`")

    def servers_of_image(self, image_id: str) -> list[dict[str, Any]]:
        """Servers booted from the image, in every project when the policy lets us see them."""
        try:
            return self._list(self.compute, "/servers/detail", "servers", {"image": image_id, "all_tenants": "1"})
        except Forbidden:
            pass
        # Not an admin: the servers of our own project are all we can see.
        return self._list(self.compute, "/servers/detail", "servers", {"image": image_id})

    def servers_of_reservation(self, reservation_id: str) -> list[dict[str, Any]]:
        servers = self._list(self.compute, "/servers/detail", "servers", {"reservation_id": reservation_id})
        return sorted(servers, key=logic.natural_name)

    # ---- actions ------------------------------------------------------------------------

    def create_live_image(self, server_id: str, name: str) -> str:
        """Nova's createImage on the server; the image's id (its Glance image is queued now)."""
        answer = self._call(self.compute, "POST", f"/servers/{_quote(server_id)}/action", ok=(200, 202),
                            json=logic.create_image_body(name))
        return logic.image_id_of(answer)

    def start_servers(self, body: dict[str, Any]) -> str:
        """One POST /servers for all the clones; the reservation that lists them."""
        return logic.reservation_of(self._call(self.compute, "POST", "/servers", ok=(200, 202), json=body))

    def delete_image(self, image: Mapping[str, Any]) -> None:
        """Unprotect (the driver made the image protected) and delete the Glance image."""
        url = f"/v2/images/{_quote(str(image['id']))}"
        if image.get("protected"):
            self._call(self.image, "PATCH", url, data=logic.unprotect_patch(),
                       headers={"Content-Type": logic.JSON_PATCH})
        self._call(self.image, "DELETE", url, ok=(200, 204))

    # ---- waits --------------------------------------------------------------------------

    def wait_live_image(self, image_id: str, timeout: float, progress: Progress) -> dict[str, Any]:
        """Until the Glance image is active and marked by the driver as a live image."""
        image: dict[str, Any] = self._wait(lambda: self._image_step(image_id), timeout, progress, f"live image {image_id}")
        return image

    def _image_step(self, image_id: str) -> tuple[bool, str, dict[str, Any]]:
        image = self.get_image(image_id)
        done, what = logic.image_progress(image)
        assert image is not None  # image_progress raised otherwise
        return done, what, image

    def wait_servers(self, reservation_id: str, count: int, timeout: float, progress: Progress) -> list[dict[str, Any]]:
        """Until all count servers are ACTIVE; any ERROR fails with its fault."""
        def step() -> tuple[bool, str, list[dict[str, Any]]]:
            servers = self.servers_of_reservation(reservation_id)
            done, what = logic.servers_progress(servers, count)
            return done, what, servers
        servers: list[dict[str, Any]] = self._wait(step, timeout, progress, f"servers of {reservation_id}")
        return servers

    def _wait(self, step: Callable[[], tuple[bool, str, Any]], timeout: float, progress: Progress, what: str) -> Any:
        """Poll step until done, then its value; report each change (and now and then the same) with the elapsed time."""
        start = self.clock()
        last, last_report = "", start
        while True:
            done, state, value = step()
            now = self.clock()
            if state != last or now - last_report >= self.report_every_s:
                progress(f"{what}: {state} ({now - start:.0f} s)")
                last, last_report = state, now
            if done:
                return value
            if now - start >= timeout:
                raise VmstreamError(f"{what} still {state} after {timeout:.0f} s: raise --timeout, or look at the compute's log")
            self.sleep(self.poll_s)


def _regex(text: str) -> str:
    """A name as a literal in Nova's name filter (a MySQL/MariaDB regular expression)."""
    return "".join("\\" + c if c in r".^$*+?()[]{}|\\" else c for c in text)
