"""Peer hosts: a host agent serves the objects it holds, another host reads them.

peer_router(backend, auth) is a FastAPI router for the host agent to mount
(e.g. under /v1/store). PeerBackend is its client. Routes:

    GET    /objects/{key}          the object; honours one "Range: bytes=a-b" (206)
    HEAD   /objects/{key}          200 if present, 404 if not
    GET    /list?prefix=P          [{"key", "size", "mtime"}], sorted by key
    GET    /bulk                   {"port": N}: the agent's sendfile server (vmstream.store.bulk),
                                   where PeerBackend reads ranges; 404 if it has none
    PUT    /objects/{key}          store the body      (only with writable=True)
    DELETE /objects/{key}          delete              (only with writable=True)

Peers are read-mostly: an agent shares what it holds but, by default, lets no
other host change it. Errors come back as {"error", "message"} with the status of
the store error, so a 503 on the server is a retryable failure on the client.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import urllib3
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from vmstream.agentapi import decode_error
from vmstream.errors import VmstreamError
from vmstream.store.backend import Backend, ObjectInfo, check_key, check_range, parse_range
from vmstream.store.errors import BackendUnavailable, ObjectNotFound, StoreError
from vmstream.store.store import ChunkStore

TOKEN_FIX = "give it that agent's agent.token (VMSTREAM_PEER_TOKEN, for VMSTREAM_STORE=peer:URL)"


def _error_response(exc: VmstreamError) -> JSONResponse:
    status = exc.http_status if not isinstance(exc, BackendUnavailable) else 503
    return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status)


def peer_router(source: Backend | ChunkStore, auth: Callable[..., Any] | None = None, *, writable: bool = False,
                bulk_port: Callable[[], int | None] | None = None) -> APIRouter:
    """Serve a store's objects over HTTP; auth is a FastAPI dependency (e.g. the agent's bearer check).
    bulk_port: the port of a BulkServer of the same store, if one runs.

    The server does not verify chunks: the reading host does, against the chunk map it holds.
    """
    backend = source.backend if isinstance(source, ChunkStore) else source
    router = APIRouter(dependencies=[Depends(auth)] if auth else [])

    ranged: dict[int | str, dict[str, Any]] = {
        200: {"description": "the whole object", "content": {"application/octet-stream": {}}},
        206: {"description": "the byte range asked for", "content": {"application/octet-stream": {}}},
        416: {"description": "a Range this server does not serve, or one past the object's end"},
    }

    @router.get("/objects/{key:path}", responses=ranged)
    def get_object(key: str, range: str | None = Header(None)) -> Response:
        try:
            check_key(key)
            if range is None:
                return Response(backend.get(key), media_type="application/octet-stream")
            wanted = parse_range(range)
            if wanted is None:
                return JSONResponse({"error": "InvalidInput", "message": f"unsupported Range '{range}': use bytes=a-b"}, 416)
            start, size = wanted
            data = backend.get(key, start, size)
            if not data:
                return Response(status_code=416, headers={"Content-Range": "bytes */*"})
            headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/*"}
            return Response(data, status_code=206, headers=headers, media_type="application/octet-stream")
        except VmstreamError as exc:
            return _error_response(exc)

    @router.head("/objects/{key:path}", responses={200: {"description": "the object exists",
                                                          "content": {"application/octet-stream": {}}}})
    def head_object(key: str) -> Response:
        """200 if the object exists, else its error's status (no body, as HEAD has none)."""
        try:
            if backend.exists(check_key(key)):
                return Response(status_code=200, media_type="application/octet-stream")
            return Response(status_code=404, media_type="application/json")
        except VmstreamError as exc:
            return Response(status_code=_error_response(exc).status_code, media_type="application/json")

    @router.get("/bulk")
    def bulk() -> Response:
        port = bulk_port() if bulk_port else None
        if port is None:
            return JSONResponse({"error": "NotFound", "message": "this peer has no bulk server: read through /objects"}, 404)
        return JSONResponse({"port": port})

    @router.get("/list")
    def list_objects(prefix: str = "") -> Response:
        try:
            return JSONResponse([{"key": o.key, "size": o.size, "mtime": o.mtime} for o in backend.list(prefix)])
        except VmstreamError as exc:
            return _error_response(exc)

    if writable:

        @router.put("/objects/{key:path}")
        async def put_object(key: str, request: Request) -> Response:
            data = await request.body()
            try:
                await run_in_threadpool(backend.put, check_key(key), data)
                return Response(status_code=204)
            except VmstreamError as exc:
                return _error_response(exc)

        @router.delete("/objects/{key:path}")
        def delete_object(key: str) -> Response:
            try:
                backend.delete(check_key(key))
                return Response(status_code=204)
            except VmstreamError as exc:
                return _error_response(exc)

    return router


