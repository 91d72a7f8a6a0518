"""The error tree every layer raises; the CLI and API turn it into messages.

    VmstreamError            anything the user can act on (exit code 1)
     +- InvalidInput         bad name, size or option (exit 2, HTTP 400)
     +- NotFound             unknown VM or image (exit 3, HTTP 404)
     +- Conflict             duplicate name, image still in use (exit 4, HTTP 409)
     +- GuestError           guest kernel/initramfs missing or unbuildable (exit 5, HTTP 422)
     +- QemuError            QEMU failed to start, crashed or did not answer (exit 6, HTTP 500)
     +- AgentUnavailable     the host agent cannot be reached or started (exit 7)

Each message names the problem and, where there is one, the fix.
"""

from __future__ import annotations


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


BY_NAME: dict[str, type[VmstreamError]] = {
    cls.__name__: cls
    for cls in (VmstreamError, InvalidInput, NotFound, Conflict, GuestError, QemuError, AgentUnavailable)
}
