"""The pure part of the plugin: request bodies, answer checks, table rows and error messages.

Nothing here talks to a cloud, so every rule the commands follow (what makes an image a live
image, what a start request carries, when a wait is over or has failed) is unit-tested without
OpenStack. Errors are vmstream's own (vmstream.errors); the commands show their messages.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmstream.errors import Conflict, InvalidInput, NotFound, VmstreamError

# Glance properties the Nova driver sets on a live image's Glance image.
LIVE_IMAGE = "vmstream_live_image"  # the vmstream live image's name: what makes a Glance image a live image
FLAVOR = "vmstream_flavor"  # flavor id of the server the live image was made from: the clones' default
SOURCE_SERVER = "vmstream_source_server"
MEMORY_MB = "vmstream_memory_mb"

# 2.45: createImage answers {"image_id"}; 2.37: networks "none"; all of Zed's Nova (max 2.93) has 2.74.
COMPUTE_MICROVERSION = "2.74"
JSON_PATCH = "application/openstack-images-v2.1-json-patch"
USER_DATA_MAX = 65535  # Nova's limit on the base64 of user_data
METADATA_MAX = 255  # Nova's limit on a metadata key and on a value
FAILED_IMAGE = ("killed", "deleted", "pending_delete", "deactivated")

IMAGE_FIELDS = ("id", "name", "status", "live_image", "source_server", "flavor", "memory_mb", "protected", "created_at")
IMAGE_COLUMNS = ("ID", "Name", "Status", "Live Image", "Source Server", "Created At")
SERVER_COLUMNS = ("ID", "Name", "Status", "Host")

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


# ---- input --------------------------------------------------------------------------------


def positive_count(text: str) -> int:
    """--count: a whole number of servers, at least 1 (checked before any request)."""
    try:
        count = int(text)
    except ValueError:
        raise InvalidInput(f"--count {text!r} is not a whole number: give how many servers to start, e.g. --count 3") from None
    if count < 1:
        raise InvalidInput(f"--count {count}: start at least one server (--count 1 or more)")
    return count


def parse_params(pairs: Iterable[str]) -> dict[str, str]:
    """--param k=v ... as the servers' metadata, which the driver hands the clones' hooks as params."""
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInput(f"--param {pair!r} is not key=value: write it as e.g. --param role=worker")
        if len(key) > METADATA_MAX or len(value) > METADATA_MAX:
            raise InvalidInput(f"--param {key[:40]!r}: Nova takes keys and values of at most {METADATA_MAX} characters")
        params[key] = value
    return params


def encode_user_data(data: bytes, source: str = "user data") -> str:
    """user_data as Nova takes it: base64, at most 65535 characters of it."""
    encoded = base64.b64encode(data).decode("ascii")
    if len(encoded) > USER_DATA_MAX:
        raise InvalidInput(f"{source} is {len(data)} bytes: Nova takes at most {USER_DATA_MAX * 3 // 4} (65535 in base64)")
    return encoded


def read_user_data(path: str) -> str:
    """The --user-data file, read and encoded before any request so a bad one starts nothing."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"--user-data {path}: cannot read it ({e.strerror or e})") from None
    return encode_user_data(data, f"--user-data {path}")


def looks_like_uuid(ref: str) -> bool:
    """Whether a reference can be an id (tried as one first), else it is only a name."""
    return bool(_UUID.match(ref))


# ---- requests -----------------------------------------------------------------------------


def live_image_name(name: str) -> str:
    """The new live image's name (Glance allows any; an empty one could not be named later)."""
    if not name.strip():
        raise InvalidInput("the live image's name is empty: give one, e.g. `openstack live-image create web web-img`")
    return name


def create_image_body(name: str) -> dict[str, Any]:
    """Nova's createImage action: the driver's snapshot() makes the live image behind it."""
    return {"createImage": {"name": live_image_name(name)}}


