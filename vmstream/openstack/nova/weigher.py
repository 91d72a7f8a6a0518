"""LiveImageCacheWeigher: Nova's scheduler prefers hosts that already hold a server's image.

A clone of a live image starts fastest, and costs the store nothing, on a host whose page
cache or chunk cache already holds the image's memory. Placement has no "preferred" traits,
so this is a weigher (nova.conf):

    [filter_scheduler]
    weight_classes = nova.scheduler.weights.all_weighers,vmstream.openstack.nova.weigher.LiveImageCacheWeigher
    [vmstream]
    cache_weight_multiplier = 10.0

It runs inside nova-scheduler (the namespace shim's directory on its PYTHONPATH) and reads
what the scheduler has: the host's instances (kept fresh by the computes as servers start
and go) and the compute node's stats that VmstreamDriver reports (translate.HELD_STAT,
vmstream_mem_available_mb), refreshed with the resource tracker. Whether the request's image
is a live image at all it asks Glance, once per image, as nova.conf's [service_user]: other
images (cold boots) weigh nothing, so Nova's own weighers spread them.
"""

from __future__ import annotations

from typing import Any

from nova.conf import CONF
from nova.scheduler import utils, weights
from oslo_config import cfg
from oslo_log import log as logging

from vmstream.openstack.nova import translate
from vmstream.openstack.nova.service_glance import ServiceGlance

CONF.register_opts([
    cfg.FloatOpt("cache_weight_multiplier", default=10.0,
                 help="How much holding a server's image counts against other weighers (RAMWeigher's is 1.0)."),
], group="vmstream")


LOG = logging.getLogger(__name__)


def _image_id(spec_obj: Any) -> str | None:
    image = spec_obj.image if spec_obj.obj_attr_is_set("image") else None
    return str(image.id) if image is not None and image.obj_attr_is_set("id") else None


class LiveImageCacheWeigher(weights.BaseHostWeigher):  # type: ignore[misc]  # Nova is untyped
    minval = 0

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[str, bool] = {}  # Glance image id -> is it a live image (a property set once, at its making)
        self._glance = ServiceGlance()
        self._image: str | None = None  # this request's image, if a live image

    def weight_multiplier(self, host_state: Any) -> float:
        return float(utils.get_weight_multiplier(host_state, "vmstream_cache_weight_multiplier",
                                                 CONF.vmstream.cache_weight_multiplier))

    def weigh_objects(self, weighed_obj_list: Any, spec_obj: Any) -> Any:
        """Once per request: only a live image's clones gain from its memory on a host (cold
        boots of one image share nothing), so other images weigh nothing here."""
        self._image = _image_id(spec_obj)
        if self._image is not None and not self._is_live(self._image):
            self._image = None
        return super().weigh_objects(weighed_obj_list, spec_obj)

    def _is_live(self, image_id: str) -> bool:
        """Whether Glance marks the image as a live image (custom properties do not reach the
        scheduler's RequestSpec), asked once per image as nova.conf's [service_user]."""
        if image_id not in self._live:
            try:
                r = self._glance.image(image_id)
            except Exception as exc:  # Glance unreachable: no preference this time, ask again next time
                LOG.warning("cannot ask Glance about image %s: %s", image_id, exc)
                return False
            if r is None or r.status_code != 200:  # no [service_user], or no such image
                return False
            self._live[image_id] = bool(r.json().get(translate.LIVE_IMAGE_PROPERTY))
        return self._live[image_id]

    def _weigh_object(self, host_state: Any, spec_obj: Any) -> float:
        image_id = self._image
        stats = host_state.stats or {}
        available = stats.get("vmstream_mem_available_mb")
        spare = int(host_state.free_ram_mb)
        if available is not None and str(available).isdigit():
            spare = min(spare, int(available))
        # a multi-create in a server group adds stubs (a uuid only) for the servers it placed so far
        running = [inst.image_ref for inst in (host_state.instances or {}).values() if inst.obj_attr_is_set("image_ref")]
        return translate.cache_weight(image_id, str(stats.get(translate.HELD_STAT, "")), running, spare,
                                      int(spec_obj.memory_mb))
