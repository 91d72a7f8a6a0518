"""vmstream.agentapi: the one error decoder, the API clients, and who may import what."""

from __future__ import annotations

import ast
import asyncio
import importlib
import pkgutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

import vmstream
import vmstream.store.errors  # its classes are in the tree from the start, not only after the walk
from tests.store.conftest import serve
from vmstream.agentapi import BY_STATUS, ApiClient, AsyncApiClient, class_for_status, decode_error
from vmstream.errors import (
    AgentUnavailable,
    Conflict,
    GuestError,
    InvalidInput,
    NotFound,
    QemuError,
    VmstreamError,
    error_class,
    error_classes,
)

PKG = Path(vmstream.__file__).parent
TOKEN = "t0ken"


def all_error_classes() -> list[type[VmstreamError]]:
    """Every VmstreamError subclass in the code base: import every module first (not __main__, which runs the CLI,
    nor the Nova modules, which import only inside Nova's services and define no errors)."""
    for m in pkgutil.walk_packages(vmstream.__path__, "vmstream."):
        if m.name not in ("vmstream.__main__", "vmstream.openstack.nova.driver", "vmstream.openstack.nova.weigher",
                          "vmstream.openstack.nova.service_glance"):
            importlib.import_module(m.name)
    return list(error_classes())


def _answer(cls: type[VmstreamError], name: str | None = None) -> httpx.Response:
    """What the agent's exception handler sends for cls."""
    return httpx.Response(cls.http_status, json={"error": name or cls.__name__, "message": "it broke: do this"})


def test_the_walk_finds_the_other_layers_errors() -> None:
    names = {c.__name__ for c in all_error_classes()}
    assert {"StoreConflict", "ObjectNotFound", "StoreUnavailable", "MemfsError", "MigrationError", "NetError"} <= names


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_round_trips_by_name(cls: type[VmstreamError]) -> None:
    err = decode_error(_answer(cls), "peer host 'b'")
    assert type(err) is cls
    assert err.exit_code == cls.exit_code
    assert str(err) == "peer host 'b': it broke: do this"
    assert error_class(cls.__name__) is cls


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_exit_code_and_http_status_go_together(cls: type[VmstreamError]) -> None:
    """A client that does not know the class's name (its module is not imported there) decodes it by status
    alone and must still exit with the class's code. QemuError shares 500 with VmstreamError: it and its
    subclasses keep exit 6 only by name (QemuError itself is always known: it is in vmstream.errors)."""
    base = {(c.exit_code, c.http_status) for c in BY_STATUS.values()} | {(QemuError.exit_code, QemuError.http_status)}
    assert (cls.exit_code, cls.http_status) in base, f"{cls.__name__}: exit {cls.exit_code} with HTTP {cls.http_status}"
    if not issubclass(cls, QemuError):
        err = decode_error(_answer(cls, "NotAClassAnywhere"), "the agent")
        assert err.exit_code == cls.exit_code == class_for_status(cls.http_status).exit_code
        assert issubclass(type(err), VmstreamError) and str(err) == "the agent: it broke: do this"


def test_store_conflict_exits_4_even_where_the_store_is_not_imported() -> None:
    err = decode_error(httpx.Response(409, json={"error": "SomeLayersConflict", "message": "raced a GC: store it again"}), "x")
    assert isinstance(err, Conflict) and err.exit_code == 4


@pytest.mark.parametrize(("status", "body", "cls", "text"), [
    (404, {"detail": "Not Found"}, NotFound, "the agent: Not Found"),
    (422, {"detail": [{"loc": ["body", "memory"], "msg": "field required"}]}, GuestError, "the agent: memory: field required"),
    (503, None, AgentUnavailable, "the agent answered HTTP 503: Service Unavailable"),
    (502, "<html>bad gateway</html>", VmstreamError, "the agent answered HTTP 502: <html>bad gateway</html>"),
    (400, {"error": "InvalidInput"}, InvalidInput, 'the agent answered HTTP 400: {"error":"InvalidInput"}'),
])
def test_answers_that_are_not_the_error_body(status: int, body: object, cls: type[VmstreamError], text: str) -> None:
    r = httpx.Response(status, json=body) if isinstance(body, dict) else httpx.Response(status, text=body or "")
    err = decode_error(r, "the agent")
    assert type(err) is cls and str(err) == text


def test_401_names_the_token_and_the_fix() -> None:
    err = decode_error(httpx.Response(401, json={"detail": "missing or wrong agent token"}), "peer host 'b'",
                       token_fix="add it again with its current agent.token")
    assert type(err) is InvalidInput and err.exit_code == 2
    assert str(err) == "peer host 'b' refused the token: add it again with its current agent.token"