def servers_body(*, name: str, image_id: str, flavor_id: str, count: int, params: Mapping[str, str],
                 user_data: str | None) -> dict[str, Any]:
    """One POST /servers for all the clones: Nova names them name-1 ... name-N."""
    server: dict[str, Any] = {
        "name": name,
        "imageRef": image_id,
        "flavorRef": flavor_id,
        "min_count": count,
        "max_count": count,
        "networks": "none",
        "return_reservation_id": True,
    }
    if params:
        server["metadata"] = dict(params)
    if user_data is not None:
        server["user_data"] = user_data
    return {"server": server}


def unprotect_patch() -> str:
    """The JSON patch (Glance's media type JSON_PATCH) that lifts the protection the driver set."""
    return json.dumps([{"op": "replace", "path": "/protected", "value": False}])


# ---- answers ------------------------------------------------------------------------------


def image_id_of(answer: Any) -> str:
    """createImage's answer at 2.45+: {"image_id": ...}."""
    if not isinstance(answer, dict) or not answer.get("image_id"):
        raise VmstreamError(f"Nova's createImage answered without an image id ({answer!r}): it needs compute microversion 2.45+")
    return str(answer["image_id"])


def reservation_of(answer: Any) -> str:
    """POST /servers with return_reservation_id: {"reservation_id": "r-..."}."""
    if not isinstance(answer, dict) or not answer.get("reservation_id"):
        raise VmstreamError(f"Nova's POST /servers answered without a reservation id ({answer!r})")
    return str(answer["reservation_id"])


def is_live(image: Mapping[str, Any]) -> bool:
    return bool(image.get(LIVE_IMAGE))


def require_live(image: Mapping[str, Any]) -> None:
    """Only a live image starts clones; another image would cold-boot (use `openstack server create`)."""
    if not is_live(image):
        raise InvalidInput(f"image {image.get('name')!r} ({image.get('id')}) is not a live image (it has no {LIVE_IMAGE} "
                           "property): make one from a running server with `openstack live-image create SERVER NAME`")


def default_flavor(image: Mapping[str, Any]) -> str:
    """The clones' flavor: the source server's, which the live image's memory was captured with."""
    flavor = image.get(FLAVOR)
    if not flavor:
        raise InvalidInput(f"live image {image.get('name')!r} has no {FLAVOR} property: give the clones' flavor with --flavor")
    return str(flavor)


