"""The `vmstream` command line (Typer + rich). Every verb has --json."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vmstream.cli.bench import bench_app
from vmstream.cli.context import client, settings
from vmstream.cli.group import group_app
from vmstream.cli.migrate import migrate, peer_app
from vmstream.cli.openstack import openstack_app
from vmstream.config import parse_size
from vmstream.errors import InvalidInput, VmstreamError
from vmstream.guest.identity import parse_params

app = typer.Typer(
    help="Virtual memory streaming: boot once, clone in a fraction of a second.",
    no_args_is_help=True, pretty_exceptions_enable=False,
)
image_app = typer.Typer(help="Live images: create, start clones, list, servers, delete.", no_args_is_help=True)
guest_app = typer.Typer(help="The demo guest.", no_args_is_help=True)
agent_app = typer.Typer(help="The per-host agent (runs in the foreground without a subcommand).")
app.add_typer(image_app, name="live-image")
app.add_typer(guest_app, name="guest")
app.add_typer(agent_app, name="agent")
app.add_typer(bench_app, name="bench")
app.add_typer(peer_app, name="peer")
app.add_typer(group_app, name="group")
app.add_typer(openstack_app, name="openstack")
app.command()(migrate)

out = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


_client = client


MemoryLimitOpt = Annotated[str | None, typer.Option(
    "--memory-limit", help="The most memory the VM alone may cost the host (what it wrote, and QEMU's own), e.g. 192M; "
                           "held to through its balloon.")]
BurstOpt = Annotated[str | None, typer.Option(
    help="How far above --memory-limit it may go, and for how long at a time: SIZE:SECONDS, e.g. 64M:10.")]


def _memory_policy(limit: str | None, burst: str | None) -> dict[str, Any] | None:
    """The API's memory_policy from --memory-limit and --burst ('none': no limit)."""
    if limit is None and burst is None:
        return None
    policy: dict[str, Any] = {"limit_bytes": None if limit in (None, "none") else parse_size(limit)}
    if burst not in (None, "none"):
        size, sep, seconds = burst.partition(":")
        try:
            policy["burst_s"] = float(seconds)
        except ValueError:
            raise InvalidInput(f"--burst '{burst}' is not SIZE:SECONDS: give e.g. 64M:10") from None
        if not sep:
            raise InvalidInput(f"--burst '{burst}' is not SIZE:SECONDS: give e.g. 64M:10")
        policy["burst_bytes"] = parse_size(size)
    return policy


def _emit(obj: Any, as_json: bool, render: Any = None) -> None:
    if as_json or render is None:
        print(json.dumps(obj, indent=2, default=str))
    else:
        render(obj)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def _vm_table(vms: list[dict[str, Any]]) -> None:
    t = Table("name", "state", "endpoint", "image", "memory", "ready")
    for v in vms:
        t.add_row(v["name"], v["state"], v["endpoint"], v["parent_image"] or "-", _mib(v["memory_bytes"]),
                  f"{v['ready_s']:.2f}s" if v["ready_s"] is not None else "-")
    out.print(t)


@app.command()
def info(as_json: JsonOpt = False) -> None:
    """Show the accelerator (and why), QEMU version, data dir and guest."""
    res = _client().call("GET", "/v1/info")
    _emit(res, as_json, lambda r: out.print(
        f"accelerator: [bold]{r['accelerator']}[/bold] ({r['accelerator_reason']})\n"
        f"qemu: {r['qemu_version']}\ndata dir: {r['data_dir']}\nguest: {r['guest']['key']} (kernel {r['guest']['kernel_release']})"
    ))