def test_prefix_false_shows_the_agents_message_bare() -> None:
    assert str(decode_error(_answer(NotFound), "the agent", prefix=False)) == "it broke: do this"


# ---- the clients against a real server shaped like the agent ----


def _agent_app() -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"detail": "missing or wrong agent token"}, 401)
        return await call_next(request)

    @app.exception_handler(VmstreamError)
    async def failed(_: Request, exc: VmstreamError) -> JSONResponse:  # as vmstream.host.api does
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=exc.http_status)

    @app.get("/v1/ok")
    def ok(x: int = 0) -> dict[str, int]:
        return {"x": x}

    @app.delete("/v1/empty", status_code=204)
    def empty() -> None:
        return None

    @app.get("/v1/conflict")
    def conflict() -> None:
        raise vmstream.store.errors.StoreConflict("a commit raced a garbage collection: store the file again")

    @app.get("/v1/text")
    def text() -> PlainTextResponse:
        return PlainTextResponse("not json")

    @app.get("/v1/slow")
    def slow(s: float = 2.0) -> dict[str, bool]:
        time.sleep(s)
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
def agent_url() -> Iterator[str]:
    with serve(_agent_app()) as url:
        yield url


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sync_client(agent_url: str) -> None:
    with ApiClient(agent_url + "/", TOKEN, "peer host 'b'") as api:
        assert api.call("GET", "/v1/ok", params={"x": 3}) == {"x": 3}
        assert api.call("DELETE", "/v1/empty") is None
        with pytest.raises(vmstream.store.errors.StoreConflict, match=r"^peer host 'b': a commit raced") as info:
            api.call("GET", "/v1/conflict")
        assert info.value.exit_code == 4
        with pytest.raises(VmstreamError, match="not JSON"):
            api.call("GET", "/v1/text")
        with pytest.raises(NotFound, match="Not Found"):
            api.call("GET", "/v1/nowhere")
        with pytest.raises(AgentUnavailable, match=r"^lost contact with peer host 'b' at http://127.0.0.1:\d+ \(ReadTimeout"):
            api.call("GET", "/v1/slow", params={"s": 1.0}, timeout=0.2)
    with ApiClient(agent_url, "wrong", "peer host 'b'") as api, pytest.raises(InvalidInput, match="refused the token"):
        api.call("GET", "/v1/ok")
    port = _closed_port()
    with ApiClient(f"http://127.0.0.1:{port}", TOKEN, "peer host 'c'") as api:
        with pytest.raises(AgentUnavailable, match=rf"^peer host 'c' at http://127.0.0.1:{port} cannot be reached") as unreachable:
            api.call("GET", "/v1/ok")
        assert unreachable.value.exit_code == 7


def test_async_client_behaves_the_same(agent_url: str) -> None:
    async def main() -> None:
        async with AsyncApiClient(agent_url, TOKEN, "peer host 'b'", timeout=5.0) as api:
            assert await api.call("GET", "/v1/ok", params={"x": 4}) == {"x": 4}
            with pytest.raises(vmstream.store.errors.StoreConflict, match=r"^peer host 'b': a commit raced"):
                await api.call("GET", "/v1/conflict")
        api = AsyncApiClient(agent_url, "wrong", "peer host 'b'", token_fix="add it again with its current agent.token")
        with pytest.raises(InvalidInput, match=r"^peer host 'b' refused the token: add it again"):
            await api.call("GET", "/v1/ok")
        await api.aclose()
        api = AsyncApiClient(f"http://127.0.0.1:{_closed_port()}", TOKEN, "peer host 'c'")
        with pytest.raises(AgentUnavailable, match="cannot be reached"):
            await api.call("GET", "/v1/ok")
        await api.aclose()

    asyncio.run(main())


# ---- imports: agentapi stays low, benches do not reach up into the CLI ----


def _imports(path: Path) -> set[str]:
    """Modules a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_agentapi_imports_only_errors_httpx_and_the_stdlib() -> None:
    for path in (PKG / "agentapi").glob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            ok = (top in sys.stdlib_module_names or top == "httpx" or name == "vmstream.errors"
                  or name == "vmstream.agentapi" or name.startswith("vmstream.agentapi."))
            assert ok, f"{path.name} imports {name}"


def test_benches_do_not_import_the_cli() -> None:
    for path in (PKG / "bench").glob("*.py"):
        assert not {n for n in _imports(path) if n == "vmstream.cli" or n.startswith("vmstream.cli.")}, path.name
