"""`vmstream peer ...` and `vmstream migrate VM --to HOST`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vmstream.agentapi import AgentClient
from vmstream.cli.context import client
from vmstream.config import agent_token
from vmstream.errors import InvalidInput

peer_app = typer.Typer(help="Peer hosts this host can migrate VMs to.", no_args_is_help=True)
out = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
POLL_S = 0.2


def _client() -> AgentClient:
    return client()


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


@peer_app.command("add")
def peer_add(
    name: str,
    url: Annotated[str | None, typer.Argument(help="The peer agent's base URL, e.g. http://10.0.0.2:8400.")] = None,
    token: Annotated[str | None, typer.Option(help="The peer agent's token (its data dir's agent.token).")] = None,
    home: Annotated[Path | None, typer.Option(help="A peer agent on this machine: read its URL and token from its data dir.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tell this host's agent about a peer host (checked by calling it)."""
    if home is not None:
        info_file = home / "agent.json"
        if not info_file.is_file():
            raise InvalidInput(f"no agent runs for {home} (no agent.json): start it with VMSTREAM_HOME={home} vmstream agent")
        url = url or f"http://127.0.0.1:{json.loads(info_file.read_text())['port']}"
        token = token or agent_token(home)
    if url is None or token is None:
        raise InvalidInput("give the peer's URL and --token, or --home DIR for an agent on this machine")
    peer = _client().call("PUT", f"/v1/peers/{name}", json={"url": url, "token": token})
    if as_json:
        print(json.dumps(peer, indent=2))
    else:
        out.print(f"peer {peer['name']} at {peer['url']} added")


@peer_app.command("list")
def peer_list(as_json: JsonOpt = False) -> None:
    """The peer hosts this host knows."""
    peers = _client().call("GET", "/v1/peers")
    if as_json:
        print(json.dumps(peers, indent=2))
        return
    t = Table("name", "url", "added")
    for p in peers:
        t.add_row(p["name"], p["url"], p["added_at"])
    out.print(t)


@peer_app.command("remove")
def peer_remove(name: str) -> None:
    """Forget a peer host."""
    _client().call("DELETE", f"/v1/peers/{name}")
    out.print(f"peer {name} removed")


@peer_app.command("lent")
def peer_lent(
    as_json: JsonOpt = False,
    reconcile: Annotated[bool, typer.Option("--reconcile", help="First give back addresses whose VM no peer has any more.")] = False,
) -> None:
    """This host's addresses kept for VMs that migrated to peers (bridged hosts): not handed
    out again until the VM comes back or the host it ends on reports it destroyed."""
    if reconcile:
        released = _client().call("POST", "/v1/addresses/lent/reconcile")["released"]
        if not as_json:
            out.print(f"given back: {', '.join(released) or 'none'}")
    lent = _client().call("GET", "/v1/addresses/lent")
    if as_json:
        print(json.dumps(lent, indent=2))
        return
    t = Table("address", "vm", "moved to", "since")
    for r in lent:
        t.add_row(r["ip"], r["vm"], r["to_host"], r["lent_at"])
    out.print(t)


def _line(m: dict[str, Any]) -> str:
    p = m.get("progress") or {}
    parts = [f"{m['state']}", f"mode {m.get('mode') or m['requested_mode']}", f"{m['elapsed_s']:.1f}s"]
    if p:
        parts += [f"sent {_mib(p.get('bytes_sent'))}", f"remaining {_mib(p.get('remaining_bytes'))}", f"round {p.get('rounds')}"]
        if p.get("expected_downtime_ms") is not None:
            parts.append(f"expected downtime {p['expected_downtime_ms']} ms")
    return ", ".join(parts)


def _summary(m: dict[str, Any]) -> str:
    r = m.get("result") or {}
    if m["state"] != "completed":
        return f"[red]migration {m['state']}[/red]: {m.get('error') or 'no reason given'}"
    extra = f", private {_mib(r['private_bytes'])}" if r.get("private_bytes") is not None else ""
    return (f"{m['vm']} now runs on {m['to']} ({r.get('mode')} migration): {r.get('total_s')} s in all, "
            f"downtime {r.get('downtime_ms')} ms, sent {_mib(r.get('bytes_sent'))}{extra}")


def migrate(
    vm: str,
    to: Annotated[str | None, typer.Option("--to", help="The peer host to move the VM to (see 'vmstream peer list').")] = None,
    mode: Annotated[str, typer.Option(help="auto (delta for a clone whose image the peer has, else live), live or delta.")] = "auto",
    max_bandwidth: Annotated[float | None, typer.Option("--max-bandwidth", help="Live mode: cap the stream at this many MB/s.")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Start it and return; follow with --status.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Show the VM's latest migration.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the VM's migration in progress.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move a running VM to a peer host without stopping it (Ctrl-C cancels)."""
    client = _client()
    if status or cancel:
        m = client.call("DELETE" if cancel else "GET", f"/v1/vms/{vm}/migration")
        print(json.dumps(m, indent=2)) if as_json else out.print(_line(m) if m["state"] in ("preparing", "running") else _summary(m))
        return
    if to is None:
        raise InvalidInput("say where to move the VM: --to PEER (see 'vmstream peer list')")
    if mode not in ("auto", "live", "delta"):
        raise InvalidInput(f"unknown migration mode '{mode}': choose auto, live or delta")
    body: dict[str, Any] = {"to": to, "mode": mode}
    if max_bandwidth is not None:
        body["max_bandwidth_mbps"] = max_bandwidth
    m = client.call("POST", f"/v1/vms/{vm}/migrate", json=body)
    if detach:
        print(json.dumps(m, indent=2)) if as_json else out.print(f"migrating {vm} to {to}: follow with 'vmstream migrate {vm} --status'")
        return
    try:
        with out.status(_line(m), spinner="dots") as spin:
            while m["state"] in ("preparing", "running"):
                time.sleep(POLL_S)
                m = client.call("GET", f"/v1/vms/{vm}/migration")
                if not as_json:
                    spin.update(_line(m))
    except KeyboardInterrupt:
        out.print("cancelling the migration ...")
        client.call("DELETE", f"/v1/vms/{vm}/migration")
        while m["state"] in ("preparing", "running"):
            time.sleep(POLL_S)
            m = client.call("GET", f"/v1/vms/{vm}/migration")
    if as_json:
        print(json.dumps(m, indent=2))
    else:
        out.print(_summary(m))
    if m["state"] != "completed":
        raise typer.Exit(1)

