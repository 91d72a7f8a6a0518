"""A clone's new identity, as sent to the in-guest agent after restore.

Clones of one image must not be the same machine: each gets its own
hostname, MAC, guest parameters and the host's current time (the guest's
clock otherwise resumes at the moment the image was taken). The VM
Generation ID is changed by QEMU itself (see MachineSpec.vmgenid), which a
guest kernel with the vmgenid driver takes as a reason to reseed its RNG; not
every kernel has it (Debian's cloud kernel does not), so every identity also
carries fresh random bytes from the host that the agent credits to the guest
kernel's pool before forcing a reseed. Without that, clones of one image give
the same "random" bytes (keys, UUIDs, TCP sequence numbers) until the kernel's
next timed reseed.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass, field

from vmstream.errors import InvalidInput

_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_RESERVED = {"PATH", "HOME", "IFS", "SHELL", "PWD", "ENV", "PS1", "PS4"}
MAX_USER_DATA = 64 << 10
MAX_PARAM_LINES = 64 << 10  # the guest parameters as the agent receives them (base64 values, a line each)
MAX_GUEST_COMMAND = 4096  # a command line sent as is (`vmstream guest ask`); identities are bounded by the two above
# The in-guest agent drops a line of 256 KiB or more unanswered (MAX_LINE in vmstream-agent.c). The bounds
# above keep an identity (base64 of its lines: params, user data, ~300 bytes more) under ~205 KiB.


def parse_params(items: list[str]) -> dict[str, str]:
    """'key=value' strings (the CLI's repeated --param) to a dict, checked."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"guest parameter '{item}' has no '=': write it as key=value")
        params[key] = value
    check_params(params)
    return params


def check_params(params: dict[str, str]) -> None:
    """Names the guest can take as variables, and a size its agent's line can carry."""
    for key in params:
        if not _PARAM_RE.match(key) or key in _RESERVED or key.startswith(("VMSTREAM_", "LD_")):
            raise InvalidInput(
                f"guest parameter name '{key}' is not allowed: use letters, digits and '_' (not starting "
                "with a digit), and not PATH, HOME, IFS, SHELL or names starting VMSTREAM_ or LD_"
            )
    size = sum(len(_param_line(k, v)) for k, v in params.items())
    if size > MAX_PARAM_LINES:
        raise InvalidInput(
            f"guest parameters are too large: {size} bytes as sent to the guest (values in base64, a line each); "
            f"the limit is {MAX_PARAM_LINES} (about {MAX_PARAM_LINES * 3 // 4 >> 10} KiB of values): "
            f"pass bulk data as user data (up to {MAX_USER_DATA >> 10} KiB) or let the guest fetch it"
        )


def check_user_data(user_data: bytes | None) -> None:
    if user_data is not None and len(user_data) > MAX_USER_DATA:
        raise InvalidInput(f"user data is {len(user_data)} bytes; the limit is {MAX_USER_DATA} ({MAX_USER_DATA >> 10} KiB): "
                           "keep bulk data elsewhere and let the guest fetch it")


def _param_line(key: str, value: str) -> str:
    return f"param {key} {_b64(value.encode())}\n"


@dataclass(frozen=True)
class CloneIdentity:
    hostname: str
    mac: str
    params: dict[str, str] = field(default_factory=dict)
    user_data: bytes | None = None
    defer_hooks: bool = False  # the clone.d hooks wait for 'start-hooks' (see vmstream.host.hooks)
    ip: str | None = None  # ADDRESS/PREFIX on a bridged host: the image's address is its source's

    def command(self, now: float | None = None, verb: str = "identity") -> str:
        """The agent command line: 'identity <base64 of key-value lines>'.
        verb 'prepare': the agent applies clock, hostname, address and MAC, and
        writes nothing for the hooks and runs none (a pooled QEMU's run-through)."""
        check_user_data(self.user_data)
        t = time.time() if now is None else now
        lines = [f"time {t:.9f}", f"seed {_b64(os.urandom(32))}", f"hostname {self.hostname}"]
        if self.ip is not None:  # before the MAC: the guest announces the new MAC with its new address
            lines.append(f"ip {self.ip}")
        lines.append(f"mac {self.mac}")
        lines += [_param_line(k, v)[:-1] for k, v in self.params.items()]
        if self.user_data is not None:
            lines.append(f"userdata {_b64(self.user_data)}")
        if self.defer_hooks:
            lines.append("hooks deferred")
        return f"{verb} " + _b64(("\n".join(lines) + "\n").encode())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
