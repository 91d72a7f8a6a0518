"""Moving a running VM between hosts: QEMU live migration (pre-copy, post-copy
when it does not converge) and delta migration for image-backed clones."""

from vmstream.migrate.api import Destination, choose_mode, migrate
from vmstream.migrate.client import ClientStats, LoadClient
from vmstream.migrate.delta import DeltaTarget, migrate_delta
from vmstream.migrate.live import LiveOptions, migrate_live, prepare_live_target
from vmstream.migrate.target import IncomingSpec, LocalTarget, live_target_spec
from vmstream.migrate.types import MigrationCancelled, MigrationError, MigrationResult, NetworkSwitch, NoSwitch, Progress, Target

__all__ = [
    "ClientStats", "DeltaTarget", "Destination", "IncomingSpec", "LiveOptions", "LoadClient", "LocalTarget", "MigrationCancelled",
    "MigrationError", "MigrationResult", "NetworkSwitch", "NoSwitch", "Progress", "Target", "choose_mode", "live_target_spec",
    "migrate", "migrate_delta", "migrate_live", "prepare_live_target",
]
