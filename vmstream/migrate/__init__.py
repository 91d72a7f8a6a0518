"""Moving a running VM between hosts: QEMU live migration (pre-copy, post-copy
when it does not converge) and delta migration for image-backed clones.

The host agent (vmstream/host/migration.py) splits each move between two
agents: the destination prepares (prepare_live_target / DeltaTarget), the
source sends (migrate_live / migrate_delta) and talks to the destination
through a Target. LoadClient is the client the migration bench and tests
keep talking to a moving VM with.
"""

from vmstream.migrate.client import ClientStats, LoadClient
from vmstream.migrate.delta import DeltaTarget, migrate_delta
from vmstream.migrate.live import LiveOptions, migrate_live, prepare_live_target
from vmstream.migrate.target import IncomingSpec, LocalTarget, live_target_spec
from vmstream.migrate.types import MigrationCancelled, MigrationError, MigrationResult, NetworkSwitch, NoSwitch, Progress, Target

__all__ = [
    "ClientStats", "DeltaTarget", "IncomingSpec", "LiveOptions", "LoadClient", "LocalTarget", "MigrationCancelled",
    "MigrationError", "MigrationResult", "NetworkSwitch", "NoSwitch", "Progress", "Target", "live_target_spec",
    "migrate_delta", "migrate_live", "prepare_live_target",
]
