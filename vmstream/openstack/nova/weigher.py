"""LiveImageCacheWeigher: Nova's scheduler prefers hosts that already hold a server's image.

A clone of a live image starts fastest, and costs the store nothing, on a host whose page
cache or chunk cache already holds the image's memory. Placement has no "preferred" traits,
so this is a weigher (nova.conf):

    [filter_scheduler]
    weight_classes = nova.scheduler.weights.all_weighers,vmstream.openstack.nova.weigher.LiveImageCacheWeigher
    [vmstream]
    cache_weight_multiplier = 10.0

It runs inside nova-scheduler (the namespace shim's directory on its PYTHONPATH) and reads
only what the scheduler has: the host's instances (kept fresh by the computes as servers
start and go) and the compute node's stats that VmstreamDriver reports
(translate.HELD_STAT, vmstream_mem_available_mb), refreshed with the resource tracker.
"""

from __future__ import annotations

from typing import Any

from nova.conf import CONF
from nova.scheduler import utils, weights
from oslo_config import cfg

from vmstream.openstack.nova import translate

CONF.register_opts([
    cfg.FloatOpt("cache_weight_multiplier", default=10.0,
                 help="How much holding a server's image counts against other weighers (RAMWeigher's is 1.0)."),
], group="vmstream")


class LiveImageCacheWeigher(weights.BaseHostWeigher):  # type: ignore[misc]  # Nova is untyped
    minval = 0

    def weight_multiplier(self, host_state: Any) -> float:
        return float(utils.get_weight_multiplier(host_state, "vmstream_cache_weight_multiplier",
                                                 CONF.vmstream.cache_weight_multiplier))

    def _weigh_object(self, host_state: Any, spec_obj: Any) -> float:
        image = spec_obj.image if spec_obj.obj_attr_is_set("image") else None
        image_id = image.id if image is not None and image.obj_attr_is_set("id") else None
        stats = host_state.stats or {}
        available = stats.get("vmstream_mem_available_mb")
        spare = int(host_state.free_ram_mb)
        if available is not None and str(available).isdigit():
            spare = min(spare, int(available))
        running = [inst.image_ref for inst in (host_state.instances or {}).values()]
        return translate.cache_weight(image_id, str(stats.get(translate.HELD_STAT, "")), running, spare,
                                      int(spec_obj.memory_mb))
