"""VmRegistry: the rows of this host's VMs (vmstream.host.db), and nothing else.

A row claims a VM's name, port, identity and (on a bridged host) address.
Rows are changed here only, so state transitions are checked in one place
(vmstream.host.state) and happen in one transaction each.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from vmstream.errors import Conflict, NotFound
from vmstream.host.db import LentAddressRecord, VmRecord
from vmstream.host.network import BridgedNet
from vmstream.host.state import Op, VmState, check

POOL_PREFIX = ".pool-"  # pooled rows' names: never a valid VM name, so never listed or taken by a user
# A pooled QEMU's fields a clone takes over with it: all fresh, never used by a guest.
_TAKEN_FROM_POOL = ("vm_id", "rundir", "http_port", "ports", "mac", "vmgenid", "pid", "ip", "disk", "disk_base")


def _free_port(port: int = 0) -> int:
    """A loopback port nothing listens on (port 0: any); OSError if the given one is taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        return int(s.getsockname()[1])


def published(rec: VmRecord) -> dict[int, int]:
    """A VM's published guest ports besides 80: guest port -> host port on 127.0.0.1."""
    return {int(g): int(h) for g, h in json.loads(rec.ports).items()} if rec.ports else {}


def forwards(rec: VmRecord) -> tuple[tuple[int, int], ...]:
    """The same as QEMU's slirp forwards (MachineSpec.forwards): (host port, guest port) pairs."""
    return tuple((h, g) for g, h in published(rec).items())


def _no_vm(name: str) -> NotFound:
    return NotFound(f"no VM named '{name}': see 'vmstream list'")


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


