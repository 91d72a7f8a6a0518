"""`vmstream bench ...`: benchmarks against baselines in the same run.

Each command writes NAME.json, NAME.md and NAME.png into --out and prints a short
summary (the bench's table), or with --json exactly one JSON object on stdout, like
every other command; progress goes to stderr. The bench code lives in vmstream.bench,
imported only when a bench runs so `vmstream --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from vmstream.cli.context import client

bench_app = typer.Typer(help="Benchmarks: JSON, a plot and a markdown table per run.", no_args_is_help=True)

OutOpt = Annotated[Path, typer.Option("--out", help="Directory for the JSON, markdown and PNG files.")]
RunsOpt = Annotated[int, typer.Option("--runs", min=1, help="Repetitions per measured point.")]
MemOpt = Annotated[int, typer.Option("--memory-mib", min=64, help="Guest RAM in MiB.")]
SizesOpt = Annotated[str, typer.Option("--sizes", help="Guest RAM sizes in MiB, comma-separated.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the bench's JSON instead of its table.")]
DEFAULT_OUT = Path("out/bench")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"'{text}' needs at least one positive number")
    return values


def _run(bench_module: Any, out: Path, as_json: bool, show: Callable[[dict[str, Any]], None] | None = None, **kw: Any) -> None:
    """Run one bench with cleanup; stop the agent afterwards if the bench started it; print the result."""
    from vmstream.bench.common import Bench
    from vmstream.bench.report import run_and_write
    from vmstream.errors import VmstreamError

    bench = Bench(out, client())
    try:
        with bench.session():
            # a bench module (run + render), or a function doing its own writing (`all`)
            res = bench_module(bench, out, **kw) if callable(bench_module) else run_and_write(bench_module, bench, out, **kw)
    except VmstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from exc
    finally:
        if bench.client.started_agent:
            _leave_nothing(bench.client)
            bench.client.stop_agent()
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        (show or _show_table)(res)


def _show_table(res: dict[str, Any]) -> None:
    """The bench's markdown (its table and the sentences under it), rendered, and where the files went."""
    from rich.markdown import Markdown

    files = res.get("files", {})
    console = Console()
    with contextlib.suppress(OSError, KeyError):
        console.print(Markdown(Path(files["markdown"]).read_text()))
    if files:
        console.print(f"wrote {', '.join(files.values())}", highlight=False)


def _leave_nothing(client: Any) -> None:
    """The bench's own agent: drop the store packs of the images the bench deleted and the
    chunk cache it filled (a `bench all` left ~12 GB in its data dir otherwise)."""
    from vmstream.errors import VmstreamError

    with contextlib.suppress(VmstreamError):
        for _ in range(2):  # the first pass condemns an unreferenced pack, the second deletes it
            client.call("POST", "/v1/host/store/gc", params={"grace": 0})
        client.call("POST", "/v1/host/cache/drop")


class CloneGuest(StrEnum):
    demo = "demo"
    debian = "debian"


@bench_app.command()
def clone(out: OutOpt = DEFAULT_OUT, runs: RunsOpt = 5,
          memory_mib: Annotated[int | None, typer.Option("--memory-mib", min=64,
                                                         help="Guest RAM in MiB (default: 256 demo, 512 debian).")] = None,
          clone_runs: Annotated[int, typer.Option(min=1, help="Clone starts (cheap, so more than --runs).")] = 10,
          guest: Annotated[CloneGuest, typer.Option(help="demo: the initramfs guest; debian: the Debian disk guest "
                                                         "(boot --disk debian), files clone-debian.*.")] = CloneGuest.demo,
          burst_runs: Annotated[int, typer.Option(min=1, help="Bursts of 10 clones started by one request.")] = 3,
          spacing: Annotated[float, typer.Option(min=0, help="Seconds between one clone's removal and the next start "
                                                              "(the clone pool refills in between).")] = 0.25,
          as_json: JsonOpt = False) -> None:
    """Cold boot vs clone vs QEMU save/restore: time to first HTTP answer; and a burst of 10 clones."""
    from vmstream.bench import clone as b

    name = "clone" if guest is CloneGuest.demo else f"clone-{guest.value}"
    _run(b, out, as_json, mib=memory_mib, runs=runs, clone_runs=clone_runs, guest=guest.value, burst_runs=burst_runs,
         spacing=spacing, output_name=name)


