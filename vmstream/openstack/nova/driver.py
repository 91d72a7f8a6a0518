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

Done: spawn (cold boot of the demo guest or of a raw/qcow2 image from Glance), destroy,
power off/on and reboot (a vmstream VM has no stopped state: power off destroys the VM,
power on boots it anew from its image), get_info, resources for Placement. Not yet:
snapshot (live images in Glance), live migration, pause/suspend: they raise
NotImplementedError saying so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nova import exception
from nova.compute import power_state as nova_power_state
from nova.compute import vm_states
from nova.conf import CONF
from nova.virt import driver, hardware, images
from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log as logging

from vmstream.agentapi import ApiClient
from vmstream.errors import GuestError, InvalidInput, NotFound, VmstreamError
from vmstream.openstack.nova import translate

LOG = logging.getLogger(__name__)

OPTS = [
    cfg.StrOpt("agent_url", default="http://127.0.0.1:8400", help="This host's vmstream agent (`vmstream agent --port`)."),
    cfg.StrOpt("token_file", help="The agent's token: agent.token in its data dir (VMSTREAM_HOME)."),
    cfg.FloatOpt("boot_timeout", default=600.0, min=1.0,
                 help="Seconds a cold boot may take until the guest is ready (TCG guests on a busy host are slow)."),
    cfg.DictOpt("agents", default={}, help="Per compute host, host:agent_url|token_file, for several computes in one "
                "process (Nova's functional tests); a host not in it uses agent_url and token_file."),
]
CONF.register_opts(OPTS, group="vmstream")

NOT_YET = "the vmstream Nova driver does not support {what} yet (issue #16: {when})"


class VmstreamDriver(driver.ComputeDriver):  # type: ignore[misc]  # Nova is untyped
    """One nova-compute's driver: its node is its host (CONF.host), its VMs live in one agent."""

    capabilities = {
        **driver.ComputeDriver.capabilities,
        "supports_image_type_raw": True,
        "supports_image_type_qcow2": True,
    }

    def __init__(self, virtapi: Any, read_only: bool = False) -> None:
        super().__init__(virtapi)
        self._api: ApiClient | None = None
        self._host = CONF.host  # init_host() gives this compute's own: CONF.host is one per process

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
        return translate.host_resources(host, os.cpu_count() or 1, disk.f_blocks * disk.f_frsize,
                                        disk.f_bavail * disk.f_frsize, info.get("qemu_version", ""))

    def get_available_resource(self, nodename: str) -> dict[str, Any]:
        if nodename != self._host:
            return {}
        return translate.available_resource(self._resources(), nodename)

    def update_provider_tree(self, provider_tree: Any, nodename: str, allocations: Any = None) -> None:
        inv = provider_tree.data(nodename).inventory
        ratios = self._get_allocation_ratios(inv)
        reserved = {"VCPU": CONF.reserved_host_cpus, "MEMORY_MB": CONF.reserved_host_memory_mb,
                    "DISK_GB": self._get_reserved_host_disk_gb_from_config()}
        provider_tree.update_inventory(nodename, translate.inventory(self._resources(), ratios, reserved))
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
        """Cold-boot the server's VM; returns when the agent says the guest is ready."""
        self._boot(context, instance, image_meta)

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
        base = Path(CONF.instances_path) / "_base"
        path = base / f"vmstream-{image_id}"
        with lockutils.lock(f"vmstream-image-{image_id}"):
            if not path.exists():
                base.mkdir(parents=True, exist_ok=True)
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
        """A cold boot from the server's image, as at spawn."""
        if self._vm(instance) is None:
            self._boot(context, instance)

    def reboot(self, context: Any, instance: Any, network_info: Any, reboot_type: str, block_device_info: Any = None,
               bad_volumes_callback: Any = None, accel_info: Any = None) -> None:
        """Soft and hard alike: destroy, then boot anew."""
        self.power_off(instance)
        self._boot(context, instance)

    def plug_vifs(self, instance: Any, network_info: Any) -> None:
        """Servers run with --nic none: the agent's own user networking, nothing to plug."""

    def unplug_vifs(self, instance: Any, network_info: Any) -> None:
        """Nothing was plugged."""

    # ---- not yet ---------------------------------------------------------------------------

    def snapshot(self, context: Any, instance: Any, image_id: str, update_task_state: Any) -> None:
        raise NotImplementedError(NOT_YET.format(what="snapshots", when="live images in Glance come next"))

    def pause(self, instance: Any) -> None:
        raise NotImplementedError(NOT_YET.format(what="pause", when="the agent has no pause operation"))

    def unpause(self, instance: Any) -> None:
        raise NotImplementedError(NOT_YET.format(what="unpause", when="the agent has no pause operation"))

    def suspend(self, context: Any, instance: Any) -> None:
        raise NotImplementedError(NOT_YET.format(what="suspend", when="the agent has no suspend operation"))

    def resume(self, context: Any, instance: Any, network_info: Any, block_device_info: Any = None) -> None:
        raise NotImplementedError(NOT_YET.format(what="resume", when="the agent has no suspend operation"))

    def check_can_live_migrate_destination(self, context: Any, instance: Any, src_compute_info: Any, dst_compute_info: Any,
                                           block_migration: bool = False, disk_over_commit: bool = False) -> None:
        raise exception.MigrationPreCheckError(
            reason=NOT_YET.format(what="live migration", when="vmstream's delta and QEMU live moves come next"))
