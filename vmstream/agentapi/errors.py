"""The one decoder of the agent API's error body, {"error": ClassName, "message": ...}.

The agent answers a VmstreamError with its class name and message, at the class's HTTP
status. A client turns that back into the same class, so the CLI exits with the code the
error was raised with, wherever (this host's agent, a peer's agent, a peer's store).
"""

from __future__ import annotations

from typing import Any

import httpx

from vmstream.errors import (
    AgentUnavailable,
    Conflict,
    GuestError,
    InvalidInput,
    NotFound,
    VmstreamError,
    error_class,
)

BY_STATUS: dict[int, type[VmstreamError]] = {
    400: InvalidInput,
    401: InvalidInput,
    404: NotFound,
    409: Conflict,
    422: GuestError,
    500: VmstreamError,
    503: AgentUnavailable,
}
"""The class of an error whose name this process does not know (another layer's subclass whose
module is not imported, a newer agent) or that came without one (a proxy, FastAPI's own
{"detail": ...}). Every other status is a plain VmstreamError."""

TOKEN_FIX = "use the token in that agent's data dir (agent.token)"


def class_for_status(status: int) -> type[VmstreamError]:
    """The error class a bare HTTP status stands for."""
    return BY_STATUS.get(status, VmstreamError)


def _detail(detail: Any) -> str:
    """FastAPI's {"detail": ...}: a string, or a list of validation errors with 'loc' and 'msg'."""
    if isinstance(detail, list):
        parts = []
        for d in detail:
            if isinstance(d, dict):
                loc = ".".join(str(p) for p in d.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
            else:
                parts.append(str(d))
        return "; ".join(parts)
    return str(detail)


def decode_error(response: httpx.Response, who: str, *, prefix: bool = True, token_fix: str = TOKEN_FIX) -> VmstreamError:
    """The VmstreamError an error answer (status >= 400) stands for; the caller raises it.

    who names the answering agent in the message, e.g. "peer host 'b'". The agent's own
    message is shown as "WHO: MESSAGE", or bare with prefix=False (the CLI's own agent needs
    no introduction). An answer that is not the agent's error body says what came back.
    A 401 is always InvalidInput naming the token; token_fix says how to get the right one.
    """
    status = response.status_code
    if status == 401:
        return InvalidInput(f"{who} refused the token: {token_fix}")
    name: str | None = None
    message: str | None = None
    try:
        body = response.json()
    except ValueError:  # not JSON (a proxy's page, an empty HEAD answer)
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            name = body["error"]
        if body.get("message"):
            message = str(body["message"])
        elif body.get("detail"):
            message = _detail(body["detail"])
    cls = (error_class(name) if name else None) or class_for_status(status)
    if message is None:
        text = response.text.strip()[:200]
        return cls(f"{who} answered HTTP {status}: {text or response.reason_phrase or 'no body'}")
    return cls(f"{who}: {message}" if prefix else message)
