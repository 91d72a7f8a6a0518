"""A VM's QEMU machine (MachineSpec) as JSON: sent to a migration destination and
kept in its row there, since a migrated VM must keep the machine it came with."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vmstream.errors import InvalidInput
from vmstream.migrate import IncomingSpec
from vmstream.qemu import MachineSpec
from vmstream.qemu.machine import TapNic

_PATHS = ("kernel", "initrd", "memory_file", "disk", "seed")


def machine_to_dict(spec: MachineSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, TapNic):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[f.name] = value
    out["kind"] = "incoming" if isinstance(spec, IncomingSpec) else "machine"
    return out


def machine_from_dict(data: dict[str, Any]) -> MachineSpec:
    values = dict(data)
    kind = values.pop("kind", "machine")
    try:
        for key in _PATHS:
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if values.get("tap") is not None:
            values["tap"] = TapNic(**values["tap"])
        values["extra_append"] = tuple(values.get("extra_append", ()))
        values["forwards"] = tuple((int(h), int(g)) for h, g in values.get("forwards", ()))
        values.setdefault("guest_announce", True)  # described before vmstream turned it off
        values.setdefault("balloon", False)  # described before VMs had one
        if kind == "incoming":
            return IncomingSpec(**values)
        values.pop("send_configuration", None)
        return MachineSpec(**values)
    except TypeError as exc:
        raise InvalidInput(f"not a vmstream machine description ({exc}): are both hosts on the same vmstream version?") from exc


def machine_to_json(spec: MachineSpec) -> str:
    return json.dumps(machine_to_dict(spec))


def machine_from_json(text: str) -> MachineSpec:
    return machine_from_dict(json.loads(text))
