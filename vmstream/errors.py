"""The error tree every layer raises; the CLI and API turn it into messages.

    VmstreamError            anything the user can act on (exit code 1)
     +- InvalidInput         bad name, size or option (exit 2, HTTP 400)
     +- NotFound             unknown VM or image (exit 3, HTTP 404)
     +- Conflict             duplicate name, image still in use (exit 4, HTTP 409)
     +- GuestError           guest kernel/initramfs missing or unbuildable (exit 5, HTTP 422)
     +- QemuError            QEMU failed to start, crashed or did not answer (exit 6, HTTP 500)
     +- AgentUnavailable     the host agent cannot be reached or started (exit 7, HTTP 503)

Other layers subclass these (vmstream.store.errors, memfs, migrate, net) and keep the
pair (exit_code, http_status) of one of the classes above, or (1, 500) for plain
VmstreamError: a client that does not know a subclass's name decodes it by its HTTP
status (vmstream.agentapi.decode_error) and must still exit with the right code.
QemuError is the one class that shares a status (500) with another; it is always
known by name because it lives here.

Each message names the problem and, where there is one, the fix.
"""

from __future__ import annotations

from collections.abc import Iterator


class VmstreamError(Exception):
    """Base class: an error with a message fit to show the user."""

    exit_code = 1
    http_status = 500


class InvalidInput(VmstreamError):
    exit_code = 2
    http_status = 400


class NotFound(VmstreamError):
    exit_code = 3
    http_status = 404


class Conflict(VmstreamError):
    exit_code = 4
    http_status = 409


class GuestError(VmstreamError):
    exit_code = 5
    http_status = 422


class QemuError(VmstreamError):
    exit_code = 6
    http_status = 500


class AgentUnavailable(VmstreamError):
    exit_code = 7
    http_status = 503


def error_classes() -> Iterator[type[VmstreamError]]:
    """VmstreamError and every subclass defined so far, breadth first (bases before subclasses)."""
    seen: set[type[VmstreamError]] = set()
    queue: list[type[VmstreamError]] = [VmstreamError]
    while queue:
        cls = queue.pop(0)
        if cls not in seen:
            seen.add(cls)
            yield cls
            queue.extend(cls.__subclasses__())


def error_class(name: str) -> type[VmstreamError] | None:
    """The error class called `name`, looked up at call time so subclasses of other layers
    (e.g. vmstream.store.errors.StoreConflict) are found once their module is imported."""
    return next((cls for cls in error_classes() if cls.__name__ == name), None)