class PeerBackend(Backend):
    """Client of another host's peer_router, e.g. PeerBackend("http://10.0.0.2:7070/v1/store", token).

    It speaks HTTP through urllib3 (http.client reads a body straight from the socket
    into one buffer): a 4 MiB range arrives ~3x faster than through httpx, whose
    pure-Python parser was the limit of a cold host's bulk reads (docs/memfs.md)."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 10.0, connections: int = 32,
                 bulk: str = "auto") -> None:
        """bulk: where to read ranges and streams: "auto" (the server the peer names at /bulk,
        if any), "off" (the router only), or that server's URL as this host reaches it (a proxy
        or NAT between the hosts changes its port)."""
        if bulk not in ("auto", "off") and not re.match(r"^https?://[^/]+$", bulk.rstrip("/")):
            raise StoreError(f"peer bulk reads '{bulk}' are not understood: give auto, off, or http://HOST:PORT")
        self.base_url = base_url.rstrip("/")
        self.name = f"peer:{self.base_url}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}  # given with each request: urllib3 does not merge
        # connections: memfs's fetch lanes and each ChunkStore's read pool share one pool
        self.http = urllib3.PoolManager(
            num_pools=4, maxsize=connections, retries=False, timeout=urllib3.Timeout(connect=timeout, read=timeout)
        )
        self.bulk_mode = bulk
        # the peer's sendfile server's base URL ("": none, the router serves), asked once in auto mode
        self._bulk: str | None = {"auto": None, "off": ""}.get(bulk, bulk.rstrip("/"))

    def _bulk_base(self) -> str:
        """Where to read objects: the peer's bulk server if it names one (asked once), else the router."""
        if self._bulk is None:
            try:
                r = self.http.request("GET", self.base_url + "/bulk", headers=self.headers)
            except urllib3.exceptions.HTTPError:
                return self.base_url  # the peer does not answer now: ask again next time
            bulk = ""  # an older peer, or one without a local store: the router serves everything
            try:
                if r.status == 200:
                    url = urllib3.util.parse_url(self.base_url)
                    bulk = f"{url.scheme}://{url.host}:{int(r.json()['port'])}"
            except (ValueError, KeyError, TypeError):
                pass
            self._bulk = bulk
        return self._bulk or self.base_url

    def _read(self, key: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        """GET an object (or a range) from the bulk server, or the router. A bulk server that
        does not answer: the router serves this read, and (auto) the peer is asked again next time."""
        base = self._bulk_base()
        try:
            return self._request("GET", "get", key, base=base, **kwargs)
        except BackendUnavailable:
            if base == self.base_url:
                raise
            if self.bulk_mode == "auto":
                self._bulk = None  # its agent may have restarted on another port
            return self._request("GET", "get", key, **kwargs)

    def _request(self, method: str, what: str, key: str, url: str | None = None, base: str | None = None,
                 **kwargs: Any) -> urllib3.BaseHTTPResponse:
        url = (base or self.base_url) + (url or f"/objects/{check_key(key)}")
        try:
            r = self.http.request(method, url, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)
        except urllib3.exceptions.HTTPError as exc:  # refused, timed out, cut off mid-body
            raise BackendUnavailable(f"{self.name}: {what} '{key}' failed: {type(exc).__name__}: {exc}") from exc
        return self._check(r, what, key)

    def _check(self, r: urllib3.BaseHTTPResponse, what: str, key: str) -> urllib3.BaseHTTPResponse:
        """The response if it is one to use; else the store error its status means."""
        if r.status < 400 or r.status == 416:
            return r
        if r.status == 404:
            raise ObjectNotFound(f"{self.name}: no object '{key}'")
        answer = httpx.Response(r.status, headers=dict(r.headers), content=r.data)  # the agent API's error decoder reads httpx's
        err = decode_error(answer, "the peer", prefix=False, token_fix=TOKEN_FIX)
        msg = f"{self.name}: {what} '{key}' failed: {err}"
        if r.status in (429, 502, 503, 504):  # overloaded, restarting or behind a failing proxy
            raise BackendUnavailable(msg)
        if r.status == 401:
            raise StoreError(msg)
        if r.status == 403:
            raise StoreError(msg + " (is the peer's token right?)")
        if r.status == 405:
            raise StoreError(msg + " (the peer serves its store read-only)")
        if isinstance(err, StoreError):  # the peer's own store error (InvalidKey, CorruptChunk, StoreConflict, ...)
            raise type(err)(msg)
        raise StoreError(msg)

    def put(self, key: str, data: bytes) -> None:
        self._request("PUT", "put", key, body=data)

    def get(self, key: str, offset: int = 0, size: int | None = None) -> bytes:
        check_range(offset, size)
        if size == 0:
            if not self.exists(key):
                raise ObjectNotFound(f"{self.name}: no object '{key}'")
            return b""
        headers = {}
        if offset or size is not None:
            headers["Range"] = f"bytes={offset}-" + ("" if size is None else str(offset + size - 1))
        r = self._read(key, headers=headers)
        if r.status == 416:
            return b""
        if r.status == 206:
            got = r.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {offset}-"):
                raise StoreError(f"{self.name}: get '{key}': peer answered range '{got}' for offset {offset}")
            return r.data
        return r.data[offset:] if size is None else r.data[offset : offset + size]  # server ignored Range

    def stream(self, key: str, piece: int = 1 << 20) -> Iterator[bytes]:
        """One GET, read as it arrives: one round trip however large the object."""
        url = f"{self._bulk_base()}/objects/{check_key(key)}"
        try:
            r = self.http.request("GET", url, headers=self.headers, preload_content=False)
            try:
                if r.status >= 400:
                    r.read()
                    self._check(r, "get", key)
                yield from r.stream(piece)
            finally:
                r.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            raise BackendUnavailable(f"{self.name}: streaming '{key}' failed: {type(exc).__name__}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self._request("HEAD", "exists", key)
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        r = self._request("GET", "list", prefix, url="/list", fields={"prefix": prefix})
        return iter(ObjectInfo(o["key"], o["size"], o["mtime"]) for o in r.json())

    def delete(self, key: str) -> None:
        self._request("DELETE", "delete", key)

    def close(self) -> None:
        self.http.clear()
