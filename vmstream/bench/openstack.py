"""`vmstream bench openstack`: clones through Nova against cold boots through Nova.

On the one-machine deployment (`vmstream openstack up --vmstream --computes N`, brought up by
the bench if it is not, and taken down again if the bench brought it up), everything goes
through Nova's compute API, as an operator's request would:

- a source server (the demo guest, cold-booted) and its live image (`createImage`, which the
  vmstream driver turns into a live image in Glance);
- **first batch**: 10 servers of the live image (`POST /servers`, min = max = 10) after every
  agent dropped its caches: the image's memory only in the store. Then each host's share of
  the store's bytes (`store_bytes_per_host_over_image`, per clone too);
- **clones10_serving_s**: the median of --runs batches of 10 more, the image now on the
  hosts (the weigher puts them where it is); `hosts_used` for them;
- **the weigher**: a clone runs on one host only, then a batch of 5: where it lands;
- **boots10_serving_s**: 10 servers of the demo guest's plain Glance image, cold-booted by
  the same driver through the same Nova (the baseline), and `speedup` = its time / the clones'.

Each time runs from the compute API's create request (the `openstack` CLI's own start-up
is not counted) until every server is ACTIVE and has answered HTTP through its agent's
endpoint, watched through the agents so that the watching costs Nova nothing (Cluster.batch).
Each batch starts SETTLE_S after the last one's servers are gone, from a quiet deployment.
The source server, the live image and every server are deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vmstream.agentapi import ApiClient
from vmstream.bench.report import command_line, fmt_s, md_table, pyplot, write_outputs
from vmstream.bench.stats import median, ratio
from vmstream.errors import VmstreamError
from vmstream.openstack.deploy import ComputeSpec, Deployment, Layout
from vmstream.openstack.deploy.cloud import Cloud
from vmstream.openstack.deploy.errors import DeployError
from vmstream.openstack.deploy.layout import Agent
from vmstream.openstack.nova.translate import vm_name

BATCH = 10
WEIGHER_BATCH = 5
SERVE_TIMEOUT_S = 900.0  # 10 TCG cold boots on 2 busy cores
POLL_S = 0.2  # the agents' VM lists and the servers' HTTP: cheap, but 3 agents at 10 Hz cost ~0.1 core
SETTLE_S = 10.0  # between batches: a refill of 3 hosts' pools and Nova's deletes take a few seconds on 2 cores
NOVA_POLL_S = 2.0  # a server list with details costs nova-api and Neutron CPU that the servers being built need


def say(line: str) -> None:
    print(f"[bench openstack] {line}", file=__import__("sys").stderr, flush=True)


@dataclass
class Batch:
    """One POST /servers and what came of it."""

    ids: list[str]
    serving_s: float  # request -> every server ACTIVE and answering HTTP
    per_server_s: list[float]
    hosts: dict[str, int]  # compute -> servers placed there
    active_s: float  # request -> every server ACTIVE (as Nova says)


@dataclass
class Cluster:
    cloud: Cloud
    agents: dict[str, Agent]  # compute host -> its agent
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=5.0))
    clients: dict[str, ApiClient] = field(default_factory=dict)  # one per agent: a client costs ~10 ms of CPU to make

    def agent(self, host: str, method: str, path: str, **kw: Any) -> Any:
        if host not in self.clients:
            self.clients[host] = self.agents[host].client(60)
        return self.clients[host].call(method, path, **kw)

    def close(self) -> None:
        self.http.close()
        for client in self.clients.values():
            client.close()

    def answers(self, url: str) -> bool:
        try:
            return self.http.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def fetched(self) -> dict[str, dict[str, Any]]:
        """Each host's memfs figures per image (bytes fetched from the store since memfs started)."""
        return {h: self.agent(h, "GET", "/v1/host")["memfs"].get("images", {}) for h in self.agents}

    def drop_caches(self, hosts: list[str]) -> None:
        for h in hosts:
            self.agent(h, "POST", "/v1/host/cache/drop")

    def batch(self, name: str, image: str, flavor: str, count: int, host: str | None = None) -> Batch:
        """POST /servers (min = max = count) -> every server ACTIVE and serving HTTP.

        The watching must not slow what it watches: a server list with details costs nova-api
        and Neutron CPU (each lists the servers' ports and security groups) that the servers
        being built need. So the bench finds the servers' VMs in the agents' VM lists and asks
        them over HTTP every POLL_S, and asks Nova for the details only every NOVA_POLL_S (for
        ERROR) and, once every server answers, every POLL_S until all are ACTIVE."""
        self.cloud.token()  # a client holds its token already: not counted
        t0 = time.monotonic()
        reservation = self.cloud.create_servers(name, image, flavor, count=count, host=host)
        ids = self._ids(reservation, count)
        served: dict[str, float] = {}  # server -> when it first answered HTTP
        placed: dict[str, str] = {}  # server -> its compute
        active_s = 0.0
        last_nova = t0
        while True:
            now = time.monotonic()
            if now - t0 > SERVE_TIMEOUT_S:
                raise DeployError(f"{count - len(served)} of {count} servers not serving within {SERVE_TIMEOUT_S:.0f}s")
            waiting = {vm_name(i): i for i in ids if i not in served}
            for h in self.agents if waiting else ():
                for vm in self.agent(h, "GET", "/v1/vms"):
                    sid = waiting.get(vm["name"])
                    if sid and vm["state"] == "running" and self.answers(vm["endpoint"]):
                        served[sid], placed[sid] = time.monotonic() - t0, h
            if len(served) == count or now - last_nova >= NOVA_POLL_S:
                last_nova = now
                servers = self.cloud.servers(reservation_id=reservation)
                failed = [(s["name"], (s.get("fault") or {}).get("message")) for s in servers if s["status"] == "ERROR"]
                if failed:
                    raise DeployError(f"servers in ERROR: {failed}")
                if len(servers) == count and all(s["status"] == "ACTIVE" for s in servers):
                    active_s = time.monotonic() - t0
                    if len(served) == count:
                        break
            time.sleep(POLL_S)
        hosts: dict[str, int] = {}
        for h in placed.values():
            hosts[h] = hosts.get(h, 0) + 1
        return Batch(ids, max(active_s, *served.values()), sorted(served.values()), dict(sorted(hosts.items())), active_s)

    def _ids(self, reservation: str, count: int) -> list[str]:
        """The reservation's servers (a plain list: no details, nothing asked of Neutron)."""
        deadline = time.monotonic() + 60
        while True:
            found = self.cloud.json("compute", "GET", "/servers", params={"reservation_id": reservation})["servers"]
            if len(found) == count:
                return [str(s["id"]) for s in found]
            if time.monotonic() > deadline:
                raise DeployError(f"Nova lists {len(found)} of the {count} servers of reservation {reservation} after 60 s")
            time.sleep(POLL_S)