def image_progress(image: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(done, what it is doing) for the Glance image of a live image being made.

    Done when active AND marked by the driver; gone or failed raises: Nova deletes the image
    when the compute's snapshot fails, so a 404 here means the live image failed."""
    if image is None:
        raise VmstreamError("the image was deleted while the live image was being made: the snapshot failed "
                            "(see `openstack server show SERVER` and the compute's log)")
    status = str(image.get("status"))
    if status in FAILED_IMAGE:
        raise VmstreamError(f"image {image.get('name')!r} ({image.get('id')}) is {status}: the live image failed "
                            "(see the compute's log)")
    if status == "active" and is_live(image):
        return True, "active"
    if status == "active":
        return False, f"active, waiting for the driver's {LIVE_IMAGE} property (is the server on a vmstream compute?)"
    return False, status


def servers_progress(servers: Sequence[Mapping[str, Any]], count: int) -> tuple[bool, str]:
    """(done, counts by status) for the clones of one start; any ERROR raises, naming its fault."""
    failed = [s for s in servers if s.get("status") == "ERROR"]
    if failed:
        raise VmstreamError("; ".join(f"server {s.get('name')} ({s.get('id')}) is ERROR: {fault_of(s)}" for s in failed))
    by_status: dict[str, int] = {}
    for s in servers:
        by_status[str(s.get("status"))] = by_status.get(str(s.get("status")), 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "none listed yet"
    done = len(servers) >= count and all(s.get("status") == "ACTIVE" for s in servers)
    return done, f"{summary} (of {count})"


def fault_of(server: Mapping[str, Any]) -> str:
    fault = server.get("fault") or {}
    message = str(fault.get("message") or "no fault recorded")
    details = str(fault.get("details") or "")
    # Nova puts the exception's text in message and a traceback in details (admins only): the message says it.
    return message if not details or details in message else f"{message} ({details.strip().splitlines()[-1]})"


def refuse_taken_name(name: str, images: Sequence[Mapping[str, Any]]) -> None:
    """Live images are started by name: a second image of the same name would make that ambiguous."""
    if images:
        ids = ", ".join(str(i.get("id")) for i in images)
        raise Conflict(f"an image named {name!r} exists already ({ids}): choose another name, or delete it first")


def refuse_delete(image: Mapping[str, Any], servers: Sequence[Mapping[str, Any]]) -> None:
    """A live image stays while servers run from it: their memory streams from it."""
    require_live(image)
    if servers:
        names = ", ".join(f"{s.get('name')} ({s.get('id')}, {s.get('status')})" for s in sorted(servers, key=natural_name))
        raise Conflict(f"live image {image.get('name')!r} has {len(servers)} server(s) running from it: {names}; "
                       "delete them first (`openstack server delete ...`)")


def pick_named(items: Sequence[Mapping[str, Any]], name: str, kind: str, hint: str) -> dict[str, Any]:
    """The one item called exactly name (Nova's name filters are regular expressions)."""
    exact = [dict(i) for i in items if i.get("name") == name]
    if not exact:
        raise NotFound(f"no {kind} named or with id {name!r}: {hint}")
    if len(exact) > 1:
        ids = ", ".join(str(i.get("id")) for i in exact)
        raise InvalidInput(f"{len(exact)} {kind}s are named {name!r} ({ids}): give the id instead")
    return exact[0]


def next_link(answer: Mapping[str, Any], key: str) -> str | None:
    """The next page of a list: Nova's `<key>_links` rel=next, Glance's `next`."""
    for link in answer.get(f"{key}_links") or ():
        if link.get("rel") == "next":
            return str(link["href"])
    nxt = answer.get("next")
    return str(nxt) if nxt else None


def error_message(status: int, content_type: str, text: str) -> str:
    """What an OpenStack API said was wrong: Nova's {"kind": {"message"}}, Glance's HTML or text."""
    if content_type.startswith("application/json"):
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            for value in body.values():
                if isinstance(value, dict) and value.get("message"):
                    return str(value["message"])
            if isinstance(body.get("errors"), list) and body["errors"]:
                return str(body["errors"][0].get("detail") or body["errors"][0].get("title"))
            if body.get("message"):
                return str(body["message"])
    plain = re.sub(r"<[^>]+>", " ", text)
    plain = " ".join(plain.split())
    return plain[:500] or f"HTTP {status}"


# ---- output -------------------------------------------------------------------------------


def show_image(image: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """A live image for ShowOne."""
    values = (image.get("id"), image.get("name"), image.get("status"), image.get(LIVE_IMAGE, ""),
              image.get(SOURCE_SERVER, ""), image.get(FLAVOR, ""), image.get(MEMORY_MB, ""), image.get("protected"),
              image.get("created_at"))
    return IMAGE_FIELDS, values


def image_row(image: Mapping[str, Any]) -> tuple[Any, ...]:
    return (image.get("id"), image.get("name"), image.get("status"), image.get(LIVE_IMAGE, ""),
            image.get(SOURCE_SERVER, ""), image.get("created_at"))


def server_row(server: Mapping[str, Any]) -> tuple[Any, ...]:
    # The host is shown to admins only (policy); others see it empty.
    return server.get("id"), server.get("name"), server.get("status"), server.get("OS-EXT-SRV-ATTR:host") or ""


def natural_name(item: Mapping[str, Any]) -> list[Any]:
    """w-2 before w-10: the order Nova numbered the clones in."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(item.get("name", "")))]
