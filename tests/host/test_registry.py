"""VmRegistry and the state table, without an agent around them."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from vmstream.errors import Conflict, NotFound
from vmstream.host.db import open_db
from vmstream.host.network import BridgedNet
from vmstream.host.registry import VmRegistry
from vmstream.host.state import ALLOWED, Op, VmState, check

ROW: dict[str, Any] = {"memory_bytes": 64 << 20, "cpus": 1, "kernel": "k", "initrd": "i", "accel": "tcg", "parent_image": None}


def _registry(tmp_path: Path, net: BridgedNet | None = None) -> VmRegistry:
    return VmRegistry(open_db(tmp_path / "state.db"), tmp_path / "run", net)


def test_reserve_is_all_or_none(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    asyncio.run(reg.reserve(["a"], **ROW))
    with pytest.raises(Conflict, match="'a' already exists"):
        asyncio.run(reg.reserve(["b", "a"], **ROW))
    assert [r.name for r in reg.all()] == ["a"]


def test_each_vm_gets_its_own_identity_and_port(tmp_path: Path) -> None:
    recs = asyncio.run(_registry(tmp_path).reserve(["a", "b", "c"], **ROW))
    for field in ("mac", "vmgenid", "http_port", "vm_id", "rundir"):
        assert len({getattr(r, field) for r in recs}) == 3, field
    assert [r.hostname for r in recs] == ["a", "b", "c"]


def test_a_bridged_range_runs_out_with_a_clear_error(tmp_path: Path) -> None:
    one = ipaddress.IPv4Address("10.9.0.2")
    reg = _registry(tmp_path, BridgedNet("br0", None, one, one, 24, None))
    (rec,) = asyncio.run(reg.reserve(["a"], **ROW))
    assert rec.ip == "10.9.0.2"
    with pytest.raises(Conflict, match=r"no free VM address left in 10\.9\.0\.2-10\.9\.0\.2"):
        asyncio.run(reg.reserve(["b"], **ROW))


def test_an_address_lent_to_a_departed_vm_is_not_handed_out_until_given_back(tmp_path: Path) -> None:
    first, last = ipaddress.IPv4Address("10.9.0.2"), ipaddress.IPv4Address("10.9.0.3")
    reg = _registry(tmp_path, BridgedNet("br0", "vmstream-no-such-ns", first, last, 24, None))
    (moved,) = asyncio.run(reg.reserve(["moved"], **ROW))
    assert moved.ip is not None
    reg.delete("moved", lent_to="hostb")  # it migrated to hostb, keeping its address
    assert [(r.ip, r.vm, r.to_host) for r in reg.lent()] == [(moved.ip, "moved", "hostb")]
    (clone,) = asyncio.run(reg.reserve(["clone"], **ROW))
    assert clone.ip != moved.ip
    with pytest.raises(Conflict, match=r"1 of them lent to VMs that migrated away"):
        asyncio.run(reg.reserve(["another"], **ROW))
    # back from hostb: its row takes the address over, and it is no longer lent
    ident = {"hostname": "moved", "mac": moved.mac, "vmgenid": moved.vmgenid, "ip": moved.ip}
    (back,) = asyncio.run(reg.reserve(["moved"], identity=ident, **ROW))
    assert back.ip == moved.ip and reg.lent() == []
    reg.delete("moved", lent_to="hostb")
    assert not reg.release(moved.ip, "someone-else")  # only the VM it was lent to gives it back
    assert reg.release(moved.ip, "moved") and reg.lent() == []
    (again,) = asyncio.run(reg.reserve(["again"], **ROW))
    assert again.ip == moved.ip


def test_an_address_of_another_hosts_range_is_not_lent(tmp_path: Path) -> None:
    one = ipaddress.IPv4Address("10.9.0.2")
    reg = _registry(tmp_path, BridgedNet("br0", "vmstream-no-such-ns", one, one, 24, None))
    ident = {"hostname": "v", "mac": "52:54:00:00:00:01", "vmgenid": "g", "ip": "10.9.0.77"}
    asyncio.run(reg.reserve(["v"], identity=ident, **ROW))  # it came from the host whose range 10.9.0.77 is in
    reg.delete("v", lent_to="hostc")
    assert reg.lent() == [] and not reg.owns("10.9.0.77") and reg.owns("10.9.0.2")


def test_begin_checks_and_moves_the_state_in_one_step(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    asyncio.run(reg.reserve(["a"], state=VmState.RUNNING, **ROW))
    assert reg.begin("a", Op.MIGRATE, VmState.MIGRATING).state == VmState.MIGRATING
    with pytest.raises(Conflict, match="is migrating"):
        reg.begin("a", Op.DESTROY, VmState.STOPPING)
    assert reg.get("a").state == VmState.MIGRATING
    assert not reg.set_state("a", VmState.RUNNING, only_if=[VmState.CAPTURING])
    assert reg.set_state("a", VmState.RUNNING, only_if=[VmState.MIGRATING])
    with pytest.raises(NotFound):
        reg.begin("ghost", Op.DESTROY, VmState.STOPPING)


def test_pooled_rows_are_not_vms(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    asyncio.run(reg.reserve([".pool-x"], state=VmState.POOLED, **ROW))
    with pytest.raises(NotFound):
        reg.get(".pool-x")
    assert reg.all() == [] and len(reg.all(pooled=True)) == 1


def test_take_over_moves_the_pooled_qemu_to_the_vm(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    (pool,) = asyncio.run(reg.reserve([".pool-x"], state=VmState.POOLED, **ROW))
    asyncio.run(reg.reserve(["vm"], **ROW))
    rec = reg.take_over(".pool-x", "vm")
    assert (rec.vm_id, rec.mac, rec.http_port) == (pool.vm_id, pool.mac, pool.http_port)
    assert reg.find(".pool-x") is None and reg.get("vm").vm_id == pool.vm_id


@pytest.mark.parametrize("state", list(VmState))
@pytest.mark.parametrize("op", list(Op))
def test_every_state_either_allows_an_operation_or_says_why(state: VmState, op: Op) -> None:
    if state in ALLOWED[op]:
        check("vm", state, op)
    else:
        with pytest.raises(Conflict) as err:
            check("vm", state, op)
        assert f"VM vm is {state}" in str(err.value) and err.value.exit_code == 4
