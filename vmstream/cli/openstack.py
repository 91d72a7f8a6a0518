"""`vmstream openstack up|down|status`: a one-machine OpenStack for tests and benches.

Progress goes to stderr; with --json, stdout carries exactly one JSON object. The deployment
code (vmstream.openstack.deploy) is imported only when one of these runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vmstream.cli.context import settings

if TYPE_CHECKING:
    from vmstream.openstack.deploy import Deployment

openstack_app = typer.Typer(help="A one-machine OpenStack (Debian's Zed packages) for tests and benches.",
                            no_args_is_help=True)
out = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
DirOpt = Annotated[Path | None, typer.Option(
    "--dir", help="The state folder (configs, databases, logs, PIDs, credentials); default VMSTREAM_OPENSTACK_DIR "
                  "or <data dir>/openstack.")]


def _deployment(state_dir: Path | None, computes: int | None = None, driver: str | None = None,
                vmstream: bool = False, migration_mbps: float | None = None) -> Deployment:
    from vmstream.openstack.deploy import ComputeSpec, Deployment, Layout

    root = state_dir or settings().openstack_state
    if vmstream:
        if driver is not None:
            raise typer.BadParameter("--vmstream sets the driver itself: leave out --compute-driver")
        specs: list[ComputeSpec] | None = ComputeSpec.vmstream(computes or 2, Layout(root), migration_mbps)
    elif migration_mbps is not None:
        raise typer.BadParameter("--migration-max-bandwidth is for vmstream computes: add --vmstream")
    else:
        specs = None if computes is None and driver is None else ComputeSpec.fake(computes or 2, driver or "fake.FakeDriver")
    return Deployment(root, specs)


@openstack_app.command("up")
def up(
    state_dir: DirOpt = None,
    computes: Annotated[int | None, typer.Option(
        "--computes", min=1, max=16, help="nova-compute services, compute1..computeN (default 2, or as last time).")] = None,
    compute_driver: Annotated[str | None, typer.Option(
        help="Nova's compute_driver for every compute (default fake.FakeDriver).")] = None,
    vmstream: Annotated[bool, typer.Option(
        "--vmstream", help="Run vmstream's Nova driver: one vmstream agent per compute (agents/computeN, port 840N).")] = False,
    migration_max_bandwidth: Annotated[float | None, typer.Option(
        "--migration-max-bandwidth", min=0.1, help="vmstream computes: cap live moves at this many MB/s "
        "(nova.conf [vmstream] migration_max_bandwidth_mbps).")] = None,
    install: Annotated[bool, typer.Option(help="apt-get install the packages that are missing.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Install what is missing, bootstrap on the first run, start every service; says so if already up."""
    dep = _deployment(state_dir, computes, compute_driver, vmstream, migration_max_bandwidth)
    res = dep.up(install=install)
    body: dict[str, Any] = {"already_up": res.already_up, "state_dir": str(dep.layout.root), "openrc": str(res.openrc),
                            "credentials": str(res.credentials), "computes": [c.host for c in dep.computes],
                            "timings": {k: round(v, 2) for k, v in res.timings.items()}}
    if as_json:
        print(json.dumps(body, indent=2))
    elif res.already_up:
        out.print(f"already up ({len(dep.computes)} computes); credentials: {res.openrc}")
    else:
        times = ", ".join(f"{k.removesuffix('_s')} {v:.0f}s" for k, v in res.timings.items())
        out.print(f"up ({times}); credentials: . {res.openrc}")


@openstack_app.command("down")
def down(state_dir: DirOpt = None, as_json: JsonOpt = False) -> None:
    """Stop every process `up` started (and nothing else); the state folder stays for the next `up`."""
    res = _deployment(state_dir).down()
    if as_json:
        print(json.dumps(res, indent=2))
    elif not res["stopped"]:
        out.print("nothing was running")
    else:
        killed = f"; had to SIGKILL {', '.join(res['killed'])}" if res["killed"] else ""
        out.print(f"stopped {len(res['stopped'])} services in {res['seconds']:.1f}s{killed}")


@openstack_app.command("status")
def status(state_dir: DirOpt = None, as_json: JsonOpt = False) -> None:
    """Each service: PID, running, answering. Exits 1 unless all run and answer."""
    from dataclasses import asdict

    dep = _deployment(state_dir)
    rows = dep.status()
    if as_json:
        print(json.dumps({"state_dir": str(dep.layout.root), "services": [asdict(r) for r in rows]}, indent=2))
    else:
        t = Table("service", "pid", "running", "answers", "detail")
        for r in rows:
            answers = "-" if r.answers is None else ("yes" if r.answers else "[red]no[/red]")
            t.add_row(r.name, str(r.pid or "-"), "yes" if r.running else "[red]no[/red]", answers, r.detail)
        out.print(t)
    if not rows or not all(r.running and r.answers for r in rows):
        raise typer.Exit(1)


@openstack_app.command("install-driver")
def install_driver(
    target: Annotated[Path, typer.Argument(help="A directory of its own for the shim, e.g. /usr/local/lib/vmstream-nova.")],
) -> None:
    """Write the shim through which nova-compute loads vmstream's driver; put TARGET first on its PYTHONPATH."""
    from vmstream.openstack.nova import DRIVER
    from vmstream.openstack.nova.shim import install_shim

    path = install_shim(target.expanduser().absolute())
    out.print(f"installed in {path}: run nova-compute with PYTHONPATH={path} and, in nova.conf, "
              f"compute_driver = {DRIVER} plus [vmstream] agent_url and token_file", markup=False)


@openstack_app.command("install-client-plugin")
def install_client_plugin(
    target: Annotated[Path, typer.Argument(help="A directory for PYTHONPATH, e.g. /usr/local/lib/vmstream-osc "
                                                "(the Nova shim's directory works too).")],
) -> None:
    """Give Debian's `openstack` CLI the live-image commands: run it with PYTHONPATH=TARGET."""
    from vmstream.openstack.osc.install import install_plugin

    path = install_plugin(target.expanduser().absolute())
    out.print(f"installed in {path}: PYTHONPATH={path} openstack live-image --help", markup=False)
