"""VmstreamDriver: a Nova virt driver that runs servers as VMs of this host's vmstream agent.

An adapter over the agent's REST API (vmstream.agentapi): it starts no QEMU and reads no
host state of its own. Nova loads it as `compute_driver = vmstream.VmstreamDriver` through
the namespace shim (shim.py) and runs it inside nova-compute, under Debian's python3 and
eventlet: the agent client's sockets are green, so a boot that waits for its guest does not
hold up the compute's other work. nova.conf:

    [DEFAULT]
    compute_driver = vmstream.VmstreamDriver
    [vmstream]
    agent_url = http://127.0.0.1:8401
    token_file = /path/to/the/agent's/data/dir/agent.token

Servers: spawn (a cold boot of the demo guest or of a raw/qcow2 image from Glance; a clone
when the Glance image is a live image), destroy, power off/on and reboot (a vmstream VM has no
stopped state: power off destroys the VM, power on boots it anew from its image), get_info.
Live images: snapshot() captures the server into a vmstream live image named after the Glance
image and marks that image (property vmstream_live_image, protected while it is one); servers
of it start as clones. The host: resources for Placement, the live images it holds as a stat
for LiveImageCacheWeigher, pre-warming (cache_image), reaping the live images whose Glance
image was deleted (manage_image_cache). Live migration: the agents' own move (delta for a
clone, QEMU live otherwise) between compute hosts whose agents are each other's peers, named
after the computes. Not supported: pause/suspend (NotImplementedError saying so).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from nova import exception
from nova.compute import power_state as nova_power_state
from nova.compute import task_states, vm_states
from nova.conf import CONF
from nova.image import glance
from nova.objects import migrate_data as nova_migrate_data
from nova.virt import driver, hardware, images
from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log as logging

from vmstream.agentapi import ApiClient
from vmstream.errors import GuestError, InvalidInput, NotFound, VmstreamError
from vmstream.openstack.nova import translate
from vmstream.openstack.nova.service_glance import ServiceGlance

LOG = logging.getLogger(__name__)

OPTS = [
    cfg.StrOpt("agent_url", default="http://127.0.0.1:8400", help="This host's vmstream agent (`vmstream agent --port`)."),
    cfg.StrOpt("token_file", help="The agent's token: agent.token in its data dir (VMSTREAM_HOME)."),
    cfg.FloatOpt("boot_timeout", default=600.0, min=1.0,
                 help="Seconds a cold boot may take until the guest is ready (TCG guests on a busy host are slow)."),
    cfg.FloatOpt("clone_timeout", default=300.0, min=1.0,
                 help="Seconds a clone start may take until the clone answers (the agent's own limits apply first)."),
    cfg.FloatOpt("migration_timeout", default=900.0, min=1.0,
                 help="Seconds a live migration may run before it is cancelled and the server stays on its source."),
    cfg.BoolOpt("lazy_placement_allocations", default=True,
                help="Fetch the host's Placement allocations in a resource claim only if Nova reads them (see "
                     "lazy_allocations in the driver)."),
    cfg.FloatOpt("migration_max_bandwidth_mbps", min=0.1,
                 help="Cap a QEMU live move's stream at this many MB/s (as [libvirt] live_migration_bandwidth); unset: no cap."),
    cfg.FloatOpt("footprint_ram_ratio_max", default=4.0,
                 help="MEMORY_MB's allocation ratio follows how densely the host's VMs use their RAM (flavor RAM over "
                      "PSS), up to this (the paper's 2-4x); <= 1: Nova's ratios as configured. An explicit "
                      "[DEFAULT] ram_allocation_ratio always wins."),
    cfg.DictOpt("agents", default={}, help="Per compute host, host:agent_url|token_file, for several computes in one "
                "process (Nova's functional tests); a host not in it uses agent_url and token_file."),
]
CONF.register_opts(OPTS, group="vmstream")

NOT_YET = "the vmstream Nova driver does not support {what} ({when})"


def lazy_allocations() -> None:
    """Nova 26 (Zed)'s resource tracker asks Placement for the allocations of every server on
    the host in every claim (`get_allocations_for_provider_tree`: one GET per server, inside
    the lock all of a compute's builds queue on), but reads them only when a driver reshapes
    its provider tree or PCI devices are reported to Placement; this driver does neither. In a
    batch of 10 on one host that was ~60 GETs and most of each claim's 0.5-0.8 s. Hand the
    tracker a mapping that fetches on first read instead (`[vmstream]
    lazy_placement_allocations = false` turns this off)."""
    from nova.scheduler.client import report

    original = report.SchedulerReportClient.get_allocations_for_provider_tree
    if getattr(original, "vmstream_lazy", False):
        return

    def lazy(self: Any, context: Any, nodename: str) -> translate.LazyAllocations:
        return translate.LazyAllocations(lambda: original(self, context, nodename))

    lazy.vmstream_lazy = True  # type: ignore[attr-defined]
    report.SchedulerReportClient.get_allocations_for_provider_tree = lazy


def _base_file(image_id: str) -> Path:
    """Where a Glance disk image is kept on this compute (fetched once, booted by many)."""
    return Path(CONF.instances_path) / "_base" / f"vmstream-{image_id}"


class VmstreamDriver(driver.ComputeDriver):  # type: ignore[misc]  # Nova is untyped
    """One nova-compute's driver: its node is its host (CONF.host), its VMs live in one agent."""

    capabilities = {
        **driver.ComputeDriver.capabilities,
        "supports_image_type_raw": True,
        "supports_image_type_qcow2": True,
        "has_imagecache": True,  # manage_image_cache reaps live images whose Glance image is gone
    }

    def __init__(self, virtapi: Any, read_only: bool = False) -> None:
        super().__init__(virtapi)
        self._api: ApiClient | None = None
        self._host = CONF.host  # init_host() gives this compute's own: CONF.host is one per process
        self._last: translate.HostResources | None = None  # the agent's last answer on the host's resources
        self._glance = ServiceGlance()
        self._warned_service_user = False
        if CONF.vmstream.lazy_placement_allocations:
            lazy_allocations()

    # ---- the agent -----------------------------------------------------------------------

    def _agent(self) -> ApiClient:
        if self._api is None:
            conf = CONF.vmstream
            url, token_file = conf.agents[self._host].split("|", 1) if self._host in conf.agents else (conf.agent_url, conf.token_file)
            if not token_file:
                raise InvalidInput("nova.conf [vmstream] token_file is not set: point it at agent.token in the agent's data dir")
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise InvalidInput(f"nova.conf [vmstream] token_file {token_file} cannot be read ({exc.strerror}): "
                                   "start the agent first (it writes the token) or fix the path") from exc
            self._api = ApiClient(url, token, f"the vmstream agent of {self._host}",
                                  token_fix=f"[vmstream] token_file ({token_file}) holds another agent's token")
        return self._api

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._agent().call(method, path, **kwargs)

    def _vm(self, instance: Any) -> dict[str, Any] | None:
        try:
            vm: dict[str, Any] = self._call("GET", f"/v1/vms/{translate.vm_name(instance.uuid)}")
        except NotFound:
            return None
        return vm

    # ---- the host ----------------------------------------------------------------------

    def init_host(self, host: str) -> None:
        """Fail the compute's start at once, with the reason, if its agent cannot be used."""
        self._host = host
        info = self._call("GET", "/v1/info")
        LOG.info("vmstream agent %s: %s, QEMU %s", self._agent().base_url, info.get("accelerator"), info.get("qemu_version"))

    def cleanup_host(self, host: str) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def get_host_ip_addr(self) -> str:
        return str(CONF.my_ip)

    def get_available_nodes(self, refresh: bool = False) -> list[str]:
        # One node per compute service, named after it: two computes on one machine are two
        # resource providers.
        return [self._host]

    def _resources(self) -> translate.HostResources:
        host = self._call("GET", "/v1/host")
        info = self._call("GET", "/v1/info")
        disk = os.statvfs(info["data_dir"])  # the agent's data dir is on this machine: its VMs' overlays go there
        held = translate.held_live_images(self._call("GET", "/v1/live-images"), host.get("memfs", {}).get("images", {}))
        return translate.host_resources(host, os.cpu_count() or 1, disk.f_blocks * disk.f_frsize,
                                        disk.f_bavail * disk.f_frsize, info.get("qemu_version", ""), held)

    def get_available_resource(self, nodename: str) -> dict[str, Any]:
        """The periodic refresh (update_resources_interval): asks the agent, and keeps the answer
        for update_provider_tree."""
        if nodename != self._host:
            return {}
        self._last = self._resources()
        return translate.available_resource(self._last, nodename)

    def update_provider_tree(self, provider_tree: Any, nodename: str, allocations: Any = None) -> None:
        """The inventory: totals, which VMs do not change. Nova calls this in every claim, under
        the lock all of a compute's builds queue on, so it uses the periodic refresh's answer
        (asking the agent three times per claim cost 0.5-1 s per server in a batch of 10)."""
        inv = provider_tree.data(nodename).inventory
        ratios = self._get_allocation_ratios(inv)
        reserved = {"VCPU": CONF.reserved_host_cpus, "MEMORY_MB": CONF.reserved_host_memory_mb,
                    "DISK_GB": self._get_reserved_host_disk_gb_from_config()}
        if self._last is None:
            self._last = self._resources()
        ratios["MEMORY_MB"] = translate.ram_allocation_ratio(CONF.ram_allocation_ratio, CONF.initial_ram_allocation_ratio,
                                                             self._last.memory_density, CONF.vmstream.footprint_ram_ratio_max)
        provider_tree.update_inventory(nodename, translate.inventory(self._last, ratios, reserved))
        provider_tree.add_traits(nodename, "CUSTOM_VMSTREAM")  # `trait:CUSTOM_VMSTREAM=required` picks vmstream hosts

    # ---- the servers ---------------------------------------------------------------------

    def list_instances(self) -> list[str]:
        """The VM names of Nova's servers on this agent (nova-<uuid>)."""
        return [vm["name"] for vm in self._call("GET", "/v1/vms") if translate.instance_uuid(vm["name"])]

    def list_instance_uuids(self) -> list[str]:
        return [u for u in (translate.instance_uuid(vm["name"]) for vm in self._call("GET", "/v1/vms")) if u]

    def instance_exists(self, instance: Any) -> bool:
        return self._vm(instance) is not None

    def get_info(self, instance: Any, use_cache: bool = True) -> hardware.InstanceInfo:
        vm = self._vm(instance)
        if vm is None:
            if instance.vm_state == vm_states.STOPPED:  # powered off: the VM is gone until power on
                return hardware.InstanceInfo(state=nova_power_state.SHUTDOWN)
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        return hardware.InstanceInfo(state=translate.power_state(vm["state"]), internal_id=vm["name"])

    def spawn(self, context: Any, instance: Any, image_meta: Any, injected_files: Any, admin_password: Any,
              allocations: Any, network_info: Any = None, block_device_info: Any = None, power_on: bool = True,
              accel_info: Any = None) -> None:
        """A clone of the live image the server's Glance image stands for, else a cold boot;
        returns when the agent says the guest is ready."""
        live = translate.live_image_of(instance.system_metadata)
        if live is None:
            self._boot(context, instance, image_meta)
            return
        name = translate.vm_name(instance.uuid)
        try:
            body = translate.clone_request(name, instance.flavor.memory_mb, instance.system_metadata,
                                           dict(instance.metadata or {}), instance.user_data, instance.image_ref)
            res = self._call("POST", f"/v1/live-images/{live}/start", json=body, timeout=CONF.vmstream.clone_timeout)
        except (InvalidInput, NotFound, GuestError) as exc:  # the same on every host: no reschedule
            raise exception.ImageUnacceptable(image_id=instance.image_ref, reason=str(exc)) from exc
        except VmstreamError as exc:
            self._destroy_vm(name)
            raise exception.InstanceDeployFailure(reason=str(exc)) from exc
        LOG.info("vmstream clone %s of %s started in %.3fs", name, live, res.get("elapsed_s") or 0.0, instance=instance)

    def _boot(self, context: Any, instance: Any, image_meta: Any = None) -> None:
        image_id = instance.image_ref
        disk_format = None
        if image_meta is not None and image_meta.obj_attr_is_set("disk_format"):
            disk_format = image_meta.disk_format
        elif image_meta is None:  # power on, reboot: the image as the instance recorded it
            disk_format = instance.system_metadata.get("image_disk_format")
        name = translate.vm_name(instance.uuid)
        try:
            source = translate.guest_source(instance.system_metadata, image_id, disk_format)
            disk_path = self._image_file(context, image_id) if source.kind == "disk" else None
            body = translate.boot_request(name, instance.flavor.memory_mb, instance.flavor.vcpus, source, disk_path=disk_path,
                                          user_data_b64=instance.user_data, timeout_s=CONF.vmstream.boot_timeout)
            vm = self._call("POST", "/v1/vms", json=body, timeout=CONF.vmstream.boot_timeout + 30)
        except (InvalidInput, GuestError) as exc:  # the image will not boot anywhere: no reschedule
            raise exception.ImageUnacceptable(image_id=image_id, reason=str(exc)) from exc
        except VmstreamError as exc:
            self._destroy_vm(name)  # a boot the client gave up on may still be running on the agent
            raise exception.InstanceDeployFailure(reason=str(exc)) from exc
        LOG.info("vmstream VM %s ready in %.2fs at %s", name, vm.get("ready_s") or 0.0, vm.get("endpoint"), instance=instance)

    def _image_file(self, context: Any, image_id: str) -> str:
        """The Glance image as a file the agent can boot (it never writes it: each VM runs on
        its own overlay), fetched once per compute into instances_path/_base."""
        path = _base_file(image_id)
        with lockutils.lock(f"vmstream-image-{image_id}"):
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                part = path.with_suffix(".part")
                images.fetch(context, image_id, str(part))
                part.rename(path)
        return str(path)

    def _destroy_vm(self, name: str) -> None:
        try:
            self._call("DELETE", f"/v1/vms/{name}")
        except NotFound:
            pass
        except VmstreamError as exc:
            LOG.warning("vmstream VM %s could not be destroyed: %s", name, exc)
            raise

    def destroy(self, context: Any, instance: Any, network_info: Any, block_device_info: Any = None,
                destroy_disks: bool = True, destroy_secrets: bool = True) -> None:
        """Destroy the VM (its QEMU, run dir and disk overlay); one already gone is fine."""
        self._destroy_vm(translate.vm_name(instance.uuid))

    def cleanup(self, context: Any, instance: Any, network_info: Any, block_device_info: Any = None,
                destroy_disks: bool = True, migrate_data: Any = None, destroy_vifs: bool = True,
                destroy_secrets: bool = True) -> None:
        """Nothing is left after destroy: the agent owns everything a VM had."""

    def power_off(self, instance: Any, timeout: int = 0, retry_interval: int = 0) -> None:
        """A vmstream VM has no stopped state: powering off destroys it (memory and disk overlay)."""
        self._destroy_vm(translate.vm_name(instance.uuid))

    def power_on(self, context: Any, instance: Any, network_info: Any, block_device_info: Any = None,
                 accel_info: Any = None) -> None:
        """As at spawn: a cold boot from the server's image, or a fresh clone of its live image."""
        if self._vm(instance) is None:
            self.spawn(context, instance, None, None, None, None)

    def reboot(self, context: Any, instance: Any, network_info: Any, reboot_type: str, block_device_info: Any = None,
               bad_volumes_callback: Any = None, accel_info: Any = None) -> None:
        """Soft and hard alike: destroy, then start anew as at spawn."""
        self.power_off(instance)
        self.spawn(context, instance, None, None, None, None)

    def plug_vifs(self, instance: Any, network_info: Any) -> None:
        """Servers run with --nic none: the agent's own user networking, nothing to plug."""

    def unplug_vifs(self, instance: Any, network_info: Any) -> None:
        """Nothing was plugged."""

    # ---- live images ------------------------------------------------------------------------

    def snapshot(self, context: Any, instance: Any, image_id: str, update_task_state: Any) -> None:
        """`openstack server image create`: a live image of the running server, named after the
        Glance image Nova made for it; the Glance image gets the live image's identity (its
        memory stays in vmstream's store) and is protected while it is a live image, so it
        cannot be deleted under its clones (`openstack live-image delete` checks, then
        unprotects). On any failure the live image is deleted again; Nova deletes the image."""
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        vm, live = translate.vm_name(instance.uuid), translate.live_image_name(image_id)
        try:
            info = self._call("POST", "/v1/live-images", json={"vm": vm, "name": live}, timeout=CONF.vmstream.clone_timeout)
        except NotFound as exc:
            raise exception.InstanceNotRunning(instance_id=instance.uuid) from exc
        except VmstreamError as exc:
            raise exception.InstanceSnapshotFailure(reason=f"vmstream could not capture {vm}: {exc}") from exc
        update_task_state(task_state=task_states.IMAGE_UPLOADING, expected_state=task_states.IMAGE_PENDING_UPLOAD)
        meta, record = translate.snapshot_image(info, instance.uuid, str(instance.flavor.flavorid), instance.flavor.memory_mb)
        api = glance.API()
        try:
            api.update(context, image_id, meta, data=io.BytesIO(record), purge_props=False)
            api.update(context, image_id, {"protected": True}, purge_props=False)
        except Exception:
            LOG.warning("registering live image %s in Glance failed: deleting it", live, instance=instance)
            try:
                self._call("DELETE", f"/v1/live-images/{live}")
            except VmstreamError as exc:
                LOG.warning("live image %s could not be deleted: %s", live, exc)
            raise
        LOG.info("live image %s of %s: paused %.1f ms, %d bytes stored", live, vm, info.get("pause_ms") or 0.0,
                 info.get("memory_bytes_stored") or 0, instance=instance)

    def cache_image(self, context: Any, image_id: str) -> bool:
        """`openstack aggregate cache image`: a live image's memory is brought onto this host
        (chunk cache, page cache, a pooled clone QEMU); a disk image is fetched as for a boot.
        True if something was fetched now."""
        props = glance.API().get(context, image_id).get("properties", {})
        live = props.get(translate.LIVE_IMAGE_PROPERTY)
        if not live:
            present = _base_file(image_id).exists()
            if props.get(translate.GUEST_PROPERTY) != "demo":
                self._image_file(context, image_id)
            return not present
        warm = self._call("POST", f"/v1/live-images/{live}/warm", timeout=CONF.vmstream.clone_timeout)
        LOG.info("live image %s warmed on %s: %d bytes read in %.2fs", live, self._host, warm["memory_bytes_read"],
                 warm["elapsed_s"])
        return True

    def manage_image_cache(self, context: Any, all_instances: Any) -> None:
        """Delete the live images made through Nova whose Glance image is gone and that no VM
        of this agent runs (Glance refuses to delete a protected image; `openstack live-image
        delete` unprotects it only when no server uses it). A periodic task's context has no
        token and no catalog, so Glance is asked as nova.conf's [service_user]."""
        for image in self._call("GET", "/v1/live-images"):
            image_id = translate.glance_image_id(image["name"])
            if image_id is None or image.get("clones"):
                continue
            try:
                r = self._glance.image(image_id)
            except Exception as exc:  # Glance or Keystone unreachable: try again next pass
                LOG.warning("cannot check Glance image %s: %s", image_id, exc)
                continue
            if r is None:
                if not self._warned_service_user:
                    LOG.warning("nova.conf has no [service_user] credentials: deleted live images are not reaped")
                    self._warned_service_user = True
                return
            if r.status_code != 404:
                continue
            try:
                self._call("DELETE", f"/v1/live-images/{image['name']}")
                LOG.info("deleted live image %s: its Glance image is gone", image["name"])
            except VmstreamError as exc:
                LOG.warning("live image %s could not be deleted: %s", image["name"], exc)

    # ---- live migration ---------------------------------------------------------------------

    def check_can_live_migrate_destination(self, context: Any, instance: Any, src_compute_info: Any, dst_compute_info: Any,
                                           block_migration: bool = False, disk_over_commit: bool = False) -> Any:
        """On the destination: its agent answers. The move itself is the agents' (memory, disk
        overlay and identity go with the VM), so Nova is told storage is shared: it moves nothing."""
        self._call("GET", "/health")
        data = nova_migrate_data.LibvirtLiveMigrateData()  # the base class cannot cross RPC
        data.filename = "vmstream"
        data.image_type = "default"
        data.graphics_listen_addr_vnc = CONF.vnc.server_listen
        data.graphics_listen_addr_spice = CONF.spice.server_listen
        data.serial_listen_addr = None
        data.block_migration = bool(block_migration)
        data.disk_over_commit = bool(disk_over_commit)
        data.disk_available_mb = 0
        data.is_shared_block_storage = True
        data.is_shared_instance_path = True
        return data

    def cleanup_live_migration_destination_check(self, context: Any, dest_check_data: Any) -> None:
        """The check made nothing."""

    def check_can_live_migrate_source(self, context: Any, instance: Any, dest_check_data: Any,
                                      block_device_info: Any = None) -> Any:
        """On the source: the server's VM runs here."""
        vm = self._vm(instance)
        if vm is None or vm["state"] != "running":
            raise exception.MigrationPreCheckError(
                reason=f"{translate.vm_name(instance.uuid)} is {vm['state'] if vm else 'not on this host'}: only a running VM moves")
        return dest_check_data

    def pre_live_migration(self, context: Any, instance: Any, block_device_info: Any, network_info: Any, disk_info: Any,
                           migrate_data: Any) -> Any:
        """The destination's agent prepares itself when the source's agent asks."""
        return migrate_data

    def live_migration(self, context: Any, instance: Any, dest: str, post_method: Any, recover_method: Any,
                       block_migration: bool = False, migrate_data: Any = None) -> None:
        """The source agent moves the VM to its peer named after the destination compute
        (`auto`: a delta move for a clone, QEMU's live move otherwise) and is polled until it
        ends: done -> post_method; failed or cancelled -> the VM still runs here, recover_method."""
        name = translate.vm_name(instance.uuid)
        try:
            self._call("POST", f"/v1/vms/{name}/migrate",
                       json={"to": dest, "mode": "auto", "max_bandwidth_mbps": CONF.vmstream.migration_max_bandwidth_mbps})
            state = self._wait_migration(name, CONF.vmstream.migration_timeout)
        except VmstreamError as exc:
            LOG.error("moving %s to %s failed: %s", name, dest, exc, instance=instance)
            recover_method(context, instance, dest, migrate_data)
            return
        if state["state"] != "completed":
            LOG.error("moving %s to %s %s: %s", name, dest, state["state"], state.get("error"), instance=instance)
            recover_method(context, instance, dest, migrate_data,
                           **({"migration_status": "cancelled"} if state["state"] == "cancelled" else {}))
            return
        post_method(context, instance, dest, block_migration, migrate_data)

    def _wait_migration(self, name: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            state: dict[str, Any] = self._call("GET", f"/v1/vms/{name}/migration")
            if state["state"] in ("completed", "failed", "cancelled"):
                return state
            if time.monotonic() > deadline:
                LOG.error("moving %s took over %.0fs: cancelling it", name, timeout_s)
                self._call("DELETE", f"/v1/vms/{name}/migration")
                deadline = float("inf")
            time.sleep(0.2)  # a green sleep inside nova-compute

    def live_migration_abort(self, instance: Any) -> None:
        self._call("DELETE", f"/v1/vms/{translate.vm_name(instance.uuid)}/migration")

    def post_live_migration(self, context: Any, instance: Any, block_device_info: Any, migrate_data: Any = None) -> None:
        """The source agent removed the VM when the move completed."""

    def post_live_migration_at_source(self, context: Any, instance: Any, network_info: Any) -> None:
        """Nothing was plugged."""

    def post_live_migration_at_destination(self, context: Any, instance: Any, network_info: Any,
                                           block_migration: bool = False, block_device_info: Any = None) -> None:
        """The VM already runs on this host's agent."""

    def rollback_live_migration_at_destination(self, context: Any, instance: Any, network_info: Any, block_device_info: Any,
                                               destroy_disks: bool = True, migrate_data: Any = None) -> None:
        """A move that failed leaves nothing here: the destination agent drops its incoming VM
        when the source gives up. Check, and remove one that is still only incoming."""
        vm = self._vm(instance)
        if vm is not None and vm["state"] == "incoming":
            self._destroy_vm(vm["name"])

    def get_instance_disk_info(self, instance: Any, block_device_info: Any = None) -> str:
        return "[]"  # no disks for Nova to move: the agents move the overlay with the VM

    # ---- pause ---------------------------------------------------------------------------------

    def pause(self, instance: Any) -> None:
        """The VM's vCPUs stop; memory, devices and connections stay (the agent's pause)."""
        self._call("POST", f"/v1/vms/{translate.vm_name(instance.uuid)}/pause")

    def unpause(self, instance: Any) -> None:
        self._call("POST", f"/v1/vms/{translate.vm_name(instance.uuid)}/unpause")

    # ---- not supported ------------------------------------------------------------------------

    def suspend(self, context: Any, instance: Any) -> None:
        raise NotImplementedError(NOT_YET.format(what="suspend", when="the agent has no suspend operation"))

    def resume(self, context: Any, instance: Any, network_info: Any, block_device_info: Any = None) -> None:
        raise NotImplementedError(NOT_YET.format(what="resume", when="the agent has no suspend operation"))
