"""`vmstream group ...`: scaling groups, each a live image's VMs behind its own HAProxy."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vmstream.cli.context import client

group_app = typer.Typer(help="Scaling groups: a live image's clones behind a load balancer, sized to their load.",
                        no_args_is_help=True)
out = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
MinOpt = Annotated[int | None, typer.Option("--min", help="The fewest members.")]
MaxOpt = Annotated[int | None, typer.Option("--max", help="The most members (admission control checks the host has room).")]
TargetOpt = Annotated[float | None, typer.Option(
    "--target-inflight", help="Requests in service or waiting, per member, the group sizes itself for.")]
DelayOpt = Annotated[float | None, typer.Option(
    "--scale-in-delay", help="Seconds the load must stay low before members leave (drained first).")]


def _emit(obj: Any, as_json: bool, render: Any) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        render(obj)


def _show(g: dict[str, Any]) -> None:
    out.print(f"group [bold]{g['name']}[/bold]: {g['endpoint']} -> {g['image']} ({g['start']}), "
              f"{g['serving']} serving of {g['min_size']}..{g['max_size']}, wants {g['wanted']}; "
              f"load {g['load']} ({g['queued']} queued), target {g['target_inflight']:g} per member")
    if g["members"]:
        t = Table("member", "host", "state", "balancer", "in service", "served")
        for m in g["members"]:
            t.add_row(m["name"], m["host"], m["state"], m["balancer_status"] or "-", str(m["in_service"]), str(m["served"]))
        out.print(t)
    if g["last_error"]:
        out.print(f"[red]last error:[/red] {g['last_error']}")


@group_app.command("create")
def group_create(
    name: str,
    image: Annotated[str, typer.Option(help="The live image whose clones are the members.")],
    port: Annotated[int, typer.Option(help="HAProxy listens on 127.0.0.1:PORT.")],
    min_size: MinOpt = None,
    max_size: MaxOpt = None,
    target_inflight: TargetOpt = None,
    member_port: Annotated[int, typer.Option(help="The guest port members serve on.")] = 80,
    health_path: Annotated[str, typer.Option(help="HAProxy checks each member with GET PATH (2xx or 3xx: up).")] = "/",
    member_maxconn: Annotated[int | None, typer.Option(
        help="At most this many requests at a member at once; the rest wait in HAProxy for the next free member.")] = None,
    scale_in_delay: DelayOpt = None,
    start: Annotated[str, typer.Option(help="Members are 'clone's of the image, or cold-'boot'ed VMs (a baseline).")] = "clone",
    hosts: Annotated[str, typer.Option(
        help="Where members run, comma-separated: 'local' (this host) and peers ('vmstream peer list') that share its "
             "store; each new member goes to the one with the fewest.")] = "local",
    as_json: JsonOpt = False,
) -> None:
    """Create a group: its HAProxy and --min members; returns once they serve."""
    body: dict[str, Any] = {"name": name, "image": image, "port": port, "member_port": member_port, "health_path": health_path,
                            "member_maxconn": member_maxconn, "start": start,
                            "hosts": [h.strip() for h in hosts.split(",") if h.strip()]}
    for key, value in (("min_size", min_size), ("max_size", max_size), ("target_inflight", target_inflight),
                       ("scale_in_delay_s", scale_in_delay)):
        if value is not None:
            body[key] = value
    _emit(client().call("POST", "/v1/groups", json=body), as_json, _show)


@group_app.command("list")
def group_list(as_json: JsonOpt = False) -> None:
    """The host's groups."""
    def render(groups: list[dict[str, Any]]) -> None:
        t = Table("name", "endpoint", "image", "serving", "min..max", "wants", "load")
        for g in groups:
            t.add_row(g["name"], g["endpoint"], g["image"], str(g["serving"]), f"{g['min_size']}..{g['max_size']}",
                      str(g["wanted"]), str(g["load"]))
        out.print(t)
    _emit(client().call("GET", "/v1/groups"), as_json, render)


@group_app.command("show")
def group_show(name: str, as_json: JsonOpt = False) -> None:
    """A group, its members and its load."""
    _emit(client().call("GET", f"/v1/groups/{name}"), as_json, _show)


@group_app.command("set")
def group_set(name: str, min_size: MinOpt = None, max_size: MaxOpt = None, target_inflight: TargetOpt = None,
              scale_in_delay: DelayOpt = None, as_json: JsonOpt = False) -> None:
    """Change a group's sizes, target or scale-in delay while it runs."""
    body = {k: v for k, v in (("min_size", min_size), ("max_size", max_size), ("target_inflight", target_inflight),
                              ("scale_in_delay_s", scale_in_delay)) if v is not None}
    _emit(client().call("PATCH", f"/v1/groups/{name}", json=body), as_json, _show)


@group_app.command("delete")
def group_delete(name: str, as_json: JsonOpt = False) -> None:
    """Delete a group: its HAProxy stops (requests in flight finish), then its members are destroyed."""
    _emit(client().call("DELETE", f"/v1/groups/{name}"), as_json, lambda r: out.print(f"deleted group {r['deleted']}"))
