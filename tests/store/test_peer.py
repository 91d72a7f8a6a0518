"""The peer endpoint as the host agent will mount it: token, read-only by default, ranges."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.store.conftest import PEER_TOKEN, peer_app, serve
from vmstream.store import ChunkStore, LocalBackend, ObjectNotFound, PeerBackend, StoreError


def test_clone_host_streams_from_peer(tmp_path: Path) -> None:
    """Host A stores an image; host B reads it chunk by chunk from A's agent, read-only."""
    a = LocalBackend(tmp_path / "host-a")
    content = os.urandom(2 << 20) + bytes(2 << 20) + b"tail" * 1000
    (tmp_path / "mem").write_bytes(content)
    ChunkStore(a).store_file(tmp_path / "mem", ref="img/memory")
    with serve(peer_app(ChunkStore(a), writable=False)) as url:  # the agent may pass its store
        b = ChunkStore(PeerBackend(url + "/v1/store", PEER_TOKEN))
        cmap = b.get_ref("img/memory")
        assert b.read_range(cmap, 0, cmap.size) == content
        assert b.read_range(cmap, (2 << 20) - 3, 10) == content[(2 << 20) - 3 : (2 << 20) + 7]
        with pytest.raises(StoreError, match="read-only"):
            b.backend.put("refs/x", b"{}")
        with pytest.raises(StoreError, match="read-only"):
            b.backend.delete("refs/img/memory")
        assert a.exists("refs/img/memory")
        b.close()


def test_wrong_token_is_a_clear_error(tmp_path: Path) -> None:
    served = LocalBackend(tmp_path)
    served.put("k", b"v")
    with serve(peer_app(served)) as url:
        with pytest.raises(StoreError, match="token"):
            PeerBackend(url + "/v1/store", "wrong").get("k")
        assert httpx.get(url + "/v1/store/objects/k").status_code == 401
        assert PeerBackend(url + "/v1/store", PEER_TOKEN).get("k") == b"v"


def test_http_range_semantics(tmp_path: Path) -> None:
    served = LocalBackend(tmp_path)
    served.put("k", b"0123456789")
    headers = {"Authorization": f"Bearer {PEER_TOKEN}"}
    with serve(peer_app(served)) as url, httpx.Client(base_url=url + "/v1/store", headers=headers) as c:
        r = c.get("/objects/k", headers={"Range": "bytes=2-4"})
        assert (r.status_code, r.content, r.headers["content-range"]) == (206, b"234", "bytes 2-4/*")
        assert c.get("/objects/k", headers={"Range": "bytes=8-"}).content == b"89"
        assert c.get("/objects/k", headers={"Range": "bytes=20-30"}).status_code == 416
        assert c.get("/objects/k", headers={"Range": "bytes=-3"}).status_code == 416
        assert c.head("/objects/k").status_code == 200
        assert c.head("/objects/nope").status_code == 404
        assert c.get("/objects/..%2Fetc").status_code in (400, 404)
        assert c.get("/list", params={"prefix": "k"}).json()[0]["key"] == "k"
        with pytest.raises(ObjectNotFound):
            PeerBackend(url + "/v1/store", PEER_TOKEN).get("nope")