@contextlib.contextmanager
def deployment(root: Path, computes: int, keep: bool) -> Iterator[Deployment]:
    """The deployment, up with vmstream computes; taken down after if the bench brought it up."""
    dep = Deployment(root, ComputeSpec.vmstream(computes, Layout(root)))
    recorded = dep.layout.load_computes()
    reuse = dep.is_up() and recorded is not None and all(c.agent for c in recorded)
    if reuse:
        dep = Deployment(root)
        say(f"using the deployment up in {root} ({len(dep.computes)} vmstream computes)")
    else:
        say(f"bringing up a deployment with {computes} vmstream computes in {root}")
        dep.up()
    try:
        yield dep
    finally:
        if not reuse and not keep:
            say("taking the deployment down")
            dep.down()


def run(root: Path, computes: int = 3, runs: int = 3, keep: bool = False) -> dict[str, Any]:
    if computes < 2:
        raise DeployError("the bench needs at least 2 computes (--computes): it measures placement across hosts")
    with deployment(root, computes, keep) as dep, Cloud(dep.credentials()) as cloud:
        agents = {a.host: a for a in (c.agent for c in dep.computes) if a is not None}
        c = Cluster(cloud, agents)
        try:
            return _measure(c, runs)
        finally:
            c.close()


def settle() -> None:
    """Each measured batch starts from a quiet deployment: the last one's teardown (Nova's
    deletes, Placement, the agents' VMs) and the clone pools' refills behind it are over."""
    time.sleep(SETTLE_S)


