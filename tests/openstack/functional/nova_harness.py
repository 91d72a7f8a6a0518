"""vmstream's Nova driver inside Nova's own functional-test harness, against real vmstream agents.

Issue #16 (5a), the in-process way: Nova's real API (WSGI in process), conductor, scheduler and
two nova-computes, with Nova's Placement, Glance and Neutron fixtures (the pattern of
nova/tests/functional/regressions/test_bug_1718455.py). Each compute loads
`compute_driver = vmstream.VmstreamDriver` through the namespace shim and drives its own real
agent, so servers are real QEMU guests.

Runs under Debian's /usr/bin/python3 (python3-nova and its test packages; stdlib, Nova and
vmstream.agentapi only), in a process of its own: nova.tests.functional monkey-patches eventlet
on import. tests/openstack/test_nova_functional.py starts the agents, writes the shim and runs

    PYTHONPATH=<shim dir> VMSTREAM_NOVA_AGENTS='{"compute1": {"url": ..., "token_file": ...}, ...}' \\
        /usr/bin/python3 tests/openstack/functional/nova_harness.py

The cases a driver may lack (a snapshot as a live image whose servers are clones, live
migration) ask the driver first and are skipped with its own reason (NotImplementedError) if it
cannot; the pytest side requires every case to pass.
"""

import collections
import json
import os
import sys
import time
import unittest
import urllib.request

import nova.tests.functional  # noqa: F401  # first: monkey-patches eventlet before anything opens a socket
from nova import context as nova_context
from nova import exception
from nova.tests.functional import integrated_helpers
from nova.tests.unit import fake_instance
from oslo_utils import uuidutils

from vmstream.agentapi import ApiClient
from vmstream.openstack.nova import driver as vmstream_driver  # registers [vmstream] before setUp sets it
from vmstream.openstack.nova.translate import VM_PREFIX, vm_name

AGENTS = json.loads(os.environ.get("VMSTREAM_NOVA_AGENTS", "{}"))  # host -> {"url", "token_file"}
HOSTS = sorted(AGENTS)
SERVERS = int(os.environ.get("VMSTREAM_NOVA_SERVERS", "10"))  # the multi-create case: that many cold boots
CLONES = 3  # servers started from a live image
BOOT_TIMEOUT_S = float(os.environ.get("VMSTREAM_NOVA_BOOT_TIMEOUT", "300"))  # 10 TCG cold boots on 2 busy cores
API_PASTE = "/usr/share/nova-common/api-paste.ini"  # nova-common's; the fixture's default path is not packaged
MIB = 1 << 20
FLAVOR_MB = 256


def setUpModule():
    if len(HOSTS) < 2:
        raise unittest.SkipTest("VMSTREAM_NOVA_AGENTS names fewer than two agents: run this through "
                                "tests/openstack/test_nova_functional.py, which starts them")


