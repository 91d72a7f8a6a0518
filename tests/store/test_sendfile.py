"""A peer's reads by sendfile (vmstream.store.bulk): the same bytes and errors as the router,
over real sockets; PeerBackend finds it, and goes back to the router when it is gone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.store.conftest import PEER_TOKEN, bulk_server, peer_app, serve
from tests.store.test_bulk import CountingBackend
from vmstream.store import ChunkStore, LocalBackend, ObjectNotFound, PeerBackend, StoreError, peer_router
from vmstream.store.spec import open_backend

AUTH = {"Authorization": f"Bearer {PEER_TOKEN}"}


def test_ranges_whole_objects_and_errors(tmp_path: Path) -> None:
    served = LocalBackend(tmp_path)
    served.put("packs/k", b"0123456789")
    with bulk_server(served) as bulk, httpx.Client(base_url=f"http://127.0.0.1:{bulk.port}", headers=AUTH) as c:
        r = c.get("/objects/packs/k", headers={"Range": "bytes=2-4"})
        assert (r.status_code, r.content, r.headers["content-range"]) == (206, b"234", "bytes 2-4/10")
        assert c.get("/objects/packs/k", headers={"Range": "bytes=8-"}).content == b"89"
        assert c.get("/objects/packs/k", headers={"Range": "bytes=8-100"}).content == b"89"  # cut at the end
        whole = c.get("/objects/packs/k")
        assert (whole.status_code, whole.content) == (200, b"0123456789")
        assert c.get("/objects/packs/k", headers={"Range": "bytes=20-30"}).status_code == 416
        assert c.get("/objects/packs/k", headers={"Range": "bytes=-3"}).status_code == 416
        missing = c.get("/objects/packs/nope")
        assert missing.status_code == 404 and missing.json()["error"] == "ObjectNotFound"
        assert c.get("/objects/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
        assert c.get("/elsewhere").status_code == 404
        unauthorised = httpx.get(f"http://127.0.0.1:{bulk.port}/objects/packs/k", headers={"Authorization": "Bearer wrong"})
        assert unauthorised.status_code == 401 and "token" in unauthorised.json()["message"]


def test_one_connection_serves_range_after_range(tmp_path: Path) -> None:
    """Keep-alive: a fetch lane reads many ranges on one connection."""
    served = LocalBackend(tmp_path)
    data = os.urandom(1 << 20)
    served.put("p", data)
    with bulk_server(served) as bulk, socket.create_connection(("127.0.0.1", bulk.port)) as sock:
        f = sock.makefile("rb")
        for start in (0, 4096, 65536, (1 << 20) - 100):
            sock.sendall(f"GET /objects/p HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PEER_TOKEN}\r\n"
                         f"Range: bytes={start}-{start + 99}\r\n\r\n".encode())
            assert f.readline().startswith(b"HTTP/1.1 206")
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert f.read(length) == data[start : start + 100]


def test_peer_backend_reads_through_the_bulk_server(tmp_path: Path) -> None:
    """Chunk reads and streams of a clone host go to the sendfile server, not the router."""
    served = CountingBackend(tmp_path / "a")
    content = os.urandom(3 << 20) + bytes(1 << 20)
    (tmp_path / "mem").write_bytes(content)
    ChunkStore(served).store_file(tmp_path / "mem", ref="img/memory")
    served.gets.clear()
    with bulk_server(served) as bulk, serve(peer_app(served, writable=False, bulk=bulk)) as url:
        b = ChunkStore(PeerBackend(url + "/v1/store", PEER_TOKEN))
        cmap = b.get_ref("img/memory")
        served.gets.clear()  # the ref itself came by the router or the bulk server alike
        assert b.read_range(cmap, 0, cmap.size) == content
        pack = next(o.key for o in served.list("packs/"))
        assert b"".join(b.backend.stream(pack)) == served.get(pack)
        assert served.gets == [(pack, 0, None)], "the router served reads the bulk server should have"
        b.close()


def test_a_bulk_server_that_went_away_sends_reads_back_to_the_router(tmp_path: Path) -> None:
    served = LocalBackend(tmp_path)
    served.put("k", b"still here")
    bulk_port: list[int | None] = [None]  # what the router names: the test changes it
    with bulk_server(served) as bulk:
        bulk_port[0] = bulk.port
        app = FastAPI()
        app.include_router(peer_router(served, bulk_port=lambda: bulk_port[0]), prefix="/v1/store")
        with serve(app) as url:
            peer = PeerBackend(url + "/v1/store", PEER_TOKEN, timeout=2)
            assert peer.get("k", 6) == b"here"
            bulk.close()  # its agent restarted without one
            bulk_port[0] = None
            assert peer.get("k", 0, 5) == b"still"
            with pytest.raises(ObjectNotFound):
                peer.get("nope")
            peer.close()


def test_a_wrong_token_at_the_bulk_server_is_a_clear_error(tmp_path: Path) -> None:
    served = LocalBackend(tmp_path)
    served.put("k", b"v")
    with bulk_server(served, token="other") as bulk, serve(peer_app(served, bulk=bulk)) as url:
        with pytest.raises(StoreError, match="token"):
            PeerBackend(url + "/v1/store", PEER_TOKEN).get("k", 0, 1)


def test_bulk_reads_can_be_pointed_elsewhere_or_turned_off(tmp_path: Path) -> None:
    """A proxy between the hosts moves the bulk server's port: the store spec names it, or turns it off."""
    served = CountingBackend(tmp_path)
    served.put("k", b"0123456789")
    with bulk_server(served) as bulk, serve(peer_app(served, bulk=bulk)) as url:
        via = open_backend(f"peer:{url}/v1/store?bulk=http://127.0.0.1:{bulk.port}", PEER_TOKEN)
        assert via.get("k", 2, 3) == b"234" and served.gets == []
        off = open_backend(f"peer:{url}/v1/store?bulk=off", PEER_TOKEN)
        assert off.get("k", 2, 3) == b"234" and served.gets == [("k", 2, 3)]
        via.close()
        off.close()
    with pytest.raises(StoreError, match="bulk"):
        open_backend("peer:http://127.0.0.1:1/v1/store?bulk=sometimes", PEER_TOKEN)
    with pytest.raises(StoreError, match="unknown option"):
        open_backend("peer:http://127.0.0.1:1/v1/store?bluk=off", PEER_TOKEN)
