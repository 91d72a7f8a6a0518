"""Peer hosts: other agents this one migrates VMs to, and the HTTP client for them."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmstream.config import check_name
from vmstream.errors import BY_NAME, AgentUnavailable, InvalidInput, NotFound, VmstreamError
from vmstream.host.db import PeerRecord
from vmstream.host.schemas import PeerInfo

PEER_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class PeerClient:
    """HTTP client for one peer agent; its errors come back as the same error classes."""

    def __init__(self, name: str, url: str, token: str) -> None:
        self.name, self.url = name, url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=PEER_TIMEOUT)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AgentUnavailable(f"peer host '{self.name}' at {self.url} cannot be reached: {exc or type(exc).__name__}") from exc
        if r.status_code == 401:
            raise InvalidInput(f"peer host '{self.name}' refused the token: add it again with its current agent.token")
        if r.status_code >= 400:
            try:
                body = r.json()
                cls = BY_NAME.get(body.get("error", ""), VmstreamError)
                raise cls(f"peer host '{self.name}': {body.get('message', r.text)}")
            except ValueError:
                raise VmstreamError(f"peer host '{self.name}' answered HTTP {r.status_code}: {r.text[:200]}") from None
        return r.json()

    async def close(self) -> None:
        await self.http.aclose()


class Peers:
    """The peer hosts this agent knows (rows in its database)."""

    def __init__(self, session: sessionmaker[Session]) -> None:
        self.session = session

    async def add(self, name: str, url: str, token: str) -> PeerInfo:
        """Remember a peer, after checking it answers with this token."""
        check_name(name, "peer name")
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"peer URL '{url}' must start with http:// or https://")
        client = PeerClient(name, url, token)
        try:
            await client.call("GET", "/v1/info")
        finally:
            await client.close()
        with self.session() as s:
            rec = s.get(PeerRecord, name) or PeerRecord(name=name)
            rec.url, rec.token = url.rstrip("/"), token
            s.add(rec)
            s.commit()
            return PeerInfo(name=rec.name, url=rec.url, added_at=rec.added_at)

    def list(self) -> list[PeerInfo]:
        with self.session() as s:
            return [PeerInfo(name=p.name, url=p.url, added_at=p.added_at) for p in s.scalars(select(PeerRecord).order_by(PeerRecord.name))]

    def remove(self, name: str) -> None:
        with self.session() as s:
            rec = s.get(PeerRecord, name)
            if rec is None:
                raise NotFound(f"no peer host named '{name}': see 'vmstream peer list'")
            s.delete(rec)
            s.commit()

    def client(self, name: str) -> PeerClient:
        with self.session() as s:
            rec = s.get(PeerRecord, name)
        if rec is None:
            raise NotFound(f"no peer host named '{name}': add it with 'vmstream peer add {name} URL --token TOKEN'")
        return PeerClient(rec.name, rec.url, rec.token)