@bench_app.command()
def burst(out: OutOpt = DEFAULT_OUT, runs: RunsOpt = 3, memory_mib: MemOpt = 256,
          counts: Annotated[str, typer.Option(help="Clone counts N, comma-separated.")] = "1,10,32", as_json: JsonOpt = False) -> None:
    """Start N clones at once: time until all answer HTTP."""
    from vmstream.bench import burst as b

    _run(b, out, as_json, mib=memory_mib, counts=_ints(counts), runs=runs)


@bench_app.command()
def scale(out: OutOpt = DEFAULT_OUT, runs: RunsOpt = 3, sizes: SizesOpt = "256,1024,2048,4096",
          fill: Annotated[bool, typer.Option(help="Also measure guests that filled 75% of their RAM.")] = True,
          as_json: JsonOpt = False) -> None:
    """Clone vs QEMU full restore across guest RAM sizes."""
    from vmstream.bench import scale as b

    _run(b, out, as_json, sizes=_ints(sizes), runs=runs, fill=fill)


@bench_app.command()
def capture(out: OutOpt = DEFAULT_OUT, runs: RunsOpt = 3, sizes: SizesOpt = "256,1024,2048,4096", as_json: JsonOpt = False) -> None:
    """Live-image create pause vs guest RAM size, for a booted VM and for a clone."""
    from vmstream.bench import capture as b

    _run(b, out, as_json, sizes=_ints(sizes), runs=runs)


@bench_app.command()
def density(out: OutOpt = DEFAULT_OUT, memory_mib: MemOpt = 256,
            counts: Annotated[str, typer.Option(help="VM counts N, comma-separated (slope fitted over them).")] = "1,2,4,8",
            as_json: JsonOpt = False) -> None:
    """Host memory for N clones vs N cold-booted vs N QEMU-restored VMs."""
    from vmstream.bench import density as b

    _run(b, out, as_json, mib=memory_mib, counts=_ints(counts))


@bench_app.command()
def policy(out: OutOpt = DEFAULT_OUT, count: Annotated[int, typer.Option(help="Clones per run (the paper: at least 12).")] = 12,
           memory_mib: MemOpt = 384,
           length: Annotated[float, typer.Option(help="About how long each clone's workload runs, in seconds.")] = 60.0,
           as_json: JsonOpt = False) -> None:
    """Memory policy off vs on: N clones running memory workloads, limits, bursts, what comes back."""
    from vmstream.bench import policy as b

    _run(b, out, as_json, count=count, ram_mib=memory_mib, length_s=length)


@bench_app.command()
def autoscale(out: OutOpt = DEFAULT_OUT, memory_mib: MemOpt = 256,
              low_rps: Annotated[float, typer.Option(min=0.5, help="Requests per second before the step and after the drop.")] = 5.0,
              high_rps: Annotated[float, typer.Option(min=1, help="Requests per second during the step.")] = 110.0,
              hold: Annotated[float, typer.Option(min=1, help="Seconds the step holds after the group reached its --max.")] = 15.0,
              max_size: Annotated[int, typer.Option("--max", min=2, help="The groups' most members.")] = 10,
              baseline: Annotated[bool, typer.Option(help="Also run the cold-boot baseline group.")] = True,
              openstack: Annotated[bool, typer.Option(help="Also run the step on a group of Nova servers, on the one-machine "
                                                           "deployment (brought up if need be, taken down after).")] = False,
              computes: Annotated[int, typer.Option(min=2, max=8, help="vmstream computes, if the bench brings it up.")] = 2,
              state_dir: Annotated[Path | None, typer.Option("--dir", help="The deployment's state folder (default: "
                                                             "VMSTREAM_OPENSTACK_DIR or <data dir>/openstack).")] = None,
              keep: Annotated[bool, typer.Option(help="Leave a deployment the bench brought up running.")] = False,
              as_json: JsonOpt = False) -> None:
    """A load step on a scaling group behind HAProxy: time to ten members, latency, failures; vs cold-booted members."""
    from vmstream.bench import autoscale as b
    from vmstream.cli.context import settings

    root = (state_dir or settings().openstack_state) if openstack else None
    _run(b, out, as_json, mib=memory_mib, low_rps=low_rps, high_rps=high_rps, hold_s=hold, max_size=max_size, baseline=baseline,
         openstack=root, computes=computes, keep=keep)


