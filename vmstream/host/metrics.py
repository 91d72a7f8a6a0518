"""The agent's event metrics (prometheus-client): what happened, counted where it happens.

Figures that are read off the host when asked (VMs by state, memory, memfs's
counters) are not kept here: vmstream.host.observe reads them per scrape. One
AgentMetrics per agent, with a registry of its own, so two agents in one
process (tests) never count into each other.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

# a clone starts in 0.03-0.3 s warm, seconds cold or through a burst
START_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
# a live image's pause: tens of ms for a clone's delta, seconds for a large flatten
PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_STARTS = 500  # clone starts kept for the dashboard's latency chart


@dataclass(frozen=True)
class StartSample:
    at: float  # unix time the clone answered
    seconds: float
    image: str
    vm: str


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.clone_start = Histogram("vmstream_clone_start_seconds", "Clone start latency, request to ready (the first HTTP "
                                     "answer where the guest serves)", ["image"], buckets=START_BUCKETS, registry=r)
        self.clone_phase = Histogram("vmstream_clone_start_phase_seconds", "When each phase of a clone start ended, "
                                     "seconds since the request", ["phase"], buckets=START_BUCKETS, registry=r)
        self.clone_starts = Counter("vmstream_clone_starts", "Clones asked for, by outcome", ["outcome"], registry=r)
        self.boots = Counter("vmstream_boots", "VMs booted (not cloned), by outcome", ["outcome"], registry=r)
        self.image_pause = Histogram("vmstream_live_image_pause_seconds", "How long a VM was paused to make a live image of it",
                                     buckets=PAUSE_BUCKETS, registry=r)
        self.images_created = Counter("vmstream_live_images_created", "Live images made", registry=r)
        self.migrations = Counter("vmstream_migrations", "Migrations from this host that ended, by mode and outcome",
                                  ["mode", "outcome"], registry=r)
        self.migration_bytes = Counter("vmstream_migration_sent_bytes", "Bytes sent by completed migrations", ["mode"], registry=r)
        self.migration_downtime = Histogram("vmstream_migration_downtime_seconds", "A completed migration's downtime",
                                            ["mode"], buckets=DOWNTIME_BUCKETS, registry=r)
        self.migration_duration = Histogram("vmstream_migration_duration_seconds", "A completed migration, request to done",
                                            ["mode"], buckets=START_BUCKETS, registry=r)
        self.api_requests = Counter("vmstream_api_requests", "API requests answered, by method, route and status",
                                    ["method", "route", "status"], registry=r)
        self.api_latency = Histogram("vmstream_api_request_duration_seconds", "API request latency at the agent",
                                     ["method", "route"], buckets=API_BUCKETS, registry=r)
        self.recent_starts: deque[StartSample] = deque(maxlen=RECENT_STARTS)
        self.events = 0  # bumped by each event below: watchers see a change without reading the metrics

    def clone_started(self, image: str, vm: str, seconds: float, phases: dict[str, float]) -> None:
        self.events += 1
        self.clone_start.labels(image).observe(seconds)
        self.clone_starts.labels("ok").inc()
        for phase, at in phases.items():
            if not phase.startswith("guest_") and phase != "identity_in_guest":  # the guest's own breakdown: too many names
                self.clone_phase.labels(phase).observe(at)
        self.recent_starts.append(StartSample(time.time(), seconds, image, vm))

    def clones_failed(self, count: int) -> None:
        self.events += 1
        self.clone_starts.labels("failed").inc(count)

    def image_created(self, pause_ms: float) -> None:
        self.events += 1
        self.images_created.inc()
        self.image_pause.observe(pause_ms / 1000)

    def migration_ended(self, mode: str, outcome: str, sent_bytes: int = 0, downtime_ms: float | None = None,
                        total_s: float | None = None) -> None:
        self.events += 1
        self.migrations.labels(mode, outcome).inc()
        if outcome == "completed":
            self.migration_bytes.labels(mode).inc(sent_bytes)
            if downtime_ms is not None:
                self.migration_downtime.labels(mode).observe(downtime_ms / 1000)
            if total_s is not None:
                self.migration_duration.labels(mode).observe(total_s)
