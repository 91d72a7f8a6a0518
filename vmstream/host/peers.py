"""Peer hosts: other agents this one migrates VMs to, and the HTTP client for them."""

from __future__ import annotations

import asyncio
import logging

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmstream.agentapi import AsyncApiClient
from vmstream.config import check_name
from vmstream.errors import InvalidInput, NotFound, VmstreamError
from vmstream.host.db import PeerRecord
from vmstream.host.schemas import PeerInfo

PEER_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
log = logging.getLogger("vmstream.agent")


def peer_client(name: str, url: str, token: str) -> AsyncApiClient:
    """The API client of one peer agent; its errors come back as the same error classes."""
    return AsyncApiClient(url, token, f"peer host '{name}'", PEER_TIMEOUT, token_fix="add it again with its current agent.token")


class Peers:
    """The peer hosts this agent knows (rows in its database)."""

    def __init__(self, session: sessionmaker[Session]) -> None:
        self.session = session

    async def add(self, name: str, url: str, token: str) -> PeerInfo:
        """Remember a peer, after checking it answers with this token."""
        check_name(name, "peer name")
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"peer URL '{url}' must start with http:// or https://")
        async with peer_client(name, url, token) as client:
            await client.call("GET", "/v1/info")
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

    def client(self, name: str) -> AsyncApiClient:
        with self.session() as s:
            rec = s.get(PeerRecord, name)
        if rec is None:
            raise NotFound(f"no peer host named '{name}': add it with 'vmstream peer add {name} URL --token TOKEN'")
        return peer_client(rec.name, rec.url, rec.token)

    async def release_address(self, ip: str, vm: str) -> None:
        """Tell every peer that VM vm, which came with address ip, is gone: the peer whose
        range it is (where it was lent, VmRegistry.delete) may hand it out again. A peer that
        cannot be reached keeps it lent, which is safe: that address is not reused."""
        async def one(peer: PeerInfo) -> None:
            try:
                async with self.client(peer.name) as client:
                    await client.call("DELETE", f"/v1/addresses/lent/{ip}", params={"vm": vm})
                log.info("address %s of VM %s given back to peer %s", ip, vm, peer.name)
            except NotFound:
                pass  # not that peer's address
            except (VmstreamError, httpx.HTTPError, OSError) as exc:
                log.warning("could not give address %s of VM %s back to peer %s (%s): it stays lent there", ip, vm, peer.name, exc)

        await asyncio.gather(*(one(p) for p in self.list()))

    async def has_vm(self, vm: str) -> bool | None:
        """Whether any peer has VM vm (its own, or arriving); None if a peer could not be asked."""
        async def one(peer: PeerInfo) -> bool | None:
            try:
                async with self.client(peer.name) as client:
                    for path in (f"/v1/vms/{vm}", f"/v1/migrations/incoming/{vm}"):
                        try:
                            await client.call("GET", path)
                            return True
                        except NotFound:
                            pass
                    return False
            except (VmstreamError, httpx.HTTPError, OSError):
                return None

        answers = await asyncio.gather(*(one(p) for p in self.list()))
        return True if True in answers else None if None in answers else False