@bench_app.command()
def stream(out: OutOpt = DEFAULT_OUT, runs: RunsOpt = 5, as_json: JsonOpt = False) -> None:
    """Clones streaming memory from another host's store: warm, cold, cold with prefetch; 256 MiB vs 2 GiB."""
    from vmstream.bench import stream as b

    _run(b, out, as_json, runs=runs)


@bench_app.command()
def migrate(out: OutOpt = DEFAULT_OUT, memory_mib: MemOpt = 256, as_json: JsonOpt = False) -> None:
    """Live and delta migration between test-bed hosts: downtime, client gap, bytes sent."""
    from vmstream.bench import migrate as b

    _run(b, out, as_json, memory_mib=memory_mib)


@bench_app.command("soak")
def soak(
    out: OutOpt = DEFAULT_OUT, memory_mib: MemOpt = 256,
    moves: Annotated[int, typer.Option("--moves", min=2, help="Moves in all, live and delta in turn.")] = 200,
    clone_cycles: Annotated[int, typer.Option("--clone-cycles", min=0,
                                              help="Clones started, verified and destroyed in all, spread over the moves.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Many live moves in a row, memcheck after each: guest losses, lost connections, agent leaks."""
    from vmstream.bench import soak as b

    _run(b, out, as_json, moves=moves, memory_mib=memory_mib, clone_cycles=clone_cycles)


@bench_app.command("memfs-kill")
def memfs_kill(
    out: OutOpt = DEFAULT_OUT, memory_mib: MemOpt = 256,
    clones: Annotated[int, typer.Option("--clones", min=1, max=64, help="Clones faulting their memory in meanwhile.")] = 10,
    kills: Annotated[int, typer.Option("--kills", min=1, help="SIGKILLs of the memfs daemon.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """memfs's daemon killed again and again under clones streaming their memory: clones lost, bad pages, restart time."""
    from vmstream.bench import memfskill as b

    _run(b, out, as_json, clones=clones, kills=kills, memory_mib=memory_mib)


@bench_app.command("openstack")
def openstack(
    out: OutOpt = DEFAULT_OUT, runs: RunsOpt = 3,
    computes: Annotated[int, typer.Option("--computes", min=2, max=8,
                                          help="vmstream computes, if the bench brings the deployment up.")] = 3,
    state_dir: Annotated[Path | None, typer.Option("--dir", help="The deployment's state folder (default: VMSTREAM_OPENSTACK_DIR "
                                                   "or <data dir>/openstack).")] = None,
    keep: Annotated[bool, typer.Option(help="Leave a deployment the bench brought up running.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """10 clones of a live image vs 10 cold boots, through Nova on a one-machine deployment (brought up if need be)."""
    from vmstream.bench import openstack as b
    from vmstream.cli.context import settings
    from vmstream.errors import VmstreamError

    try:
        res = b.run_and_write(out, state_dir or settings().openstack_state, computes, runs, keep)
    except VmstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from exc
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        _show_table(res)


@bench_app.command("all")
def all_(out: Annotated[Path, typer.Option("--out", help="Directory for every bench's JSON, markdown and PNG.")] = Path("docs/bench"),
         doc: Annotated[Path, typer.Option("--doc", help="The summary document to write.")] = Path("docs/benchmarks.md"),
         runs: Annotated[int | None, typer.Option("--runs", min=1, help="Override every bench's default repetitions.")] = None,
         sizes: SizesOpt = "256,1024,2048,4096", as_json: JsonOpt = False) -> None:
    """Run every bench (baselines included) and write docs/benchmarks.md with tables and plots."""
    from vmstream.bench import suite

    sizes_mib = _ints(sizes)  # a bad value fails here, before an agent starts
    summary: dict[str, Any] = {}

    def run_all(bench: Any, out: Path, **kw: Any) -> dict[str, Any]:
        summary.update(suite.run_all(bench.client, out, doc, runs, sizes_mib))
        return summary

    def show(s: dict[str, Any]) -> None:
        from rich.markdown import Markdown

        from vmstream.bench.targets import markdown

        console = Console()
        console.print(Markdown(markdown(s["targets"])))
        console.print(f"{len(s['results'])} benches in {s['total_s'] / 60:.1f} min; wrote {doc} and every bench's JSON, "
                      f"markdown and plot in {out}", highlight=False)

    _run(run_all, out, as_json, show)
    if summary.get("errors"):
        print(f"error: benches failed: {', '.join(summary['errors'])} (see {doc})", file=sys.stderr)
        raise typer.Exit(1)
