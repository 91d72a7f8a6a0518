"""The agent's REST API (FastAPI). Every /v1 route needs the bearer token."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmstream import __version__
from vmstream.errors import InvalidInput, NotFound, VmstreamError
from vmstream.host.manager import HostManager
from vmstream.host.metrics import AgentMetrics
from vmstream.host.network import MAX_FRAMES_BODY, unpack_frames
from vmstream.host.observe import Observer
from vmstream.host.schemas import (
    BootRequest,
    BootSource,
    ClockReading,
    CreateImageRequest,
    ErrorBody,
    GroupInfo,
    GroupRequest,
    GroupUpdate,
    GuestBuildRequest,
    GuestCommand,
    HostInfo,
    ImageInfo,
    IncomingAnswer,
    IncomingRequest,
    IncomingStatus,
    LentAddress,
    MigrateRequest,
    MigrationInfo,
    PeerInfo,
    PeerRequest,
    QgaCommand,
    StartRequest,
    StartResult,
    VmInfo,
    WarmResult,
)
from vmstream.policy import MemoryPolicy
from vmstream.store import LocalBackend, RetryingBackend, peer_router
from vmstream.store.bulk import BulkServer

# what any route may answer instead (VmstreamError's statuses, and 401 for the token), in one shape
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 422, 500, 503)}
WATCH_POLL_S = 0.25  # how often a dashboard's stream looks for a change (a counter: no query)
WATCH_MIN_S = 0.5  # at most two updates a second during a burst
WATCH_IDLE_S = 5.0  # an update at least this often (memory moves without the VMs changing)


class CountRequests:
    """Every API request counted by method, route (its template, not the path: /v1/vms/{name})
    and status, and timed (vmstream_api_requests_total, vmstream_api_request_duration_seconds)."""

    def __init__(self, app: ASGIApp, metrics: AgentMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.api_requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.api_latency.labels(scope["method"], route).observe(time.perf_counter() - t0)


def create_app(manager: HostManager, token: str, on_shutdown: Callable[[], None]) -> FastAPI:
    # other hosts read this host's store ranges by sendfile, when it is a local one
    backend = manager.store.backend
    local = backend.inner if isinstance(backend, RetryingBackend) else backend
    bulk = BulkServer(local, token) if isinstance(local, LocalBackend) else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await manager.reattach()
        if bulk is not None:
            bulk.start()
        try:
            yield
        finally:
            if bulk is not None:
                bulk.close()
            await manager.shutdown()

    app = FastAPI(title="vmstream host agent", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES)
    app.add_middleware(CountRequests, metrics=manager.metrics)
    observer = Observer(manager)
    scrape_token = manager.settings.metrics_token

    def auth(authorization: str = Header("")) -> None:
        if not secrets.compare_digest(authorization, f"Bearer {token}"):
            raise HTTPException(401, "missing or wrong agent token: the CLI reads it from the data dir",
                                headers={"WWW-Authenticate": "Bearer"})

    def read_auth(authorization: str = Header("")) -> None:
        """The agent token, or the read-only scrape token (VMSTREAM_METRICS_TOKEN) where one is set."""
        if scrape_token and secrets.compare_digest(authorization, f"Bearer {scrape_token}"):
            return
        auth(authorization)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own errors (a wrong token, an unknown route or method) in the agent's error shape."""
        try:
            kind = HTTPStatus(exc.status_code).phrase.replace(" ", "")
        except ValueError:  # a status http.HTTPStatus does not name
            kind = "Error"
        return JSONResponse({"error": kind, "message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(VmstreamError)
    async def vmstream_error(_: Request, exc: VmstreamError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "InvalidInput", "message": f"invalid request: {msgs}"}, status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "version": __version__}

    v1 = [Depends(auth)]

    # ---- what an operator watches: Prometheus metrics and the dashboard ----------
    @app.get("/metrics", dependencies=[Depends(read_auth)], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Prometheus's text format: VMs by state, per-VM memory, host memory, memfs, migrations, API requests."""
        return Response(await observer.metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        """The dashboard page (no data in it: it asks for the token, then reads /v1/dashboard/*)."""
        return HTMLResponse(resources.files("vmstream.host").joinpath("dashboard.html").read_text())

    async def dashboard_state() -> dict[str, Any]:
        snap = await observer.snapshot()
        starts = [[round(s.at, 3), round(s.seconds, 4), s.image, s.vm] for s in manager.metrics.recent_starts]
        return {**snap.to_dict(), "starts": starts, "agent": {"pid": os.getpid(), "version": __version__}}

    @app.get("/v1/dashboard/state", dependencies=[Depends(read_auth)])
    async def dashboard_now() -> dict[str, Any]:
        """All the dashboard shows, now: host, peers, images, VMs with their memory, groups, migrations, clone starts."""
        return await dashboard_state()

    @app.get("/v1/dashboard/events", dependencies=[Depends(read_auth)], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def dashboard_events() -> StreamingResponse:
        """Server-sent events: the dashboard's state when VMs change (at most every WATCH_MIN_S), else every WATCH_IDLE_S."""

        async def events() -> AsyncIterator[str]:
            seen, sent = -1, 0.0
            while True:
                now = time.monotonic()
                version = manager.registry.version + manager.metrics.events
                if (version != seen and now - sent >= WATCH_MIN_S) or now - sent >= WATCH_IDLE_S:
                    seen, sent = version, now
                    yield f"data: {json.dumps(await dashboard_state(), separators=(',', ':'))}\n\n"
                await asyncio.sleep(WATCH_POLL_S)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
    # other hosts stream this host's chunks (PeerBackend), with the same token
    app.include_router(peer_router(manager.store, auth, bulk_port=lambda: bulk.port if bulk else None), prefix="/v1/store")

    @app.post("/v1/host/cache/drop", dependencies=v1)
    async def drop_cache() -> dict[str, Any]:
        """Empty this host's chunk cache and memfs page cache (cold-start benchmarks)."""
        return await manager.drop_caches()

    @app.post("/v1/host/store/gc", dependencies=v1)
    async def store_gc(grace: float = 3600.0) -> dict[str, Any]:
        """Garbage-collect the store now; a pack goes on the first run >= grace seconds after it was condemned."""
        if grace < 0:
            raise InvalidInput("grace must be >= 0 seconds")
        return await manager.collect_garbage(grace)

    @app.get("/v1/host", dependencies=v1)
    async def host() -> dict[str, Any]:
        return await manager.host_info()

    @app.get("/v1/host/memory", dependencies=v1)
    async def host_memory() -> dict[str, Any]:
        return manager.memory_policy_info()

    @app.get("/v1/info", dependencies=v1)
    async def info() -> HostInfo:
        return await manager.info()

    @app.post("/v1/guest/build", dependencies=v1)
    async def guest_build(req: GuestBuildRequest) -> dict[str, str]:
        g = await asyncio.to_thread(manager.starter.guest, Path(req.kernel) if req.kernel else None, req.force)
        return {"key": g.key, "kernel": str(g.kernel), "initrd": str(g.initrd), "kernel_release": g.kernel_release}

    @app.get("/v1/vms", dependencies=v1)
    async def list_vms() -> list[VmInfo]:
        return manager.list_vms()

    @app.post("/v1/vms", dependencies=v1)
    async def boot(req: BootRequest) -> VmInfo:
        return await manager.boot(
            req.name, req.memory, req.cpus, req.guest_agent, req.disk, req.ready, req.publish, req.timeout,
            boot=BootSource(req.boot, req.kernel, req.initrd, req.append),
            user_data=req.user_data.encode() if req.user_data is not None else None, memory_policy=req.memory_policy,
        )

    @app.get("/v1/vms/{name}", dependencies=v1)
    async def show(name: str) -> VmInfo:
        return manager.show(name)

    @app.put("/v1/vms/{name}/memory", dependencies=v1)
    async def set_memory(name: str, policy: MemoryPolicy) -> VmInfo:
        return manager.set_memory_policy(name, policy)

    @app.post("/v1/vms/{name}/pause", dependencies=v1)
    async def pause(name: str) -> VmInfo:
        return await manager.pause(name)

    @app.post("/v1/vms/{name}/unpause", dependencies=v1)
    async def unpause(name: str) -> VmInfo:
        return await manager.unpause(name)

    @app.delete("/v1/vms/{name}", dependencies=v1)
    async def destroy(name: str) -> dict[str, str]:
        await manager.destroy(name)
        return {"destroyed": name}

    @app.post("/v1/vms/{name}/guest", dependencies=v1)
    async def ask(name: str, req: GuestCommand) -> dict[str, Any]:
        return await manager.ask(name, req.command, req.timeout)

    @app.get("/v1/vms/{name}/clock", dependencies=v1)
    async def clock(name: str, source: Literal["agent", "qga"] = "agent", samples: Annotated[int, Query(ge=1, le=50)] = 5) -> ClockReading:
        return await manager.clock(name, source, samples)

    @app.post("/v1/vms/{name}/qga", dependencies=v1)
    async def qga(name: str, req: QgaCommand) -> dict[str, Any]:
        return {"return": await manager.qga(name, req.execute, req.arguments, req.timeout)}

    @app.get("/v1/live-images", dependencies=v1)
    async def list_images() -> list[ImageInfo]:
        return manager.image_ops.describe_all()

    @app.post("/v1/live-images", dependencies=v1)
    async def create_image(req: CreateImageRequest) -> ImageInfo:
        return await manager.image_ops.create(req.vm, req.name, req.flatten)

    @app.get("/v1/live-images/{name}/servers", dependencies=v1)
    async def servers(name: str) -> list[VmInfo]:
        return manager.image_ops.servers(name)

    @app.post("/v1/live-images/{name}/start", dependencies=v1)
    async def start(name: str, req: StartRequest) -> StartResult:
        try:
            user_data = base64.b64decode(req.user_data_b64, validate=True) if req.user_data_b64 is not None else None
        except (binascii.Error, ValueError) as exc:  # ValueError: characters outside ASCII
            raise InvalidInput(f"user_data_b64 is not valid base64: {exc}") from exc
        return await manager.clones.start(name, req.count, req.name, req.params, user_data, req.prefetch, req.pool, req.names,
                                          req.memory_policy)

    @app.post("/v1/live-images/{name}/warm", dependencies=v1)
    async def warm(name: str) -> WarmResult:
        return await manager.image_ops.warm(name)

    @app.delete("/v1/live-images/{name}", dependencies=v1)
    async def delete_image(name: str) -> dict[str, str]:
        await manager.image_ops.delete(name)
        return {"deleted": name}

    # ---- scaling groups -----------------------------------------------------------
    groups = manager.groups

    @app.get("/v1/groups", dependencies=v1)
    async def list_groups() -> list[GroupInfo]:
        return groups.list()

    @app.post("/v1/groups", dependencies=v1)
    async def create_group(req: GroupRequest) -> GroupInfo:
        """A group: its HAProxy on 127.0.0.1:port and min_size members, answering once they serve."""
        return await groups.create(req)

    @app.get("/v1/groups/{name}", dependencies=v1)
    async def show_group(name: str) -> GroupInfo:
        return groups.show(name)

    @app.patch("/v1/groups/{name}", dependencies=v1)
    async def update_group(name: str, req: GroupUpdate) -> GroupInfo:
        return await groups.update(name, req)

    @app.delete("/v1/groups/{name}", dependencies=v1)
    async def delete_group(name: str) -> dict[str, str]:
        """Its HAProxy stops (requests in flight finish), then its members are destroyed."""
        await groups.delete(name)
        return {"deleted": name}

    # ---- migration: peers, the source's jobs, the destination's incoming VMs ----
    mig, incoming_vms, peer_hosts = manager.migrations, manager.incoming, manager.peers

    @app.get("/v1/peers", dependencies=v1)
    async def peers() -> list[PeerInfo]:
        return peer_hosts.list()

    @app.put("/v1/peers/{name}", dependencies=v1)
    async def add_peer(name: str, req: PeerRequest) -> PeerInfo:
        return await peer_hosts.add(name, req.url, req.token)

    @app.delete("/v1/peers/{name}", dependencies=v1)
    async def remove_peer(name: str) -> dict[str, str]:
        peer_hosts.remove(name)
        return {"removed": name}

    @app.get("/v1/addresses/lent", dependencies=v1)
    async def lent_addresses() -> list[LentAddress]:
        return [LentAddress(ip=r.ip, vm=r.vm, to_host=r.to_host, lent_at=r.lent_at) for r in manager.registry.lent()]

    @app.post("/v1/addresses/lent/reconcile", dependencies=v1)
    async def reconcile_lent() -> dict[str, list[str]]:
        """Ask the peers: an address lent to a VM none of them has is given back."""
        return {"released": await manager.reconcile_lent()}

    @app.delete("/v1/addresses/lent/{ip}", dependencies=v1)
    async def release_address(ip: str, vm: str) -> dict[str, str]:
        """A peer reports VM vm, which left with address ip, destroyed: ip may be handed out again."""
        if not manager.registry.release(ip, vm):
            raise NotFound(f"address {ip} is not lent to a VM named '{vm}' by this host: see GET /v1/addresses/lent")
        return {"released": ip}

    @app.post("/v1/vms/{name}/migrate", dependencies=v1, status_code=202)
    async def migrate(name: str, req: MigrateRequest) -> MigrationInfo:
        return await mig.start(name, req.to, req.mode, req.max_bandwidth_mbps)

    @app.get("/v1/vms/{name}/migration", dependencies=v1)
    async def migration(name: str) -> MigrationInfo:
        return mig.status(name)

    @app.delete("/v1/vms/{name}/migration", dependencies=v1)
    async def cancel_migration(name: str) -> MigrationInfo:
        return mig.cancel(name)

    @app.post("/v1/migrations/incoming", dependencies=v1)
    async def incoming(req: IncomingRequest) -> IncomingAnswer:
        return await incoming_vms.prepare(req)

    @app.get("/v1/migrations/incoming/{name}", dependencies=v1)
    async def incoming_status(name: str) -> IncomingStatus:
        return await incoming_vms.status(name)

    @app.post("/v1/migrations/incoming/{name}/running", dependencies=v1)
    async def incoming_running(name: str, timeout: float = 60.0) -> VmInfo:
        return await incoming_vms.running(name, timeout)

    @app.post("/v1/migrations/incoming/{name}/announce", dependencies=v1)
    async def incoming_announce(name: str) -> dict[str, str]:
        await incoming_vms.announce(name)
        return {"announced": name}

    @app.post("/v1/vms/{name}/frames", dependencies=v1,
              openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                  "schema": {"type": "string", "format": "binary", "maxLength": MAX_FRAMES_BODY}}}}})
    async def deliver_frames(name: str, request: Request) -> dict[str, int]:
        """Frames a VM's old host kept for it while it moved (vmstream.host.network.pack_frames)."""
        body = await request.body()
        if len(body) > MAX_FRAMES_BODY:
            raise InvalidInput(f"a frame list of {len(body)} bytes: at most {MAX_FRAMES_BODY}")
        rec = manager.registry.get(name)
        return {"delivered": await manager.starter.deliver_frames(rec, unpack_frames(body))}

    @app.post("/v1/migrations/incoming/{name}/claim", dependencies=v1)
    async def incoming_claim(name: str) -> dict[str, bool]:
        return {"claimed": await incoming_vms.claim(name)}

    @app.delete("/v1/migrations/incoming/{name}", dependencies=v1)
    async def remove_incoming(name: str) -> dict[str, str]:
        await incoming_vms.remove(name)
        return {"removed": name}

    @app.post("/v1/agent/shutdown", dependencies=v1)
    async def shutdown(destroy_vms: bool = False) -> dict[str, int]:
        destroyed = await manager.destroy_all() if destroy_vms else 0
        on_shutdown()
        return {"destroyed": destroyed}

    return app
