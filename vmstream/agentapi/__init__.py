"""Clients of the vmstream agent's REST API, for every layer that talks to an agent.

    decode_error(response, who)        the API's error body -> the VmstreamError it stands for
    ApiClient / AsyncApiClient         base URL + token: call(method, path, **kw) -> JSON
    AgentClient                        this data dir's agent, started in the background if none runs

A low-level package: it imports only vmstream.errors, httpx and the standard library, so
the CLI, the benches, the host layer (its peer client) and the store (its peer backend)
can all use it.
"""

from vmstream.agentapi.client import DEFAULT_TIMEOUT, ApiClient, AsyncApiClient
from vmstream.agentapi.errors import BY_STATUS, TOKEN_FIX, class_for_status, decode_error
from vmstream.agentapi.local import AgentClient

__all__ = [
    "BY_STATUS", "DEFAULT_TIMEOUT", "TOKEN_FIX", "AgentClient", "ApiClient", "AsyncApiClient", "class_for_status", "decode_error",
]
