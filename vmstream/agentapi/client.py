"""HTTP clients of a vmstream agent's REST API: one sync, one async, same behaviour.

Both send the bearer token, return the parsed JSON answer, raise AgentUnavailable naming
the agent when it cannot be reached, and decode_error() for any answer >= 400.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx

from vmstream.agentapi.errors import TOKEN_FIX, decode_error
from vmstream.errors import AgentUnavailable, VmstreamError

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class _Base:
    """What the sync and async clients share: where the agent is and how its answers read."""

    def __init__(self, base_url: str, token: str | None, who: str, *, prefix_errors: bool = True, token_fix: str = TOKEN_FIX) -> None:
        self.base_url = base_url.rstrip("/")
        self.who = who
        self.prefix_errors = prefix_errors
        self.token_fix = token_fix
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _unreachable(self, exc: httpx.HTTPError) -> AgentUnavailable:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):  # nobody listens, no route, bad URL
            return AgentUnavailable(f"{self.who} at {self.base_url} cannot be reached ({what}): is it running, and is the URL right?")
        return AgentUnavailable(f"lost contact with {self.who} at {self.base_url} ({what}): "
                                "it may have stopped or be overloaded; try again")

    def _answer(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise decode_error(r, self.who, prefix=self.prefix_errors, token_fix=self.token_fix)
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            raise VmstreamError(f"{self.who} answered {r.request.method} {r.request.url.path} with something that is not JSON: "
                                f"{r.text[:200]!r}") from None


class ApiClient(_Base):
    """Synchronous client (httpx.Client), e.g. ApiClient("http://127.0.0.1:8400", token, "peer host 'b'")."""

    def __init__(self, base_url: str, token: str | None, who: str, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, *,
                 prefix_errors: bool = True, token_fix: str = TOKEN_FIX) -> None:
        super().__init__(base_url, token, who, prefix_errors=prefix_errors, token_fix=token_fix)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request (kwargs as httpx: json=, params=, timeout=, ...); the parsed JSON answer, None if empty."""
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(r)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncApiClient(_Base):
    """Asynchronous client (httpx.AsyncClient) with the same behaviour as ApiClient: `await call(...)`, `await aclose()`."""

    def __init__(self, base_url: str, token: str | None, who: str, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, *,
                 prefix_errors: bool = True, token_fix: str = TOKEN_FIX) -> None:
        super().__init__(base_url, token, who, prefix_errors=prefix_errors, token_fix=token_fix)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request (kwargs as httpx); the parsed JSON answer, None if empty."""
        try:
            r = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(r)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