@app.command()
def boot(
    name: str,
    memory: Annotated[str, typer.Option(help="Guest RAM, e.g. 256M or 1G.")] = "256M",
    cpus: Annotated[int, typer.Option(help="Virtual CPUs.")] = 1,
    guest_agent: Annotated[str, typer.Option(
        help="In-guest agent: 'native' (C, fast) or 'portable' (the shell agent real guests use).")] = "native",
    disk: Annotated[str | None, typer.Option(
        help="Boot a real Linux guest from this disk image (raw or qcow2; never written), or 'debian' for the "
             "Debian guest vmstream builds (see 'vmstream guest rootfs').")] = None,
    ready: Annotated[str | None, typer.Option(
        help="When the VM is ready: 'agent' (the in-guest agent answers; default for a disk image), 'tcp:PORT', "
             "'http:PORT/PATH' (2xx), 'none', or 'status' (the status page of the demo and 'debian' guests; their default). "
             "Kept with its live images for their clones.")] = None,
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", help="Forward a guest port from 127.0.0.1: HOST:GUEST, or GUEST for any free host port "
                                "(repeatable). Clones get their own host ports for the same guest ports.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to be ready; then it is stopped and its logs kept.")] = 240.0,
    boot_from: Annotated[str, typer.Option(
        "--boot", help="How a disk guest boots: 'firmware' (its own bootloader, as a cloud image), 'vmstream' (vmstream's "
                       "kernel; the disk holds a root file system, bare or in partition 1), or 'auto' (firmware if the disk "
                       "has a partition table; vmstream for 'debian').")] = "auto",
    kernel: Annotated[str | None, typer.Option(help="A disk guest: boot this kernel instead (a file on the agent's host).")] = None,
    initrd: Annotated[str | None, typer.Option(help="With --kernel: its initrd.")] = None,
    append: Annotated[str | None, typer.Option(
        help="With --kernel: its command line (default: root=/dev/vda1 ro console=ttyS0, or /dev/vda for a bare file system).")] = None,
    user_data: Annotated[Path | None, typer.Option(
        help="cloud-init user-data (#cloud-config or a script), handed to the guest in a NoCloud seed on its first boot; "
             "the image needs Debian's cloud-init package (the 'debian' guest has it).",
        exists=True, dir_okay=False, readable=True)] = None,
    memory_limit: MemoryLimitOpt = None,
    burst: BurstOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cold-boot the demo guest (or a disk guest); returns when it is ready."""
    body: dict[str, Any] = {"name": name, "memory": memory, "cpus": cpus, "guest_agent": guest_agent, "disk": disk,
                            "ready": ready, "publish": publish or [], "timeout": timeout, "boot": boot_from,
                            "kernel": kernel, "initrd": initrd, "append": append,
                            "memory_policy": _memory_policy(memory_limit, burst)}
    for key in ("disk", "kernel", "initrd"):  # files on this host: the agent does not share our working directory
        if body[key] and body[key] != "debian" and Path(body[key]).exists():
            body[key] = str(Path(body[key]).absolute())
    if user_data is not None:
        body["user_data"] = user_data.read_text(errors="replace")
    res = _client().call("POST", "/v1/vms", json=body, timeout=timeout + 120)  # a disk guest may first be built

    def render(r: dict[str, Any]) -> None:
        ports = "".join(f", guest port {g} at 127.0.0.1:{h}" for g, h in r.get("ports", {}).items())
        out.print(f"{r['name']} is ready ({r['ready']}) in {r['ready_s']:.2f}s at {r['endpoint']}{ports}")

    _emit(res, as_json, render)


@app.command("list")
def list_vms(as_json: JsonOpt = False) -> None:
    """List this host's VMs."""
    _emit(_client().call("GET", "/v1/vms"), as_json, _vm_table)


@app.command()
def show(name: str, as_json: JsonOpt = False) -> None:
    """One VM: state, endpoint, parent image and memory footprint."""
    def render(v: dict[str, Any]) -> None:
        _vm_table([v])
        ports = ", ".join(f"guest {g} -> 127.0.0.1:{h}" for g, h in v.get("ports", {}).items())
        out.print(f"ready when: {v.get('ready')}" + (f"; published: {ports}" if ports else ""))
        if v.get("disk"):
            out.print(f"boots: {v.get('boot')}" + ("; cloud-init seed attached" if v.get("cloud_init_seed") else ""))
        fp = v.get("footprint")
        if fp:
            t = Table("resident", "PSS", "private", "shared", "anonymous", "guest RAM written", "guest RAM from image")
            g = fp.get("guest_ram") or {}
            t.add_row(*(_mib(fp[k]) for k in ("resident_bytes", "pss_bytes", "private_bytes", "shared_bytes", "anonymous_bytes")),
                      _mib(g.get("anonymous_bytes")), _mib(g.get("image_bytes")))
            out.print(t)
        _memory_table(v)
    _emit(_client().call("GET", f"/v1/vms/{name}"), as_json, render)