def _measure(c: Cluster, runs: int) -> dict[str, Any]:
    cloud, hosts = c.cloud, sorted(c.agents)
    flavor = cloud.ensure_flavor()
    demo = cloud.ensure_demo_image()
    others = cloud.servers(all_tenants="1")
    if others:  # their allocations and instances weigh in Nova's placement and in every claim
        say(f"note: {len(others)} other servers in the deployment ({', '.join(sorted(s['name'] for s in others)[:5])}...): "
            "they change where Nova puts the bench's servers and how fast")
    made: list[str] = []  # servers to delete at the end
    live_id: str | None = None
    try:
        say(f"source server: a cold boot of the demo guest on {hosts[0]}")
        src = c.batch("bench-src", demo, flavor, 1, host=hosts[0])
        made += src.ids
        t0 = time.monotonic()
        live_id = cloud.live_image(src.ids[0], "bench-live")
        snapshot_s = time.monotonic() - t0
        live = cloud.json("image", "GET", f"/v2/images/{live_id}")
        live_name = live["vmstream_live_image"]
        say(f"live image {live_name} in {snapshot_s:.2f}s; every host drops its caches")

        c.drop_caches(hosts)
        before = c.fetched()
        first = c.batch("bench-first", live_id, flavor, BATCH)
        made += first.ids
        after = c.fetched()
        say(f"first batch (image only in the store): {first.serving_s:.2f}s, on {first.hosts}")
        image_bytes = next((v["nonzero_bytes"] for h in hosts for k, v in after[h].items() if k == live_name), None)
        per_host = {h: after[h].get(live_name, {}).get("fetched_bytes", 0) - before[h].get(live_name, {}).get("fetched_bytes", 0)
                    for h in first.hosts}
        cloud.delete_servers(first.ids)
        settle()
        made = [m for m in made if m not in first.ids]

        warm: list[Batch] = []
        for r in range(runs):
            b = c.batch(f"bench-clones{r}", live_id, flavor, BATCH)
            warm.append(b)
            say(f"run {r + 1}/{runs}: 10 clones serving in {b.serving_s:.2f}s (ACTIVE {b.active_s:.2f}s), on {b.hosts}")
            cloud.delete_servers(b.ids)
            settle()

        # only one host runs a clone of the image: where does the weigher put the next batch?
        # (what the scheduler knows at once: the computes tell it as servers start and go)
        keeper = hosts[-1]
        one = c.batch("bench-keeper", live_id, flavor, 1, host=keeper)
        w = c.batch("bench-weigher", live_id, flavor, WEIGHER_BATCH)
        say(f"weigher: a clone runs on {keeper} alone; a batch of {WEIGHER_BATCH} went to {w.hosts}")
        cloud.delete_servers(w.ids + one.ids)
        settle()

        say("baseline: 10 cold boots of the demo guest through the same Nova")
        cold = c.batch("bench-boots", demo, flavor, BATCH)
        say(f"10 cold boots serving in {cold.serving_s:.1f}s, on {cold.hosts}")
        cloud.delete_servers(cold.ids)
    finally:
        with contextlib.suppress(VmstreamError, DeployError, httpx.HTTPError):
            if made:
                cloud.delete_servers(made)
        if live_id:
            with contextlib.suppress(VmstreamError, DeployError, httpx.HTTPError):
                cloud.delete_image(live_id)

    clones10 = median([b.serving_s for b in warm])
    used = sorted({h for b in warm for h in b.hosts})
    store_ratio = {h: round(v / image_bytes, 3) for h, v in per_host.items()} if image_bytes else {}
    return {
        "command": command_line(),
        "host_cpus": os.cpu_count(),
        "computes": hosts,
        "other_servers": len(others),
        "clones10_serving_s": round(clones10, 3),
        "clones10_serving_runs_s": [round(b.serving_s, 3) for b in warm],
        "clones10_active_runs_s": [round(b.active_s, 3) for b in warm],
        "clones10_first_serving_s": round(first.serving_s, 3),
        "boots10_serving_s": round(cold.serving_s, 3),
        "boots10_hosts": cold.hosts,
        "boot1_serving_s": round(src.serving_s, 3),
        "speedup": ratio(cold.serving_s, clones10),
        "hosts_used": len(used),
        "hosts_by_run": [b.hosts for b in warm],
        "first_batch_hosts": first.hosts,
        "store_bytes_per_host_over_image": round(sum(store_ratio.values()) / len(store_ratio), 3) if store_ratio else None,
        "store_bytes_by_host": per_host,
        "store_bytes_per_clone_over_image": {h: round(store_ratio[h] / first.hosts[h], 3) for h in store_ratio},
        "image_nonzero_bytes": image_bytes,
        "weigher": {"holder": keeper, "placed": w.hosts},
        "snapshot_s": round(snapshot_s, 2),
        "per_server_s": {"clones": warm[-1].per_server_s, "first": first.per_server_s, "boots": cold.per_server_s},
    }