class VmRegistry:
    def __init__(self, session: sessionmaker[Session], run_root: Path, net: BridgedNet | None) -> None:
        self.version = 0  # bumped by every write: watchers (the dashboard) see a change without a query
        self.session = session
        self.run_root = run_root
        self.net = net
        self._alloc_lock = asyncio.Lock()

    def find(self, name: str) -> VmRecord | None:
        """Any row by name, pooled ones too."""
        with self.session() as s:
            return s.get(VmRecord, name)

    def get(self, name: str) -> VmRecord:
        """A VM's row, or NotFound naming the fix."""
        rec = self.find(name)
        if rec is None or rec.state == VmState.POOLED:
            raise _no_vm(name)
        return rec

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def all(self, parent_image: str | None = None, pooled: bool = False) -> list[VmRecord]:
        """The VMs; pooled=True also the pool's paused QEMUs (which map image memory too)."""
        with self.session() as s:
            q = select(VmRecord).order_by(VmRecord.created_at)
            if not pooled:
                q = q.where(VmRecord.state != VmState.POOLED)
            if parent_image is not None:
                q = q.where(VmRecord.parent_image == parent_image)
            return list(s.scalars(q))

    def update(self, name: str, **values: Any) -> None:
        with self.session() as s:
            rec = s.get(VmRecord, name)
            if rec is not None:
                for k, v in values.items():
                    setattr(rec, k, v)
                s.commit()
                self.version += 1

    def begin(self, name: str, op: Op, to: VmState, **values: Any) -> VmRecord:
        """Check that the VM's state allows op and move it to `to` (with other fields' values), in one step."""
        with self.session() as s:
            rec = s.get(VmRecord, name)
            if rec is None or rec.state == VmState.POOLED:
                raise _no_vm(name)
            check(name, rec.state, op)
            rec.state = to
            for k, v in values.items():
                setattr(rec, k, v)
            s.commit()
            self.version += 1
            return rec

    def set_state(self, name: str, state: VmState, only_if: Iterable[VmState] | None = None) -> bool:
        """Set a row's state (if it is in one of only_if); False if the row is gone or was not."""
        with self.session() as s:
            rec = s.get(VmRecord, name)
            if rec is None or (only_if is not None and rec.state not in set(only_if)):
                return False
            rec.state = state
            s.commit()
            self.version += 1
            return True

    def delete(self, name: str, lent_to: str | None = None) -> VmRecord | None:
        """Drop a row (its QEMU already stopped), and its tap on a bridged host.
        lent_to: the peer the VM moved to; an address of this host's range stays reserved
        for it (lent) in the same transaction, so no clone here is given it meanwhile."""
        with self.session() as s:
            rec = s.get(VmRecord, name)
            if rec is not None:
                s.delete(rec)
                if lent_to and rec.ip and self.owns(rec.ip):
                    s.merge(LentAddressRecord(ip=rec.ip, vm=name, to_host=lent_to))
                s.commit()
                self.version += 1
        if rec is not None and rec.ip and self.net is not None:
            self.net.remove_tap(rec.vm_id)
        return rec

    def owns(self, ip: str) -> bool:
        """Whether ip is in this host's range (VMSTREAM_VM_ADDRESSES)."""
        return self.net is not None and ip in self.net.addresses()

    def lent(self) -> list[LentAddressRecord]:
        """This host's addresses held by VMs that migrated to peers."""
        with self.session() as s:
            return list(s.scalars(select(LentAddressRecord).order_by(LentAddressRecord.ip)))

    def release(self, ip: str, vm: str) -> bool:
        """A lent address is free again: VM vm was destroyed on the host it moved to.
        False if ip is not lent to vm (already released, or lent again to another VM)."""
        with self.session() as s:
            row = s.get(LentAddressRecord, ip)
            if row is None or row.vm != vm:
                return False
            s.delete(row)
            s.commit()
            self.version += 1
            return True

    async def reserve(
        self, names: list[str], *, identity: dict[str, str] | None = None, state: VmState = VmState.STARTING,
        publish: dict[int, int] | None = None, **common: Any
    ) -> list[VmRecord]:
        """Insert rows for names, all or none: this claims the names, ports and addresses.
        identity (hostname, mac, vmgenid[, ip]) is kept for a migrating VM; others get a new one.
        publish: guest port -> host port (0: any free one) for each VM, on a slirp host."""
        async with self._alloc_lock:
            with self.session() as s:
                taken = set(s.scalars(select(VmRecord.name).where(VmRecord.name.in_(names))))
                if taken:
                    raise Conflict(f"a VM named '{sorted(taken)[0]}' already exists: choose another name or destroy it first")
                used = set(s.scalars(select(VmRecord.http_port)))
                for forwards in s.scalars(select(VmRecord.ports).where(VmRecord.ports.is_not(None))):
                    used.update(int(h) for h in json.loads(forwards or "{}").values())
                lent_ips = set(s.scalars(select(LentAddressRecord.ip)))
                used_ips = set(s.scalars(select(VmRecord.ip))) | lent_ips
                back = (identity or {}).get("ip")
                if back:  # a VM coming back with an address this host lent it: its row holds it now
                    lent = s.get(LentAddressRecord, back)
                    if lent is not None:
                        s.delete(lent)
                free_ips = [a for a in self.net.addresses() if a not in used_ips] if self.net else []
                recs = []
                for name in names:
                    port = self._port(0, used)
                    ports = {str(g): self._port(h, used) for g, h in (publish or {}).items()} if self.net is None else {}
                    vm_id = uuid.uuid4().hex[:12]
                    ident = dict(identity or {"hostname": name, "mac": random_mac(), "vmgenid": str(uuid.uuid4())})
                    if self.net is not None and not ident.get("ip"):
                        if not free_ips:
                            n_lent = len(lent_ips)
                            lent_note = f" ({n_lent} of them lent to VMs that migrated away: GET /v1/addresses/lent)" if n_lent else ""
                            raise Conflict(f"no free VM address left in {self.net.first}-{self.net.last} "
                                           f"(VMSTREAM_VM_ADDRESSES){lent_note}: destroy a VM or give this host a larger range")
                        ident["ip"] = free_ips.pop(0)
                    recs.append(VmRecord(name=name, vm_id=vm_id, state=state, http_port=port, ports=json.dumps(ports) if ports else None,
                                         rundir=str(self.run_root / vm_id), **ident, **common))
                s.add_all(recs)
                try:
                    s.commit()
                    self.version += 1
                except IntegrityError as exc:
                    raise Conflict(f"VM names {names} are already taken") from exc
                return recs

    @staticmethod
    def _port(want: int, used: set[int]) -> int:
        """A host port for a forward: want (checked free), or any free one; added to used."""
        if want:
            if want in used:
                raise Conflict(f"host port {want} is already published by another VM: choose another, or GUEST alone for any free port")
            try:
                _free_port(want)
            except OSError as exc:
                raise Conflict(f"host port {want} cannot be used ({exc.strerror}): another program holds it; choose another") from None
            port = want
        else:
            port = _free_port()
            while port in used:
                port = _free_port()
        used.add(port)
        return port

    def take_over(self, pool_name: str, name: str) -> VmRecord:
        """Give the VM row `name` the pooled row's QEMU (vm_id, run dir, port, MAC, VM
        Generation ID, pid, address) and drop the pooled row, in one transaction."""
        with self.session() as s:
            pool_rec, rec = s.get(VmRecord, pool_name), s.get(VmRecord, name)
            assert pool_rec is not None and rec is not None
            fields = {f: getattr(pool_rec, f) for f in _TAKEN_FROM_POOL}
            s.delete(pool_rec)
            s.flush()  # its vm_id and port are unique: free them before the clone's row takes them
            for f, v in fields.items():
                setattr(rec, f, v)
            s.commit()
            self.version += 1
            return rec