def _memory_table(v: dict[str, Any]) -> None:
    mem = v.get("memory")
    if not mem:
        return
    p = mem.get("policy") or {}
    limit = _mib(p.get("limit_bytes")) + (f" (+{_mib(p['burst_bytes'])} for {p['burst_s']:g} s)" if p.get("burst_bytes") else "")
    t = Table("limit", "now allowed", "private", "balloon leaves guest", "guest free", "bursting")
    t.add_row(limit, _mib(mem.get("allowed_bytes")), _mib(mem.get("private_bytes")), _mib(mem.get("balloon_bytes")),
              _mib(mem.get("guest_free_bytes")), "yes" if mem.get("bursting") else "no")
    out.print(t)


@app.command()
def memory(
    name: str,
    limit: Annotated[str, typer.Option(help="The VM's new memory limit (e.g. 192M), or 'none'.")],
    burst: BurstOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a running VM's memory limit and bursts; the agent applies them within a second."""
    policy = _memory_policy(limit, burst) or {}
    _emit(_client().call("PUT", f"/v1/vms/{name}/memory", json=policy), as_json, _memory_table)


@app.command()
def destroy(name: str, as_json: JsonOpt = False) -> None:
    """Stop a VM and remove everything it had on this host."""
    _emit(_client().call("DELETE", f"/v1/vms/{name}"), as_json, lambda r: out.print(f"destroyed {r['destroyed']}"))


@app.command()
def pause(name: str, as_json: JsonOpt = False) -> None:
    """Stop a VM's vCPUs: it keeps its memory and connections and uses no CPU until 'unpause'."""
    _emit(_client().call("POST", f"/v1/vms/{name}/pause"), as_json, lambda v: out.print(f"{v['name']} is {v['state']}"))


@app.command()
def unpause(name: str, as_json: JsonOpt = False) -> None:
    """Run a paused VM again, from where it stopped."""
    _emit(_client().call("POST", f"/v1/vms/{name}/unpause"), as_json, lambda v: out.print(f"{v['name']} is {v['state']}"))


@app.command()
def host(
    drop_cache: Annotated[bool, typer.Option("--drop-cache", help="First empty the chunk cache (cold-start tests).")] = False,
    gc: Annotated[bool, typer.Option("--gc", help="Garbage-collect the store now and show what it did.")] = False,
    grace: Annotated[float, typer.Option(help="--gc: seconds an unused pack stays condemned before it is deleted.")] = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """This host: memory, VM totals, the chunk cache and per-image streaming counters."""
    if gc:
        report = _client().call("POST", "/v1/host/store/gc", params={"grace": grace})
        _emit(report, as_json, lambda r: out.print(
            f"store GC: {r['roots']} image(s) in use, {r['packs']} packs, {r['condemned']} newly condemned, "
            f"{r['deleted']} deleted ({_mib(r['deleted_bytes'])}), {r['young_packs']} too young to judge"))
        return
    if drop_cache:
        _client().call("POST", "/v1/host/cache/drop")
    def render(h: dict[str, Any]) -> None:
        out.print(f"memory: {_mib(h['mem_available_bytes'])} available of {_mib(h['mem_total_bytes'])}; "
                  f"{h['running_vms']} VM(s) running, PSS {_mib(h['vm_pss_bytes'])}, "
                  f"private {_mib(h['vm_private_bytes'])}, guest RAM shared from images {_mib(h['guest_ram_from_images_bytes'])}")
        out.print(f"store: {h['store']}")
        if h.get("clone_pool", {}).get("ready"):
            out.print("clone pool (QEMUs started ahead, paused): "
                      + ", ".join(f"{k} {v}" for k, v in h["clone_pool"]["ready"].items()))
        m = h["memfs"]
        if not m.get("running"):
            out.print("memfs: not running")
            return
        out.print(f"chunk cache: {_mib(m['cache_bytes'])} of {_mib(m['cache_capacity'])}")
        t = Table("image", "memory", "non-zero", "fetched from store", "cache hit ratio", "errors")
        for name, i in m["images"].items():
            ratio = "-" if i["cache_hit_ratio"] is None else f"{i['cache_hit_ratio']:.2f}"
            t.add_row(name, _mib(i["size"]), _mib(i["nonzero_bytes"]), _mib(i["fetched_bytes"]), ratio, str(i["errors"]))
        out.print(t)
    _emit(_client().call("GET", "/v1/host"), as_json, render)


@image_app.command("create")
def image_create(
    vm: str, image: str,
    flatten: Annotated[bool | None, typer.Option(
        "--flatten/--no-flatten", help="From a clone: store full memory, or only its delta (default: delta unless large)."
    )] = None,
    as_json: JsonOpt = False,
) -> None:
    """Freeze a running VM into a live image; the VM keeps running."""
    res = _client().call("POST", "/v1/live-images", json={"vm": vm, "name": image, "flatten": flatten})
    _emit(res, as_json, lambda r: out.print(
        f"live image {r['name']} created from {r['source_vm']}: paused {r['pause_ms']:.1f} ms, "
        f"{_mib(r['memory_bytes_stored'])} stored ({r['layout']}"
        + (f" over {r['memory_root']}" if r["memory_root"] else "") + f") for {_mib(r['memory_bytes'])} of RAM"))


@image_app.command("start")
def image_start(
    image: str,
    count: Annotated[int, typer.Option(help="How many clones to start, in parallel.")] = 1,
    name: Annotated[str | None, typer.Option(help="Name prefix; clones are PREFIX-1, PREFIX-2, ...")] = None,
    param: Annotated[list[str] | None, typer.Option(
        help="Guest parameter key=value for the clone hooks (repeatable).")] = None,
    user_data: Annotated[Path | None, typer.Option(help="File handed to the guest as user data.")] = None,
    memory_limit: MemoryLimitOpt = None,
    burst: BurstOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start clones of a live image; each continues from the snapshot point with a new identity."""
    body: dict[str, Any] = {"count": count, "name": name, "params": parse_params(param or []),
                            "memory_policy": _memory_policy(memory_limit, burst)}
    if user_data is not None:
        try:
            body["user_data_b64"] = base64.b64encode(user_data.read_bytes()).decode()
        except OSError as exc:
            raise InvalidInput(f"cannot read user data file {user_data}: {exc.strerror}") from exc
    res = _client().call("POST", f"/v1/live-images/{image}/start", json=body)

    def render(r: dict[str, Any]) -> None:
        _vm_table(r["vms"])
        out.print(f"{len(r['vms'])} clone(s) serving in {r['elapsed_s']:.2f}s")

    _emit(res, as_json, render)


@image_app.command("list")
def image_list(as_json: JsonOpt = False) -> None:
    """List live images."""
    def render(images: list[dict[str, Any]]) -> None:
        t = Table("name", "from VM", "memory", "stored", "pause", "clones", "created")
        for i in images:
            t.add_row(i["name"], i["source_vm"], _mib(i["memory_bytes"]), _mib(i["memory_bytes_stored"]),
                      f"{i['pause_ms']:.1f} ms", str(i["clones"]), str(i["created_at"])[:19])
        out.print(t)
    _emit(_client().call("GET", "/v1/live-images"), as_json, render)


@image_app.command("servers")
def image_servers(image: str, as_json: JsonOpt = False) -> None:
    """The VMs running as clones of a live image."""
    _emit(_client().call("GET", f"/v1/live-images/{image}/servers"), as_json, _vm_table)


@image_app.command("delete")
def image_delete(image: str, as_json: JsonOpt = False) -> None:
    """Delete a live image (refused while clones of it run)."""
    _emit(_client().call("DELETE", f"/v1/live-images/{image}"), as_json, lambda r: out.print(f"deleted {r['deleted']}"))


@guest_app.command("build")
def guest_build(
    kernel: Annotated[Path | None, typer.Option(help="Kernel to use (default: newest /boot/vmlinuz-*).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build the demo guest (kernel + busybox initramfs); cached until its inputs change."""
    body = {"kernel": str(kernel.absolute()) if kernel else None, "force": force}
    res = _client().call("POST", "/v1/guest/build", json=body)
    _emit(res, as_json, lambda r: out.print(f"guest {r['key']}: kernel {r['kernel_release']}, initrd {r['initrd']}"))


@guest_app.command("ask")
def guest_ask(
    vm: str, command: str,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 30.0,
) -> None:
    """Send a command to the in-guest agent (ping, status, memcheck-fill MIB SEED, memcheck-verify)."""
    print(json.dumps(_client().call("POST", f"/v1/vms/{vm}/guest", json={"command": command, "timeout": timeout}), indent=2))


@guest_app.command("rootfs")
def guest_rootfs(
    force: Annotated[bool, typer.Option("--force", help="Build it again even if it exists.")] = False,
) -> None:
    """Build the Debian disk guest (debootstrap; about a minute): systemd, the vmstream agent, qemu-guest-agent."""
    from vmstream.guest.rootfs import build_rootfs

    cfg = settings()
    path = build_rootfs(cfg.home / "guest" / "rootfs", force, say=lambda m: Console(stderr=True).print(m), mirror=cfg.debian_mirror)
    out.print(f"{path}\nboot it with: vmstream boot NAME --disk debian --memory 512M")


@guest_app.command("qga")
def guest_qga(
    vm: str, execute: str,
    arguments: Annotated[str | None, typer.Option("--arguments", help="The command's arguments as JSON.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
) -> None:
    """Run a qemu-guest-agent command in a disk guest (e.g. guest-info, guest-get-time)."""
    try:
        args = json.loads(arguments) if arguments else None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--arguments is not JSON: {exc}") from exc
    body = {"execute": execute, "arguments": args, "timeout": timeout}
    print(json.dumps(_client().call("POST", f"/v1/vms/{vm}/qga", json=body, timeout=timeout + 10), indent=2))


@guest_app.command("clock")
def guest_clock(
    vm: str,
    qga: Annotated[bool, typer.Option("--qga", help="Read it through qemu-guest-agent (disk guests).")] = False,
    samples: Annotated[int, typer.Option(help="Round trips; the shortest is kept.", min=1, max=50)] = 5,
    as_json: JsonOpt = False,
) -> None:
    """The guest's wall clock against this host's (offset, and the most it can be off)."""
    r = _client().call("GET", f"/v1/vms/{vm}/clock", params={"source": "qga" if qga else "agent", "samples": samples})
    _emit(r, as_json, lambda r: out.print(f"{r['vm']}: guest clock {r['offset_s'] * 1000:+.1f} ms against the host's "
                                          f"(± {r['error_s'] * 1000:.1f} ms, read through {r['source']})"))


@guest_app.command("agent-installer")
def guest_agent_installer(
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write to this file instead of stdout.")] = None,
    portable: Annotated[bool, typer.Option("--portable", help="Only the shell agent (no native x86_64 binary).")] = False,
) -> None:
    """A shell installer for the in-guest agent on a real Linux guest (run it there as root)."""
    from vmstream.guest.installer import agent_installer

    script = agent_installer(native=not portable)
    if output is None:
        sys.stdout.write(script)
    else:
        output.write_text(script)
        output.chmod(0o755)
        out.print(f"wrote {output}: copy it into the guest and run it as root")


@agent_app.callback(invoke_without_command=True)
def agent(ctx: typer.Context, port: Annotated[int, typer.Option(help="Loopback port (0: any free one).")] = 0) -> None:
    """Run the host agent in the foreground (the CLI starts one in the background when needed)."""
    if ctx.invoked_subcommand is None:
        from vmstream.host.server import run_agent

        run_agent(settings(), port)


@agent_app.command("stop")
def agent_stop(
    destroy_vms: Annotated[bool, typer.Option("--destroy-vms", help="Destroy every VM first.")] = False,
) -> None:
    """Stop the background agent. VMs keep running unless --destroy-vms; a new agent adopts them."""
    stopped = _client().stop_agent(destroy_vms)
    out.print("agent stopped" if stopped else "no agent was running")


@app.command()
def demo(
    clones: Annotated[int, typer.Option(help="How many clones to start.")] = 10,
    memory: Annotated[str, typer.Option(help="Guest RAM.")] = "256M",
    as_json: JsonOpt = False,
) -> None:
    """Boot a VM, freeze it into a live image, start clones, compare, clean up."""
    from vmstream.cli.demo import render_demo, run_demo

    result = run_demo(_client(), clones, memory, progress=None if as_json else out)
    _emit(result, as_json, lambda r: render_demo(out, r))
    if result["clones_serving"] != clones:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except VmstreamError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