def record(case, **figures):
    """A case's figures, for the pytest side to show (VMSTREAM_NOVA_FIGURES, one JSON a line)."""
    path = os.environ.get("VMSTREAM_NOVA_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, **figures}) + "\n")


class VmstreamComputesTest(integrated_helpers.ProviderUsageBaseTestCase):
    """Two computes (HOSTS), each with vmstream's driver over its own agent.

    ProviderUsageBaseTestCase, not _IntegratedTestBase: the latter makes RPC casts calls, so a
    multi-create would boot one server after another.
    """

    compute_driver = "vmstream.VmstreamDriver"

    def setUp(self):
        self.flags(api_paste_config=API_PASTE, group="wsgi")
        # CONF is one per process and both computes run in this one: each driver finds its
        # agent by the host init_host() gave it.
        self.flags(agents={h: f"{a['url']}|{a['token_file']}" for h, a in AGENTS.items()},
                   boot_timeout=BOOT_TIMEOUT_S, group="vmstream")
        super().setUp()
        self.agents = {}
        for host, agent in AGENTS.items():
            with open(agent["token_file"]) as f:
                self.agents[host] = ApiClient(agent["url"], f.read().strip(), f"the vmstream agent of {host}")
            self.addCleanup(self.agents[host].close)
        # Added before the computes start, so it runs after they stop: a failed case leaves no VM to the next.
        self.addCleanup(self._destroy_nova_vms)
        for host in HOSTS:
            self._start_compute(host)
        self.flavor_id = self._create_flavor(name="vmstream-tiny", memory_mb=FLAVOR_MB, vcpu=1, disk=1, ephemeral=0)
        self.demo_image = self._add_image("vmstream-demo", vmstream_guest="demo")

    # ---- helpers -----------------------------------------------------------------------

    def _add_image(self, name, **properties):
        """An image in the Glance fixture; custom properties reach spawn as system_metadata['image_<key>']."""
        image = {"id": uuidutils.generate_uuid(), "name": name, "status": "active", "visibility": "public",
                 "container_format": "bare", "disk_format": "raw", "size": "85", "min_ram": 0, "min_disk": 0,
                 "protected": False, "tags": [], "properties": dict(properties),
                 "created_at": self.glance.timestamp, "updated_at": self.glance.timestamp,
                 "deleted": False, "deleted_at": None, "is_public": True}
        self.glance.create(None, image)
        return image["id"]

    def _nova_vms(self, host):
        """The VMs of Nova's servers on a host's agent, asked through the agent's own API."""
        return {vm["name"]: vm for vm in self.agents[host].call("GET", "/v1/vms") if vm["name"].startswith(VM_PREFIX)}

    def _destroy_nova_vms(self):
        for host, agent in self.agents.items():
            for name in self._nova_vms(host):
                agent.call("DELETE", f"/v1/vms/{name}")

    @staticmethod
    def _guest_status(vm):
        """The guest's own status page (hostname, uptime, a once-a-second counter)."""
        with urllib.request.urlopen(vm["endpoint"].rstrip("/") + "/status.json", timeout=30) as r:
            return json.load(r)

    def _boot(self, name, count, image=None, expect="ACTIVE"):
        """One POST /servers (min = max = count, no network) until every server is `expect`: servers, seconds."""
        req = self._build_server(name=name, image_uuid=image or self.demo_image, flavor_id=self.flavor_id, networks="none")
        req.update(min_count=count, max_count=count, return_reservation_id=True)
        t0 = time.monotonic()
        reservation = self.api.post_server({"server": req})["reservation_id"]
        deadline = t0 + BOOT_TIMEOUT_S
        while True:
            servers = self.api.get_servers(detail=True, search_opts={"reservation_id": reservation})
            failed = [(s["name"], s.get("fault", {}).get("message")) for s in servers if s["status"] == "ERROR"]
            if expect != "ERROR" and failed:
                self.fail(f"servers in ERROR: {failed}")
            if len(servers) == count and all(s["status"] == expect for s in servers):
                return servers, time.monotonic() - t0
            if time.monotonic() > deadline:
                states = [(s["name"], s["status"]) for s in servers]
                self.fail(f"{count} servers not all {expect} after {BOOT_TIMEOUT_S:.0f}s: {states}")
            time.sleep(0.5)

    def _delete(self, servers):
        """Delete the servers; their VMs must be gone from every agent. Seconds taken."""
        t0 = time.monotonic()
        for s in servers:
            self.api.delete_server(s["id"])
        for s in servers:
            self._wait_until_deleted(s)
        left = {h: sorted(set(self._nova_vms(h)) & {vm_name(s["id"]) for s in servers}) for h in HOSTS}
        self.assertEqual({h: [] for h in HOSTS}, left, "VMs left on the agents after their servers were deleted")
        return time.monotonic() - t0

    def _driver_says_not_yet(self, calls):
        """The driver's own reason for not doing something yet, or None if it tries.

        Asks the driver directly, with a server it does not have, so no guest boots just to find
        out: each call is (method, args). A stub raises NotImplementedError (or, for a live
        migration's pre-check, MigrationPreCheckError) in the method itself; an implementation
        gets further and fails some other way (no such VM), which is ignored here.
        """
        drv = self.computes[HOSTS[0]].manager.driver
        ctx = nova_context.get_admin_context()
        instance = fake_instance.fake_instance_obj(ctx, uuid=uuidutils.generate_uuid(), host=HOSTS[0], node=HOSTS[0],
                                                   image_ref=self.demo_image)
        for method, args in calls:
            try:
                getattr(drv, method)(ctx, instance, *args)
            except (NotImplementedError, exception.MigrationPreCheckError) as exc:
                tb = exc.__traceback__
                while tb.tb_next is not None:
                    tb = tb.tb_next
                if tb.tb_frame.f_code.co_name == method:  # raised on entry, not by something it called
                    return f"{type(drv).__name__}.{method}: {str(exc) or 'NotImplementedError (Nova base driver)'}"
            except Exception:  # an implementation: the made-up server fails it somewhere
                pass
        return None

    def _wait_snapshot(self, server, image_id):
        """The Glance image once the server's snapshot task is over; fails at once with the compute's
        error (a failed snapshot may leave the task state set)."""
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            events = [e for a in self.api.get_instance_actions(server["id"]) if a["action"] == "createImage"
                      for e in self.api.get_instance_action_details(server["id"], a["request_id"])["events"]]
            failed = [e.get("traceback") for e in events if (e.get("result") or "").lower() == "error"]
            self.assertEqual([], failed, "the snapshot failed")
            if self.api.get_server(server["id"])["OS-EXT-STS:task_state"] is None:
                # Glance keeps min_disk and min_ram as integers; the fixture keeps the strings of
                # Nova's snapshot metadata (from system_metadata), which a boot from it cannot compare.
                image = self.glance.show(None, image_id)
                return self.glance.update(None, image_id, {k: int(image.get(k) or 0) for k in ("min_disk", "min_ram")})
            self.assertLess(time.monotonic(), deadline, f"the snapshot of {server['id']} did not end: {events}")
            time.sleep(0.5)

    # ---- cases ---------------------------------------------------------------------------

    def test_servers_are_vms_of_their_hosts_agents(self):
        """A multi-create of SERVERS demo-guest servers: ACTIVE (= the guest serves), each a running
        VM on the agent of its own host, spread over both computes with Placement usage to match;
        deleting them leaves no VM and no usage."""
        servers, active_s = self._boot("many", SERVERS)
        by_host = collections.Counter(s["OS-EXT-SRV-ATTR:host"] for s in servers)
        self.assertEqual(set(HOSTS), set(by_host), "the scheduler put servers on both computes")
        ready = []
        for host in HOSTS:
            vms = self._nova_vms(host)
            mine = {vm_name(s["id"]) for s in servers if s["OS-EXT-SRV-ATTR:host"] == host}
            self.assertEqual(mine, set(vms), f"{host}'s agent runs exactly the VMs of its servers")
            for name in mine:
                vm = vms[name]
                self.assertEqual("running", vm["state"])
                self.assertEqual(FLAVOR_MB, vm["memory_bytes"] // MIB)
                self.assertEqual(name, self._guest_status(vm)["hostname"])
                ready.append(vm["ready_s"])
        for s in servers:
            self.assertEqual(1, s["OS-EXT-STS:power_state"], "RUNNING, from the agent's VM state")
            self.assertEqual(s["OS-EXT-SRV-ATTR:host"], s["OS-EXT-SRV-ATTR:hypervisor_hostname"])
        hypervisors = self.api.api_get("/os-hypervisors/detail").body["hypervisors"]
        self.assertEqual(set(HOSTS), {h["hypervisor_hostname"] for h in hypervisors})
        providers = {host: self._get_provider_uuid_by_host(host) for host in HOSTS}
        for host, rp in providers.items():
            self.assertIn("CUSTOM_VMSTREAM", self._get_provider_traits(rp))
            self.assertEqual(FLAVOR_MB * by_host[host], self._get_provider_usages(rp)["MEMORY_MB"])

        delete_s = self._delete(servers)
        for rp in providers.values():
            self.assertEqual(0, self._get_provider_usages(rp)["MEMORY_MB"])
        record("multi-create", servers=SERVERS, active_s=round(active_s, 2), split=dict(sorted(by_host.items())),
               agent_ready_s=[round(min(ready), 2), round(max(ready), 2)], delete_s=round(delete_s, 2))

    def test_an_image_the_driver_cannot_boot_fails_its_server_and_leaves_no_vm(self):
        """vmstream_guest other than demo, or a disk format the agent does not boot: ERROR with a
        fault that names the fix, tried on one compute only (ImageUnacceptable is not rescheduled)."""
        cases = [(self._add_image("not-a-guest", vmstream_guest="windows"), ("vmstream_guest", "demo")),
                 (self.glance.auto_disk_config_disabled_image["id"], ("vhd", "raw or qcow2"))]  # the fixture's VHD image
        for image, words in cases:
            (server,), _ = self._boot("bad", 1, image=image, expect="ERROR")
            fault = server["fault"]["message"]
            for word in words:
                self.assertIn(word, fault)
            create = [a for a in self.api.get_instance_actions(server["id"]) if a["action"] == "create"]
            events = self.api.get_instance_action_details(server["id"], create[0]["request_id"])["events"]
            builds = [e for e in events if e["event"] == "compute__do_build_and_run_instance"]
            self.assertEqual(1, len(builds), f"one build attempt, no reschedule: {events}")
            self.assertEqual({h: {} for h in HOSTS}, {h: self._nova_vms(h) for h in HOSTS})
            self._delete([server])

    def test_a_snapshot_is_a_live_image_whose_servers_are_clones(self):
        """createImage -> driver.snapshot makes a live image and marks the Glance image with
        vmstream_live_image; servers of that image start as clones of it (parent_image) that
        continued from the snapshot (the guest's counter did not start anew)."""
        why = self._driver_says_not_yet([("snapshot", (uuidutils.generate_uuid(), lambda *a, **kw: None))])
        if why:
            self.skipTest(why)
        (source,), boot_s = self._boot("source", 1)
        host = source["OS-EXT-SRV-ATTR:host"]
        vm = self._nova_vms(host)[vm_name(source["id"])]
        deadline = time.monotonic() + 60
        while (counted := self._guest_status(vm)["counter"]) < 3:  # a cold boot's guest answers with 0 or 1
            self.assertLess(time.monotonic(), deadline, "the source guest's counter does not advance")
            time.sleep(0.5)
        t0 = time.monotonic()
        image_id = self.api.post_server_action(source["id"], {"createImage": {"name": "vmstream-live"}})["image_id"]
        image = self._wait_snapshot(source, image_id)
        snapshot_s = time.monotonic() - t0
        live = image["properties"].get("vmstream_live_image")
        self.assertTrue(live, f"the snapshot's Glance image has no vmstream_live_image: {image['properties']}")
        self.assertIn(live, {i["name"] for i in self.agents[host].call("GET", "/v1/live-images")})
        self.assertEqual("ACTIVE", self.api.get_server(source["id"])["status"])

        clones, clones_s = self._boot("clone", CLONES, image=image_id)
        for c in clones:
            vms = self._nova_vms(c["OS-EXT-SRV-ATTR:host"])
            self.assertIn(vm_name(c["id"]), vms, f"the agent of {c['OS-EXT-SRV-ATTR:host']} runs no VM for the server")
            vm = vms[vm_name(c["id"])]
            self.assertEqual(live, vm["parent_image"], f"{vm['name']} is a clone of the live image")
            status = self._guest_status(vm)
            self.assertEqual(vm["name"], status["hostname"])
            self.assertGreaterEqual(status["counter"], counted, f"{vm['name']} went on from the snapshot: {status}")
        # Placement counts the hosts' RAM as densely as the clones use it (flavor RAM over PSS)
        self._run_periodics()
        ratios = {}
        for h in {c["OS-EXT-SRV-ATTR:host"] for c in clones}:
            ratios[h] = self._get_provider_inventory(self._get_provider_uuid_by_host(h))["MEMORY_MB"]["allocation_ratio"]
            self.assertGreater(ratios[h], 1.0, f"{h} runs clones: its MEMORY_MB ratio should follow their real footprint")
        self._delete([*clones, source])
        record("live-image", cold_boot_s=round(boot_s, 2), snapshot_s=round(snapshot_s, 2), clones=CLONES,
               clones_active_s=round(clones_s, 2), ram_allocation_ratios=ratios,
               split=dict(collections.Counter(c["OS-EXT-SRV-ATTR:host"] for c in clones)))

    def test_live_migration_moves_the_vm_to_the_other_hosts_agent(self):
        """os-migrateLive to the other compute: the migration completes, the VM runs on the other
        agent and no longer on the first, and it is the same guest (its counter went on)."""
        why = self._driver_says_not_yet([
            ("check_can_live_migrate_destination", ({}, {})),
            ("live_migration", (HOSTS[1], lambda *a, **kw: None, lambda *a, **kw: None)),
        ])
        if why:
            self.skipTest(why)
        (server,), _ = self._boot("mover", 1)
        src = server["OS-EXT-SRV-ATTR:host"]
        dst = next(h for h in HOSTS if h != src)
        name = vm_name(server["id"])
        vms = self._nova_vms(src)
        self.assertIn(name, vms, f"the agent of {src} runs no VM for the server")
        before = self._guest_status(vms[name])
        t0 = time.monotonic()
        self.api.post_server_action(server["id"], {"os-migrateLive": {"host": dst, "block_migration": "auto"}})
        deadline = t0 + BOOT_TIMEOUT_S
        while True:
            migrations = [m for m in self.api.api_get("/os-migrations").body["migrations"] if m["instance_uuid"] == server["id"]]
            status = migrations[0]["status"] if migrations else None
            if status == "completed":
                break
            self.assertNotIn(status, ("error", "failed"), f"the live migration failed: {migrations}")
            self.assertLess(time.monotonic(), deadline, f"the live migration did not end: {migrations}")
            time.sleep(0.5)
        migrate_s = time.monotonic() - t0
        server = self._wait_for_server_parameter(server, {"OS-EXT-SRV-ATTR:host": dst, "status": "ACTIVE"})
        self.assertNotIn(name, self._nova_vms(src))
        vms = self._nova_vms(dst)
        self.assertIn(name, vms, f"the agent of {dst} runs no VM for the server")
        vm = vms[name]
        self.assertEqual("running", vm["state"])
        after = self._guest_status(vm)
        self.assertEqual(before["hostname"], after["hostname"])
        self.assertGreaterEqual(after["counter"], before["counter"], "a fresh boot would have started its counter anew")
        self.assertEqual(FLAVOR_MB, self._get_provider_usages(self._get_provider_uuid_by_host(dst))["MEMORY_MB"])
        self._delete([server])
        record("live-migration", migrate_s=round(migrate_s, 2), moved=f"{src}->{dst}")


class TimedResult(unittest.TextTestResult):
    """unittest's verbose result, which also keeps each case's outcome and seconds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cases = []
        self._t0 = 0.0

    def startTest(self, test):
        self._t0 = time.monotonic()
        super().startTest(test)

    def _keep(self, test, outcome, detail=""):
        self.cases.append({"name": getattr(test, "_testMethodName", str(test)), "outcome": outcome,
                           "seconds": round(time.monotonic() - self._t0, 1), "detail": detail[-4000:]})

    def addSuccess(self, test):
        super().addSuccess(test)
        self._keep(test, "ok")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._keep(test, "skipped", reason)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._keep(test, "failure", self.failures[-1][1])

    def addError(self, test, err):
        super().addError(test, err)
        self._keep(test, "error", self.errors[-1][1])


def main():
    """Run every case; each one's outcome and seconds go to VMSTREAM_NOVA_RESULTS (JSON) if set."""
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2, resultclass=TimedResult).run(suite)
    path = os.environ.get("VMSTREAM_NOVA_RESULTS")
    if path:
        with open(path, "w") as f:
            shim = sys.modules.get("nova.virt.vmstream")  # what Nova imported for compute_driver = vmstream.VmstreamDriver
            json.dump({"cases": result.cases, "ran": result.testsRun, "driver": vmstream_driver.__file__,
                       "nova_virt_vmstream": getattr(shim, "__file__", None)}, f, indent=1)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
