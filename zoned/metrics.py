"""zoned's Prometheus metrics: what is counted, the samples, their rendering, libvirt's stats.

prometheus-client is the model and the text format; the values come from
a :class:`Snapshot` the daemon assembles at scrape time (``zoned.monitor``)
from its own state, the counters of :class:`Telemetry` and the libvirt
statistics of :class:`StatsCache`. Rendering is plain CPU work on an
immutable snapshot (it runs on a worker thread) and costs O(zones).

Rules:

- Every per-zone series carries the labels of :data:`ZONE_LABELS`; one the
  zone does not have (no pool, no owner) is the empty string,
  which Prometheus treats as no label at all. ``zoned_zone_info`` adds the
  zone's uuid, machine, accelerator and guest kernel.
- The host's view and the guest's self-report have different names: the
  guest's are ``zoned_zone_guest_*``. The guest is untrusted; where the two
  disagree (its memory, its processes), the host's view is the truth and
  the difference is worth an alert.
- A zone's series exist while the zone does: a destroyed zone's disappear
  (its last state, ``stopped``, is seen by a scrape that comes before).
- Warm pools (``zoned_pool_*``, label ``pool``): each pool's target size,
  its zones by state (ready, booting), hits, misses, refill failures and
  the time an acquire took (a summary: count and sum). A zone's ``pool``
  label is the pool it waits in or was taken from.
- Network series (``zoned_zone_network_*``) exist for zones with a network:
  the counters of its helper (:class:`zoned.net.accounting.NetCounters`,
  at most a second old) plus the UDP our table forwarded; a zone without
  network has none.
- libvirt's statistics are sampled for every running zone in one call
  (``virConnectGetAllDomainStats``) on a worker thread behind the daemon's
  libvirt limiter, at most every ``max_age_s``; a scrape waits for a
  refresh at most ``wait_s`` and is otherwise served the last sample (its
  age is ``zoned_zone_stats_age_seconds``): a slow libvirt never stalls a
  scrape.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, get_args

import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from zoned import __version__
from zoned.net.accounting import NetCounters
from zoned.protocol import GuestMetrics, PoolInfo, ZoneState
from zoned.virt import BulkDomainStats

log = logging.getLogger(__name__)

#: The exposition format's content type (the classic text format, 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
#: Labels of every per-zone series.
ZONE_LABELS: Final = ("zone", "profile", "image", "pool", "owner_uid")
_STATES: Final[tuple[ZoneState, ...]] = get_args(ZoneState)


# --------------------------------------------------------------------------
# Counters the daemon keeps
# --------------------------------------------------------------------------


@dataclass
class ZoneCounters:
    """One zone's process counts, from the daemon's view of its requests."""

    execs_started: int = 0
    #: Could not start (126/127), or ended without a status (its zone went).
    execs_failed: int = 0
    #: Ended by the OOM killer (the agent's report).
    execs_oom_killed: int = 0


@dataclass
class Telemetry:
    """What the daemon counts as it goes; plain numbers, sync, never blocking."""

    #: (request type, result: "ok" or the error code)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    creates: Counter[str] = field(default_factory=Counter)
    destroys: Counter[str] = field(default_factory=Counter)
    #: Zones that failed, by the lifecycle input that failed them.
    failures: Counter[str] = field(default_factory=Counter)
    agent_violations: int = 0
    quarantines: Counter[str] = field(default_factory=Counter)
    #: Per zone, by uuid; forgotten with the zone.
    zones: dict[str, ZoneCounters] = field(default_factory=dict)

    def zone(self, uuid: str) -> ZoneCounters:
        counters = self.zones.get(uuid)
        if counters is None:
            counters = self.zones[uuid] = ZoneCounters()
        return counters

    def forget_zone(self, uuid: str) -> None:
        self.zones.pop(uuid, None)


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneSample:
    """One zone at scrape time."""

    name: str
    uuid: str
    state: ZoneState
    profile: str
    vcpus: int
    memory_mib: int
    machine: str
    accelerator: str
    created_at: float
    image: str = ""
    pool: str = ""
    owner_uid: int | None = None
    kernel_release: str = ""
    ready_at: float | None = None
    guest_boot_s: float | None = None
    #: libvirt's view (None: no sample, the domain does not run).
    host: BulkDomainStats | None = None
    host_sampled_at: float | None = None
    #: The agent's last report and when it came (host time).
    guest: GuestMetrics | None = None
    heartbeat_at: float | None = None
    execs_running: int = 0
    counters: ZoneCounters = field(default_factory=ZoneCounters)
    net: NetCounters | None = None

    def labels(self) -> list[str]:
        owner = "" if self.owner_uid is None else str(self.owner_uid)
        return [self.name, self.profile, self.image, self.pool, owner]


@dataclass(frozen=True)
class HostSample:
    """The host at scrape time."""

    cpus_online: int
    cpus_reserved: int
    cpus_free_exclusive: int
    cpus_shared_pool: int
    memory_total_mib: int
    memory_reserved_mib: int
    memory_free_mib: int
    started_at: float
    accelerator: str
    audit_written: int = 0
    audit_dropped: int = 0
    audit_write_errors: int = 0
    journal: bool = False
    stats_refreshes: int = 0
    stats_failures: int = 0
    stats_refresh_seconds: float | None = None


@dataclass(frozen=True)
class Snapshot:
    now: float
    host: HostSample
    zones: Sequence[ZoneSample]
    telemetry: Telemetry
    pools: Sequence[PoolInfo] = ()


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


_G, _C = "gauge", "counter"
_HOST, _EGRESS, _GUEST = "Host view", "Host view (zoned's egress)", "Guest's report"

#: The per-zone families: key, type, name, help, labels beyond ZONE_LABELS.
_PER_ZONE: Final[tuple[tuple[str, str, str, str, tuple[str, ...]], ...]] = (
    (
        "info",
        _G,
        "zoned_zone_info",
        "A zone that exists (value 1), with what it is",
        ("uuid", "machine", "accelerator", "kernel_release"),
    ),
    (
        "state",
        _G,
        "zoned_zone_state",
        "The zone's lifecycle state (1 for the current one)",
        ("state",),
    ),
    ("vcpus", _G, "zoned_zone_vcpus", "vCPUs the zone was given", ()),
    ("memory", _G, "zoned_zone_memory_bytes", "Guest RAM the zone was given", ()),
    ("created", _G, "zoned_zone_created_timestamp_seconds", "When it was created (Unix time)", ()),
    ("boot", _G, "zoned_zone_boot_seconds", f"{_HOST}: creation to the agent's first hello", ()),
    ("cpu", _C, "zoned_zone_cpu_seconds", f"{_HOST} (libvirt): CPU time of its QEMU", ()),
    (
        "rss",
        _G,
        "zoned_zone_host_resident_memory_bytes",
        f"{_HOST} (libvirt): resident memory of its QEMU",
        (),
    ),
    (
        "stats_age",
        _G,
        "zoned_zone_stats_age_seconds",
        "Age of the libvirt sample the host view comes from",
        (),
    ),
    (
        "block_read",
        _C,
        "zoned_zone_block_read_bytes",
        f"{_HOST} (libvirt): bytes read from disks",
        (),
    ),
    (
        "block_write",
        _C,
        "zoned_zone_block_write_bytes",
        f"{_HOST} (libvirt): bytes written to its disks",
        (),
    ),
    (
        "block_read_reqs",
        _C,
        "zoned_zone_block_read_requests",
        f"{_HOST} (libvirt): read requests of its disks",
        (),
    ),
    (
        "block_write_reqs",
        _C,
        "zoned_zone_block_write_requests",
        f"{_HOST} (libvirt): write requests of its disks",
        (),
    ),
    (
        "if_rx",
        _C,
        "zoned_zone_interface_receive_bytes",
        f"{_HOST} (libvirt): bytes its network interfaces received",
        (),
    ),
    (
        "if_tx",
        _C,
        "zoned_zone_interface_transmit_bytes",
        f"{_HOST} (libvirt): bytes its network interfaces sent",
        (),
    ),
    ("net_out", _C, "zoned_zone_network_transmit_bytes", f"{_EGRESS}: bytes it sent out", ()),
    ("net_in", _C, "zoned_zone_network_receive_bytes", f"{_EGRESS}: bytes it received", ()),
    (
        "net_connections",
        _C,
        "zoned_zone_network_connections",
        f"{_EGRESS}: connections by result",
        ("result",),
    ),
    ("net_active", _G, "zoned_zone_network_connections_active", f"{_EGRESS}: connections open", ()),
    (
        "dns",
        _C,
        "zoned_zone_dns_queries",
        "Host view (zoned's resolver): DNS queries by result",
        ("result",),
    ),
    (
        "net_suppressed",
        _C,
        "zoned_zone_network_refused_events_suppressed",
        "Refused-connection events not published (over their rate limit)",
        (),
    ),
    (
        "execs_running",
        _G,
        "zoned_zone_execs_running",
        f"{_HOST}: processes it runs for clients now",
        (),
    ),
    (
        "execs_started",
        _C,
        "zoned_zone_execs_started",
        f"{_HOST}: processes started for clients",
        (),
    ),
    (
        "execs_failed",
        _C,
        "zoned_zone_execs_failed",
        f"{_HOST}: processes that could not start, or whose end is unknown",
        (),
    ),
    (
        "execs_oom",
        _C,
        "zoned_zone_execs_oom_killed",
        "Processes its OOM killer ended (the agent's report)",
        (),
    ),
    (
        "heartbeat_age",
        _G,
        "zoned_zone_agent_heartbeat_age_seconds",
        f"{_HOST}: time since the agent last answered a heartbeat",
        (),
    ),
    ("guest_mem_total", _G, "zoned_zone_guest_memory_total_bytes", f"{_GUEST}: its MemTotal", ()),
    (
        "guest_mem_available",
        _G,
        "zoned_zone_guest_memory_available_bytes",
        f"{_GUEST}: its MemAvailable",
        (),
    ),
    ("guest_processes", _G, "zoned_zone_guest_processes", f"{_GUEST}: processes in the zone", ()),
    ("guest_load", _G, "zoned_zone_guest_load1", f"{_GUEST}: 1-minute load", ()),
    (
        "guest_uptime",
        _G,
        "zoned_zone_guest_uptime_seconds",
        f"{_GUEST}: time since its kernel started",
        (),
    ),
    (
        "guest_boot",
        _G,
        "zoned_zone_guest_boot_seconds",
        f"{_GUEST}: its kernel's start to the agent's hello",
        (),
    ),
)


class _PerZone:
    """The per-zone families, filled zone by zone."""

    def __init__(self) -> None:
        self.f: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            key: (_gauge if kind == _G else _counter)(name, doc, [*ZONE_LABELS, *extra])
            for key, kind, name, doc, extra in _PER_ZONE
        }

    def put(self, key: str, labels: list[str], value: float | None) -> None:
        if value is not None:
            self.f[key].add_metric(labels, value)

    def add(self, zone: ZoneSample, now: float) -> None:
        labels, put = zone.labels(), self.put
        put("info", [*labels, zone.uuid, zone.machine, zone.accelerator, zone.kernel_release], 1)
        for state in _STATES:
            put("state", [*labels, state], 1 if state == zone.state else 0)
        put("vcpus", labels, zone.vcpus)
        put("memory", labels, zone.memory_mib * 1024 * 1024)
        put("created", labels, zone.created_at)
        if zone.ready_at is not None:
            put("boot", labels, max(0.0, zone.ready_at - zone.created_at))
        self._add_host(zone, labels, now)
        self._add_net(zone.net, labels)
        counters = zone.counters
        put("execs_running", labels, zone.execs_running)
        put("execs_started", labels, counters.execs_started)
        put("execs_failed", labels, counters.execs_failed)
        put("execs_oom", labels, counters.execs_oom_killed)
        if zone.heartbeat_at is not None:
            put("heartbeat_age", labels, max(0.0, now - zone.heartbeat_at))
        put("guest_boot", labels, zone.guest_boot_s)
        guest = zone.guest
        if guest is not None:
            put("guest_mem_total", labels, guest.mem_total_kib * 1024)
            put("guest_mem_available", labels, guest.mem_available_kib * 1024)
            put("guest_processes", labels, guest.processes)
            put("guest_load", labels, guest.load1)
            put("guest_uptime", labels, guest.uptime_s)

    def _add_host(self, zone: ZoneSample, labels: list[str], now: float) -> None:
        stats = zone.host
        if stats is None:
            return
        if zone.host_sampled_at is not None:
            self.put("stats_age", labels, max(0.0, now - zone.host_sampled_at))
        for key, value in (
            ("cpu", None if stats.cpu_time_ns is None else stats.cpu_time_ns / 1e9),
            ("rss", None if stats.rss_kib is None else stats.rss_kib * 1024),
            ("block_read", stats.block_read_bytes),
            ("block_write", stats.block_write_bytes),
            ("block_read_reqs", stats.block_read_requests),
            ("block_write_reqs", stats.block_write_requests),
            ("if_rx", stats.interface_receive_bytes),
            ("if_tx", stats.interface_transmit_bytes),
        ):
            self.put(key, labels, value)

    def _add_net(self, net: NetCounters | None, labels: list[str]) -> None:
        if net is None:
            return
        put = self.put
        put("net_out", labels, net.bytes_out)
        put("net_in", labels, net.bytes_in)
        put("net_connections", [*labels, "allowed"], net.connections_allowed)
        put("net_connections", [*labels, "refused"], net.connections_refused)
        put("net_active", labels, net.connections_active)
        for result, value in (
            ("answered", net.dns_answered),
            ("refused", net.dns_refused),
            ("dropped", net.dns_dropped),
        ):
            put("dns", [*labels, result], value)
        put("net_suppressed", labels, net.events_suppressed)

    def families(self) -> Iterator[Metric]:
        yield from self.f.values()


def _host_families(snapshot: Snapshot) -> Iterator[Metric]:
    host, telemetry = snapshot.host, snapshot.telemetry
    build = _gauge("zoned_build_info", "zoned's version (value 1)", ["version", "accelerator"])
    build.add_metric([__version__, host.accelerator], 1)
    yield build
    started = _gauge("zoned_start_time_seconds", "When the daemon started (Unix time)")
    started.add_metric([], host.started_at)
    yield started
    by_state = _gauge("zoned_zones", "Zones by lifecycle state", ["state"])
    counts = Counter(zone.state for zone in snapshot.zones)
    for state in _STATES:
        by_state.add_metric([state], counts.get(state, 0))
    yield by_state
    cpus = _gauge("zoned_host_cpus", "Host CPUs by use", ["kind"])
    for kind, value in (
        ("online", host.cpus_online),
        ("reserved", host.cpus_reserved),
        ("free_exclusive", host.cpus_free_exclusive),
        ("shared_pool", host.cpus_shared_pool),
    ):
        cpus.add_metric([kind], value)
    yield cpus
    memory = _gauge("zoned_host_memory_bytes", "Host memory for zones, by use", ["kind"])
    mib = 1024 * 1024
    for kind, value in (
        ("total", host.memory_total_mib),
        ("reserved", host.memory_reserved_mib),
        ("free", host.memory_free_mib),
    ):
        memory.add_metric([kind], value * mib)
    yield memory
    yield _counted(
        "zoned_zone_creates",
        "Zone creations by result (ok or the error code)",
        "result",
        telemetry.creates,
    )
    yield _counted(
        "zoned_zone_destroys",
        "Zone destructions by result (ok or the error code)",
        "result",
        telemetry.destroys,
    )
    yield _counted(
        "zoned_zone_failures",
        "Zones that failed, by cause (the lifecycle input)",
        "cause",
        telemetry.failures,
    )
    yield _counted(
        "zoned_zone_quarantines",
        "Quarantines by result (ok, partial or the error code)",
        "result",
        telemetry.quarantines,
    )
    requests = _counter(
        "zoned_requests", "Control-socket requests by type and result", ["op", "result"]
    )
    for (op, result), value in sorted(telemetry.requests.items()):
        requests.add_metric([op, result], value)
    yield requests
    violations = _counter(
        "zoned_agent_violations", "Times a zone's agent broke the agent protocol (host view)"
    )
    violations.add_metric([], telemetry.agent_violations)
    yield violations
    for name, doc, value in (
        ("zoned_audit_records", "Audit records written", host.audit_written),
        (
            "zoned_audit_dropped",
            "Audit records dropped (the disk lagged too far)",
            host.audit_dropped,
        ),
        ("zoned_audit_write_errors", "Audit trail writes that failed", host.audit_write_errors),
        ("zoned_libvirt_stats_refreshes", "libvirt statistics samples taken", host.stats_refreshes),
        (
            "zoned_libvirt_stats_failures",
            "libvirt statistics samples that failed",
            host.stats_failures,
        ),
    ):
        family = _counter(name, doc)
        family.add_metric([], value)
        yield family
    journal = _gauge("zoned_audit_journal", "Whether audit records also go to the journal")
    journal.add_metric([], 1 if host.journal else 0)
    yield journal
    if host.stats_refresh_seconds is not None:
        refresh = _gauge(
            "zoned_libvirt_stats_refresh_seconds", "How long the last libvirt sample took"
        )
        refresh.add_metric([], host.stats_refresh_seconds)
        yield refresh


def _pool_families(pools: Sequence[PoolInfo]) -> Iterator[Metric]:
    size = _gauge("zoned_pool_size", "A warm pool's target of ready zones", ["pool"])
    zones = _gauge("zoned_pool_zones", "A warm pool's zones by state", ["pool", "state"])
    hits = _counter("zoned_pool_hits", "Creates and runs that took a pool's ready zone", ["pool"])
    misses = _counter(
        "zoned_pool_misses", "Creates and runs that matched a pool with no ready zone", ["pool"]
    )
    failures = _counter("zoned_pool_refill_failures", "A pool's refills that failed", ["pool"])
    acquire = SummaryMetricFamily(
        "zoned_pool_acquire_seconds", "Taking a pool's ready zone for a request", labels=["pool"]
    )
    for pool in pools:
        labels = [pool.name]
        size.add_metric(labels, pool.spec.size)
        zones.add_metric([pool.name, "ready"], pool.ready)
        zones.add_metric([pool.name, "booting"], pool.booting)
        hits.add_metric(labels, pool.hits)
        misses.add_metric(labels, pool.misses)
        failures.add_metric(labels, pool.refill_failures)
        mean = pool.acquire_mean_s or 0.0
        acquire.add_metric(labels, count_value=pool.hits, sum_value=mean * pool.hits)
    yield from (size, zones, hits, misses, failures, acquire)


def _counted(name: str, doc: str, label: str, values: Counter[str]) -> CounterMetricFamily:
    family = _counter(name, doc, [label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class _SnapshotCollector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        yield from _host_families(self.snapshot)
        yield from _pool_families(self.snapshot.pools)
        per_zone = _PerZone()
        for zone in sorted(self.snapshot.zones, key=lambda zone: zone.name):
            per_zone.add(zone, self.snapshot.now)
        yield from per_zone.families()


def render(snapshot: Snapshot) -> bytes:
    """The text exposition of ``snapshot`` (CPU work only: a worker thread may run it)."""
    return generate_latest(_SnapshotCollector(snapshot))


# --------------------------------------------------------------------------
# libvirt's statistics, cached
# --------------------------------------------------------------------------

Sampler = Callable[[], Awaitable[list[BulkDomainStats]]]


class StatsCache:
    """The last sample of every running zone's libvirt statistics, refreshed on demand.

    :meth:`current` starts a refresh when the sample is older than
    ``max_age_s`` (one at a time), waits for it at most ``wait_s``, and
    returns the newest sample it has, by domain name. :meth:`run` provides the
    task that refreshes, so that a refresh a scrape gave up on still
    finishes (libvirt calls cannot be abandoned) and is used next time.
    """

    def __init__(self, sample: Sampler, *, max_age_s: float, wait_s: float) -> None:
        self._sample = sample
        self.max_age_s = max_age_s
        self.wait_s = wait_s
        self.stats: dict[str, BulkDomainStats] = {}
        #: Unix time of the sample, and the same on trio's clock.
        self.sampled_at: float | None = None
        self._sampled_clock: float | None = None
        self.refreshes = 0
        self.failures = 0
        self.last_refresh_s: float | None = None
        self._refreshing: trio.Event | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def current(self) -> dict[str, BulkDomainStats]:
        fresh = (
            self._sampled_clock is not None
            and trio.current_time() - self._sampled_clock <= self.max_age_s
        )
        if not fresh and self._nursery is not None:
            if self._refreshing is None:
                self._refreshing = trio.Event()
                self._nursery.start_soon(self._refresh, self._refreshing)
            with trio.move_on_after(self.wait_s):
                await self._refreshing.wait()
        else:
            await trio.lowlevel.checkpoint()
        return self.stats

    async def _refresh(self, done: trio.Event) -> None:
        started = trio.current_time()
        try:
            stats = await self._sample()
        except Exception as exc:
            self.failures += 1
            log.warning("libvirt statistics sample failed: %s", exc)
        else:
            self.stats = {entry.name: entry for entry in stats}
            self.sampled_at = time.time()
            self._sampled_clock = trio.current_time()
            self.refreshes += 1
            self.last_refresh_s = trio.current_time() - started
        finally:
            self._refreshing = None
            done.set()