def render(res: dict[str, Any]) -> tuple[str, Any]:
    rows = [
        ["10 clones of a live image (image on the hosts), median", fmt_s(res["clones10_serving_s"]),
         ", ".join(fmt_s(x) for x in res["clones10_serving_runs_s"])],
        ["10 clones, first batch (image only in the store)", fmt_s(res["clones10_first_serving_s"]), str(res["first_batch_hosts"])],
        ["10 cold boots of the demo guest (baseline)", fmt_s(res["boots10_serving_s"]), str(res.get("boots10_hosts", "-"))],
        ["1 cold boot (the source server)", fmt_s(res["boot1_serving_s"]), ""],
    ]
    md = (
        f"Through Nova on a one-machine deployment ({len(res['computes'])} vmstream computes, {res['host_cpus']} cores): "
        f"from `POST /servers` (min = max = 10) until every server is ACTIVE and answers HTTP.\n\n"
        + md_table(["what", "seconds", "runs / placement"], rows)
        + f"\n\nspeedup {res['speedup']}x; hosts used by the clones: {res['hosts_used']} ({res['hosts_by_run']}); "
        f"the store served each host {res['store_bytes_per_host_over_image']} of the image "
        f"(per clone: {res['store_bytes_per_clone_over_image']}); the weigher, with a clone running on "
        f"{res['weigher']['holder']} alone, placed a batch of {WEIGHER_BATCH} on {res['weigher']['placed']}; live image made in "
        f"{res['snapshot_s']} s.\n"
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, key, color in (("clones (image on hosts)", "clones", "#3f7fd9"), ("clones, first batch", "first", "#7fbf7f"),
                              ("cold boots", "boots", "#d94f3f")):
        times = res["per_server_s"][key]
        ax.step(times, range(1, len(times) + 1), where="post", color=color, label=label)
    ax.axvline(6.0, color="#999999", ls=":", label="target for 10 clones (6 s)")
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_xticks([1, 2, 4, 6, 10, 20, 40, 60])
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("seconds since POST /servers")
    ax.set_ylabel("servers serving")
    ax.set_title("10 servers through Nova: vmstream clones vs cold boots")
    ax.legend()
    ax.grid(alpha=0.3)
    return md, fig


def run_and_write(out: Path, root: Path, computes: int, runs: int, keep: bool) -> dict[str, Any]:
    res = run(root, computes, runs, keep)
    res["files"] = write(out, res)
    return res


def write(out: Path, res: dict[str, Any]) -> dict[str, str]:
    """The JSON, table and plot of a result (run's, or one read back to render again)."""
    md, fig = render(res)
    return write_outputs(out, "openstack", {k: v for k, v in res.items() if k != "files"}, md, fig)
