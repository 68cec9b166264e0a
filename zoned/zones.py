"""The zone manager: creates, watches, re-adopts and destroys zones.

This is the IO shell around the pure parts (placement, lifecycle, domain
XML). It owns every zone record and is the only writer of them.

Rules:

- One operation at a time per zone (a per-zone lock); different zones
  proceed concurrently.
- Creation is all-or-nothing up to the domain start: if admission, the
  domain definition or the start fails, the placement is released, the
  domain removed and the record deleted; the caller gets the error.
- Once started, a zone's record is never lost: every state change is written
  to the state directory (on a worker thread, in order: see
  :class:`~zoned.store.RecordWriter`) before it is announced, to event
  watchers and to the create or destroy request waiting for it. A zone that
  fails (boot timeout, QEMU exit, agent silence or misbehaviour) keeps its
  record in ``failed`` with the reason, and its host resources are released,
  until it is destroyed.
- Destroy is idempotent for anything that exists; a destroyed zone's record
  is removed once it has reached ``stopped``.
- Which states mean what (settled, terminal, running a domain, ready) is
  :mod:`zoned.lifecycle`'s to say; this module asks it.
- On start-up the manager re-adopts every running domain of ours (from the
  records, or from the domain's metadata if the record is missing) and marks
  records whose domain vanished as failed.
- A zone belongs to the uid that created it; every query and action names
  its caller, and a zone the caller may not act on does not exist for it
  (:mod:`zoned.access`).
- What isolates a zone on the host is set up before its QEMU runs a guest
  instruction: the files it boots are checked against their recorded hashes
  (:mod:`zoned.images.integrity`), its QEMU runs as a uid and gid of its own
  (:mod:`zoned.zoneids`), starts paused, gets its memory and task limits
  (:mod:`zoned.cgroups`) and only then runs. Its runtime directory (the agent
  socket, which libvirtd makes) is root's alone. Destroy releases all of it.
- A zone's workload root is an image (:mod:`zoned.imageservice`): leased
  and verified before its domain is defined, released when the zone is
  destroyed or its creation fails. Its writable layer is a tmpfs in the
  zone's RAM (at most half of it, the default: Linux's own tmpfs default)
  or a scratch disk of its own (:mod:`zoned.images.scratch`), made before
  the domain and removed with the zone, after a failed create, and at
  start-up when no record names it. The guest agent learns which from
  ``zoned.writable=`` on the kernel command line.
- A zone has no network unless its creator asks for one. A networked zone's
  tap (owned by its QEMU uid), rules and helper (:mod:`zoned.net.host`) exist
  before its domain starts and are removed once the domain is gone: on
  destroy, on failure, and (when a restart finds the domain gone) at
  adoption; ``reclaim`` after adoption removes whatever no record claims.
  The policy is enforced on the host, never in the guest, and never falls
  open: a dead helper leaves the zone without network until it is restored.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import logging
import math
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from zoned import cgroups, failures, lifecycle, postmortem, sizes, zonelogs
from zoned.access import DAEMON, AccessPolicy, Caller
from zoned.agentlink import AgentMux, ExecSession, supervise_agent
from zoned.config import Config
from zoned.domain import (
    METADATA_NS,
    METADATA_PREFIX,
    DomainSpec,
    metadata_element,
    read_metadata,
    render_domain_xml,
)
from zoned.errors import (
    AgentFault,
    AgentProtocolError,
    AgentSilent,
    Conflict,
    HypervisorError,
    InvalidRequest,
    NoCapacity,
    NotFound,
    ZonedError,
)
from zoned.events import EventHub
from zoned.images import scratch
from zoned.images.imageconfig import request_process
from zoned.images.integrity import ImageVerifier
from zoned.imageservice import ImageService, ZoneImage
from zoned.kernel.cmdline import hardened_cmdline
from zoned.kernel.store import KernelImage, find_kernel
from zoned.net import addressing
from zoned.net.host import NetEvent, NetHost
from zoned.net.policy import (
    NetPolicy,
    Publish,
    ZoneNetSpec,
    parse_policy,
    parse_publish,
    validate_publishes,
)
from zoned.placement import Allocator, Placement
from zoned.protocol import (
    BUILTIN_IMAGE,
    Accelerator,
    AgentExecStart,
    AgentHello,
    AgentSetHostname,
    CreateZone,
    Exec,
    HeartbeatReply,
    NetMetrics,
    NetRefusal,
    RunZone,
    SetZoneNet,
    ZoneInfo,
    ZoneMetricsData,
    decode_to_agent,
    encode,
    guest_metrics,
)
from zoned.records import PlacementRecord, ZoneRecord, decode_record, encode_record, to_info
from zoned.store import RecordWriter, Write, ZoneStore
from zoned.virt import DomainEvent, Hypervisor
from zoned.zoneids import IdRange, QemuIdAllocator, live_process_ids

log = logging.getLogger(__name__)

#: How often, and how far apart, a failed zone's console is read again when it
#: does not show yet why the guest ended (virtlogd writes it a moment later).
CONSOLE_SETTLE_TRIES = 5
CONSOLE_SETTLE_S = 0.2
#: How long a zone whose agent channel broke waits for libvirt to see its
#: QEMU end, looking this often.
DOMAIN_END_WAIT_S = 5.0
DOMAIN_END_POLL_S = 0.1


# A placement and its record hold the same fields, as tuples and as lists; the
# record leaves out the zone (the zone record's name). Converted, not copied.


def placement_record(placement: Placement) -> PlacementRecord:
    return msgspec.convert(placement, PlacementRecord, from_attributes=True)


def placement_from_record(zone: str, record: PlacementRecord) -> Placement:
    return msgspec.convert({"zone": zone, **msgspec.structs.asdict(record)}, Placement)


@dataclass
class _Zone:
    record: ZoneRecord
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Set once the zone's state is settled (see lifecycle.is_settled) and written.
    settled: trio.Event = field(default_factory=trio.Event)
    supervisor: trio.CancelScope | None = None
    holds_placement: bool = False
    last_heartbeat: HeartbeatReply | None = None
    last_heartbeat_at: float = 0.0
    # The live agent channel once the agent said hello; None otherwise.
    agent: AgentMux | None = None
    # Its QEMU's pid while it runs (None: unknown), for the host's kernel log.
    qemu_pid: int | None = None
    # Set once a failure of the running zone is being handled: the first
    # witness (the agent link, a libvirt event, a resync) diagnoses it.
    failing: bool = False


def _explained(exc: HypervisorError) -> HypervisorError:
    """libvirt's error, with what to do when it is the host's set-up."""
    if "master-key.aes" in exc.message and "Permission denied" in exc.message:
        return HypervisorError(
            f"{exc.message} (the zone's QEMU runs as a uid of its own and cannot reach its"
            " domain directory: /var/lib/libvirt/qemu must be traversable by others (0751);"
            " zoned-host-setup makes it so)"
        )
    return exc


#: The policy and publishes a create asks for.
WantedNetwork = tuple[NetPolicy, list[Publish]]


def net_kernel_args(addr: addressing.ZoneAddressing, ipv6: bool) -> list[str]:
    """What a networked zone's kernel command line gets: IPv4 up before init
    (``ip=``, which callers may not set), and for the agent its IPv6 address
    and gateway (``zoned.ip6=ADDRESS/PREFIX,GATEWAY``; the kernel ignores it)."""
    args = [addressing.kernel_ip_argument(addr)]
    if ipv6:
        args.append(f"zoned.ip6={addr.guest_v6}/{addr.prefix_v6},{addr.host_v6}")
    return args


def net_refusal(event: NetEvent) -> NetRefusal | None:
    """The helper's refusal as the wire carries it (the same fields by name, less its time)."""
    if event.refused is None:
        return None
    fields = msgspec.structs.asdict(event.refused)
    del fields["time"]  # the event has its own
    return NetRefusal(**fields)


def check_memory(config: Config, memory_mib: int, profile: str, machine: str) -> None:
    """Refuse a zone too small to boot (:mod:`zoned.sizes`) or beyond the host's limit."""
    minimum = max(config.min_memory_mib, sizes.minimum_memory_mib(profile, machine))
    if memory_mib < minimum:
        raise InvalidRequest(
            f"memory_mib={memory_mib} is too small: a {profile} zone on {machine} needs at"
            f" least {minimum} MiB to boot and run (below that its kernel runs out of"
            " memory while it boots)"
        )
    if memory_mib > config.max_memory_mib:
        raise InvalidRequest(
            f"memory_mib={memory_mib} is above this host's limit of {config.max_memory_mib} MiB"
        )


def qemu_id_range(config: Config) -> IdRange:
    return IdRange(config.zone_uid_base, config.zone_uid_count)


class _Phases:
    """How long each step of one create took (logged; tools/bench-load reads it)."""

    def __init__(self) -> None:
        self._last = trio.current_time()
        self._took: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = trio.current_time()
        self._took.append((phase, now - self._last))
        self._last = now

    def took(self, phase: str) -> float:
        """How long ``phase`` took (its last mark)."""
        return next(seconds for name, seconds in reversed(self._took) if name == phase)

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.3f}s" for phase, seconds in self._took)


@dataclass(frozen=True)
class _Verified:
    """What a zone's start checked: the hashes it recorded."""

    kernel: KernelImage
    kernel_config_sha256: str


class ZoneManager:
    def __init__(
        self,
        config: Config,
        hypervisor: Hypervisor,
        allocator: Allocator,
        hub: EventHub,
        *,
        accelerator: Accelerator,
        boot_image: Path,
        boot_image_sha256: str,
        tsc_khz: int | None,
        policy: AccessPolicy,
        images: ImageService,
        nethost: NetHost,
        pids_controller: cgroups.PidsController = "",
    ) -> None:
        self.config = config
        self.hv = hypervisor
        self.allocator = allocator
        self.hub = hub
        self.accelerator = accelerator
        self.boot_image = boot_image
        self.boot_image_sha256 = boot_image_sha256
        self.policy = policy
        self.images = images
        self.owner = str(Path(config.state_dir).resolve())
        self.domain_prefix = config.domain_prefix
        self.tsc_khz = tsc_khz
        self.records = RecordWriter(ZoneStore(Path(config.state_dir), ZoneRecord))
        self.zones: dict[str, _Zone] = {}
        # Names whose create is past its checks and not yet in self.zones: taken.
        self._creating: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self.qemu_ids = QemuIdAllocator(qemu_id_range(config))
        self.verifier = ImageVerifier()
        self.cgroup_root = Path(config.cgroup_root)
        self.pids_controller = pids_controller
        #: Called when a pool zone changes state or goes (zoned.pools refills then).
        self.pool_changed: Callable[[], None] = _nothing
        self.nethost = nethost

    # ------------------------------------------------------------------ queries

    def get(self, name: str, caller: Caller) -> ZoneInfo:
        return to_info(self.zone_for(name, caller).record)

    def list(self, labels: dict[str, str], caller: Caller) -> list[ZoneInfo]:
        return [
            to_info(zone.record)
            for name, zone in sorted(self.zones.items())
            if all(zone.record.labels.get(k) == v for k, v in labels.items())
            and self._visible(zone, caller)
        ]

    def _visible(self, zone: _Zone, caller: Caller) -> bool:
        # A pool zone is nobody's zone until it is acquired (zonectl pool list counts them).
        return not zone.record.pool and self.policy.may_act_on(caller, zone.record.owner_uid)

    def pool_zones(self, pool: str) -> builtins.list[_Zone]:
        """The zones waiting in (or booting for) ``pool``, oldest first."""
        found = [zone for zone in self.zones.values() if zone.record.pool == pool]
        return sorted(found, key=lambda zone: zone.record.created_at)

    def pool_names(self) -> set[str]:
        """Every pool some zone waits in."""
        return {zone.record.pool for zone in self.zones.values() if zone.record.pool}

    def console_log_path(self, name: str, caller: Caller) -> Path:
        return Path(self.zone_for(name, caller).record.console_log)

    def visible_names(self, caller: Caller) -> set[str]:
        """The zones ``caller`` may know of."""
        return {name for name, zone in self.zones.items() if self._visible(zone, caller)}

    def zone_for(self, name: str, caller: Caller) -> _Zone:
        """The zone ``name`` if ``caller`` may act on it; to anyone else it does not exist."""
        zone = self.zones.get(name)
        if zone is None or not self._visible(zone, caller):
            raise NotFound(f"no zone named {name!r}")
        return zone

    def _by_domain(self, domain_name: str) -> _Zone | None:
        return next((z for z in self.zones.values() if z.record.domain_name == domain_name), None)

    # --------------------------------------------------------------- state changes

    def _set(
        self,
        zone: _Zone,
        event: lifecycle.Input,
        reason: str = "",
        changes: dict[str, Any] | None = None,
    ) -> None:
        """Apply a lifecycle input: persist first, then announce."""
        old = zone.record.state
        try:
            result = lifecycle.transition(old, event, reason)
        except Conflict as exc:
            # A fact that cannot happen in this state is stale or a bug; it
            # must never take the daemon down.
            log.error("zone %s: ignored %s: %s", zone.record.name, event, exc.message)
            return
        updates: dict[str, Any] = dict(changes or {})
        if result.changed:
            updates.update(state=result.new_state, reason=result.reason)
        if not updates:
            return
        record = msgspec.structs.replace(zone.record, **updates)
        zone.record = record

        def announce() -> None:
            if lifecycle.runs_domain(record.state):
                self._sync_metadata(zone)
            if result.changed:
                self.hub.publish(
                    "zone_state",
                    zone=record.name,
                    state=result.new_state,
                    previous=old,
                    reason=result.reason,
                    owner_uid=record.owner_uid,
                )
            if lifecycle.is_settled(record.state):
                zone.settled.set()
            if record.pool:
                self.pool_changed()

        self.records.save(record.name, record, then=announce)

    def _update(self, zone: _Zone, **changes: Any) -> Write:
        """Record facts that are not a state change (persisted, then mirrored)."""
        zone.record = msgspec.structs.replace(zone.record, **changes)
        then = functools.partial(self._sync_metadata, zone)
        return self.records.save(zone.record.name, zone.record, then=then)

    def _release(self, zone: _Zone) -> None:
        if zone.holds_placement:
            self.allocator.release(zone.record.name)
            zone.holds_placement = False

    async def _repin_shared(self) -> None:
        """Follow the shared pool: it grows and shrinks with exclusive zones."""
        for zone in list(self.zones.values()):
            record = zone.record
            if not zone.holds_placement or record.placement.policy != "shared":
                continue
            if not lifecycle.runs_domain(record.state):
                continue
            placement = placement_record(self.allocator.placement(record.name))
            if placement == record.placement:
                continue
            try:
                for vcpu, cpus in enumerate(placement.vcpu_cpus):
                    await self.hv.pin_vcpu(record.domain_name, vcpu, cpus)
                if placement.emulator_cpus:
                    await self.hv.pin_emulator(record.domain_name, placement.emulator_cpus)
            except ZonedError as exc:
                log.warning("re-pinning shared zone %s failed: %s", record.name, exc)
                continue
            zone.record = msgspec.structs.replace(record, placement=placement)
            self.records.save(
                record.name, zone.record, then=functools.partial(self._sync_metadata, zone)
            )

    # -------------------------------------------------------------------- create

    def _check_name_free(self, name: str, caller: Caller) -> None:
        taken = self.zones.get(name)
        if taken is not None:
            if self._visible(taken, caller):
                raise Conflict(f"a zone named {name!r} already exists")
            # Zone names are one namespace for the host; say no more than that.
            raise Conflict(f"the zone name {name!r} is taken (names are shared by all users)")
        if name in self._creating:
            raise Conflict(f"the zone name {name!r} is taken")

    async def create(
        self,
        request: CreateZone,
        caller: Caller,
        *,
        pool: str = "",
        registered: Callable[[str], object] | None = None,
    ) -> ZoneInfo:
        """Create the zone and wait until it is ready; its error otherwise. With
        ``pool``, a zone that waits in that pool (zoned.pools).

        ``registered`` is called with the new zone's uuid as soon as it holds
        its name: from then on the zone exists (also in ``failed``, when the
        boot fails) until it is destroyed; a request refused earlier never
        registers anything.
        """
        name = request.name
        self._check_name_free(name, caller)
        machine = request.machine or self.config.machine
        if request.vcpus > self.config.max_vcpus:
            raise InvalidRequest(
                f"vcpus={request.vcpus} is above this host's limit of {self.config.max_vcpus}"
            )
        check_memory(self.config, request.memory_mib, request.profile, machine)
        phases = _Phases()
        wanted_net = self._wanted_network(request)
        if wanted_net is not None:
            await self.nethost.check_policy(wanted_net[0])
        writable_mib = self.writable_layer_mib(request)
        tsc = self.tsc_khz if (self.accelerator == "tcg" and machine == "microvm") else None
        args = hardened_cmdline(request.profile, machine, tsc, request.kernel_args)
        busy = await trio.to_thread.run_sync(live_process_ids, self.qemu_ids.ids)
        # Created by another request while we checked (or being created): from
        # here the name is this create's, until its zone is in self.zones.
        self._check_name_free(name, caller)
        self._creating.add(name)
        try:
            image = await self.images.acquire(name, request.image)
            try:
                verified = await trio.to_thread.run_sync(
                    self._verify_images, request.profile, image
                )
                qemu_uid = self.qemu_ids.allocate(name, busy)
            except BaseException:
                self.images.release(name)
                raise
            phases.mark("checks")
            placement: Placement | None = None
            try:
                placement = await self._allocate(name, request, evict=not pool)
                # From here to the zone's entry in self.zones nothing awaits: the
                # network's slot is taken for it alone.
                network, addr = self._new_network(name, wanted_net)
            except BaseException:
                if placement is not None:
                    self.allocator.release(name)
                self.qemu_ids.release(name)
                self.images.release(name)
                raise
            kernel = verified.kernel
            # Read by the guest agent (its hostname, its writable layer); the kernel ignores them.
            writable = "disk" if request.writable_layer == "disk" else f"tmpfs:{writable_mib}"
            cmdline = " ".join([*args, f"zoned.zone={name}", f"zoned.writable={writable}"])
            if network is not None and addr is not None:
                cmdline = " ".join([cmdline, *net_kernel_args(addr, network.ipv6)])
            zone_dir = self._zone_dir(name)
            zone_uuid = str(uuidlib.uuid4())
            logs = zonelogs.zone_log_dir(Path(self.config.log_dir), name, zone_uuid)
            scratch_disk = ""
            if request.writable_layer == "disk":
                scratch_disk = str(
                    scratch.scratch_path(Path(self.config.scratch_dir), name, zone_uuid)
                )
            record = ZoneRecord(
                name=name,
                uuid=zone_uuid,
                domain_name=self.domain_prefix + name,
                state="creating",
                vcpus=request.vcpus,
                memory_mib=request.memory_mib,
                profile=request.profile,
                machine=machine,
                accelerator=self.accelerator,
                placement=placement_record(placement),
                labels=dict(request.labels),
                kernel_args=list(request.kernel_args),
                kernel_image=str(kernel.image),
                kernel_sha256=kernel.manifest.image_sha256,
                boot_image=str(self.boot_image),
                rootfs=str(image.rootfs),
                image=image.reference,
                image_id=image.id,
                writable_layer=request.writable_layer,
                writable_layer_mib=writable_mib,
                scratch_disk=scratch_disk,
                pool=pool,
                owner=self.owner,
                cmdline=cmdline,
                console_log=str(logs / zonelogs.CONSOLE_LOG),
                agent_socket=str(zone_dir / "agent.sock"),
                created_at=time.time(),
                owner_uid=caller.uid,
                qemu_uid=qemu_uid,
                boot_image_sha256=self.boot_image_sha256,
                rootfs_sha256=image.sha256,
                kernel_config_sha256=verified.kernel_config_sha256,
                network=network,
                net_address=addr.guest_v4 if addr is not None else "",
                net_address6=addr.guest_v6 if addr is not None and network and network.ipv6 else "",
                net_status="up" if network is not None else None,
            )
            zone = _Zone(record, holds_placement=True)
            self.zones[name] = zone
        finally:
            self._creating.discard(name)  # in self.zones now, or given up
        if registered is not None:
            registered(record.uuid)
        async with zone.lock:
            # The steps that create host state run shielded: a client that goes
            # away mid-create must not leave half a zone behind.
            with trio.CancelScope(shield=True):
                try:
                    await self.records.save(name, record).wait()
                    phases.mark("record")
                    self.hub.publish(
                        "zone_state", zone=name, state="creating", owner_uid=caller.uid
                    )
                    await trio.to_thread.run_sync(self._prepare_runtime, zone_dir, record)
                    if record.scratch_disk:
                        await trio.to_thread.run_sync(
                            scratch.create_scratch_disk,
                            Path(record.scratch_disk),
                            writable_mib,
                            self._scratch_owner(record),
                        )
                    if network is not None:
                        # Rules, tap and helper before the guest can send a frame.
                        await self.nethost.create(network, tap_uid=qemu_uid, tap_gid=qemu_uid)
                    phases.mark("runtime")
                    xml = render_domain_xml(self._domain_spec(record))
                    # Paused: the limits hold before the guest runs an instruction.
                    try:
                        await self.hv.create_transient(xml, paused=True)
                    except HypervisorError as exc:
                        raise _explained(exc) from exc
                    phases.mark("start")
                    limits = await self._limit_qemu(zone)
                    phases.mark("limits")
                    await self.hv.resume(record.domain_name)
                    phases.mark("resume")
                except BaseException as exc:
                    await self._undo_create(zone, exc)
                    raise
                # What the boot timeline of tools/bench-boot-parts reads.
                log.info(
                    "zone %s: domain created in %.3f s, limited in %.3f s, resumed in %.3f s",
                    name,
                    phases.took("start"),
                    phases.took("limits"),
                    phases.took("resume"),
                )
                self._set(zone, "started", changes=limits)
                self._start_supervisor(zone, self.config.boot_timeout_s)
                await self._repin_shared()
        await zone.settled.wait()
        phases.mark("boot")
        final = zone.record
        if lifecycle.is_ready(final.state):
            log.info("zone %s create phases: %s", name, phases)
            return to_info(final)
        if final.state == "failed":
            raise HypervisorError(f"zone {name!r} failed to boot: {final.reason}")
        raise Conflict(f"zone {name!r} was {final.state} before it became ready")

    def _wanted_network(self, request: CreateZone | RunZone) -> WantedNetwork | None:
        """The policy and publishes a create asks for (None: no network); bad ones refused."""
        if request.net is None and not request.publishes:
            return None
        policy = parse_policy(request.net or [])
        publishes = validate_publishes([parse_publish(text) for text in request.publishes])
        return policy, publishes

    def _new_network(
        self, name: str, wanted: WantedNetwork | None
    ) -> tuple[ZoneNetSpec | None, addressing.ZoneAddressing | None]:
        """The new zone's network on the lowest free slot (None, None: none);
        InvalidRequest when every slot is taken. Takes the slot only if the
        caller enters the zone in self.zones before it next awaits."""
        if wanted is None:
            return None, None
        policy, publishes = wanted
        slot = addressing.lowest_free_slot(self._net_pools(), self._net_slots_in_use())
        network = ZoneNetSpec(
            zone=name, slot=slot, policy=policy, publishes=publishes, ipv6=self.config.net_ipv6
        )
        return network, addressing.zone_addressing(self._net_pools(), slot)

    def _net_pools(self) -> addressing.NetPools:
        return self.nethost.config.pools

    def _net_slots_in_use(self) -> set[int]:
        """Slots of live zones' networks, and of every network the host still has."""
        used = {self.nethost.spec(zone).slot for zone in self.nethost.zones()}
        for zone in self.zones.values():
            network = zone.record.network
            if network is not None and not lifecycle.is_terminal(zone.record.state):
                used.add(network.slot)
        return used

    async def _allocate(self, name: str, request: CreateZone, *, evict: bool) -> Placement:
        """The zone's placement; with ``evict``, unused pool zones make room
        (oldest first) when the host is full."""
        while True:
            try:
                return self.allocator.allocate(
                    name, request.vcpus, request.memory_mib, request.placement
                )
            except NoCapacity:
                victim = next(
                    (
                        zone
                        for zone in sorted(self.zones.values(), key=lambda z: z.record.created_at)
                        if zone.record.pool and zone.holds_placement and not zone.lock.locked()
                    ),
                    None,
                )
                if not evict or victim is None:
                    raise
            log.info("evicting pool zone %s to make room for %s", victim.record.name, name)
            await self.destroy_pool_zone(victim.record.name)

    # ------------------------------------------------------------- pool acquire

    def take_pool_zone(
        self, pool: str, name: str, labels: dict[str, str], caller: Caller
    ) -> ZoneRecord | None:
        """Give the oldest ready zone of ``pool`` its identity: ``name``, ``labels``,
        ``caller`` as owner. None when the pool has no ready zone.

        Synchronous, so that no other task runs between finding the zone and
        taking it: a pool zone is never handed out twice. Its domain, runtime
        directory, logs and QEMU uid keep their first name (``domain_name``).
        The caller persists the change with :meth:`persist_acquired`.
        """
        self._check_name_free(name, caller)
        zone = next(
            (
                z
                for z in self.pool_zones(pool)
                if lifecycle.is_ready(z.record.state)
                and z.agent is not None
                and not z.lock.locked()
            ),
            None,
        )
        if zone is None:
            return None
        old = zone.record
        del self.zones[old.name]
        self.zones[name] = zone
        if zone.holds_placement:
            self.allocator.rename(old.name, name)
        self.qemu_ids.rename(old.name, name)
        self.images.rename(old.name, name)
        zone.record = msgspec.structs.replace(
            old, name=name, pool="", from_pool=pool, labels=dict(labels), owner_uid=caller.uid
        )
        return old

    async def persist_acquired(self, name: str, old: ZoneRecord) -> ZoneInfo:
        """Write the acquired zone's record under its new name, then drop the old one.

        A restart between the two finds both for one domain; :meth:`_adopt`
        keeps the acquired one.
        """
        zone = self.zones[name]
        with trio.CancelScope(shield=True):
            # Its logs (console, audit records, events) are the new name's:
            # zonectl logs and the retention find them under it.
            logs = zonelogs.zone_log_dir(Path(self.config.log_dir), name, old.uuid)
            try:
                await trio.to_thread.run_sync(_move_log_dir, Path(old.console_log).parent, logs)
            except OSError as exc:
                log.error("zone %s: its logs stay under %s: %s", name, old.name, exc)
            else:
                console_log = str(logs / zonelogs.CONSOLE_LOG)
                zone.record = msgspec.structs.replace(zone.record, console_log=console_log)
            record = zone.record
            if zone.agent is not None:
                # Before the reply: the caller's first process sees the new name.
                await zone.agent.send_quietly(AgentSetHostname(hostname=name))
            await self.records.save(name, record).wait()
            await self.records.delete(old.name).wait()
        self._sync_metadata(zone)
        self.hub.publish(
            "zone_state",
            zone=name,
            state=record.state,
            previous=record.state,
            reason=f"taken from pool {record.from_pool!r}",
            owner_uid=record.owner_uid,
        )
        return to_info(record)

    def _verify_images(self, profile: str, image: ZoneImage) -> _Verified:
        """The kernel of ``profile``, after every file the zone boots was checked
        against its recorded hash (an image of the store was, by
        :meth:`ImageService.acquire`). Blocking: run in a worker thread."""
        kernel = find_kernel(Path(self.config.kernel_store), profile)
        check = self.verifier.check
        check(kernel.image, kernel.manifest.image_sha256, f"kernel of profile {profile!r}")
        check(self.boot_image, self.boot_image_sha256, "boot image")
        if image.id == BUILTIN_IMAGE:
            check(image.rootfs, image.sha256, "workload root")
        try:
            config_sha256 = hashlib.sha256(kernel.config.read_bytes()).hexdigest()
        except FileNotFoundError:
            config_sha256 = ""
        return _Verified(kernel, config_sha256)

    async def _limit_qemu(self, zone: _Zone) -> dict[str, Any]:
        """Memory and task limits on the (paused) zone's QEMU; the record's changes."""
        record = zone.record
        memory = record.memory_mib + self.config.qemu_memory_overhead_mib
        await self.hv.set_memory_hard_limit(record.domain_name, memory)
        changes: dict[str, Any] = {"memory_hard_limit_mib": memory}
        pid = zone.qemu_pid = await self.hv.qemu_pid(record.domain_name)
        if pid is None or not self.pids_controller:
            return changes  # no QEMU process (libvirt's test driver), or no controller
        applied = await trio.to_thread.run_sync(
            cgroups.limit_tasks,
            self.cgroup_root,
            record.domain_name,
            pid,
            self.config.qemu_pids_limit,
        )
        if applied is not None:
            changes["pids_limit"] = applied.limit
            changes["pids_cgroup"] = str(applied.cgroup) if applied.ours else ""
        return changes

    def _zone_dir(self, name: str) -> Path:
        return Path(self.config.runtime_dir) / "zones" / name

    async def _undo_create(self, zone: _Zone, exc: BaseException) -> None:
        name = zone.record.name
        log.warning("create of %s failed, undoing: %r", name, exc)
        try:
            await self.hv.remove(zone.record.domain_name)
        except ZonedError as cleanup_exc:
            log.error("could not remove domain of %s: %s", name, cleanup_exc)
        await self._remove_network(zone)
        self._release(zone)
        await trio.to_thread.run_sync(self._clean_host, zone.record)
        self.qemu_ids.release(name)
        await self._remove_workload_root(zone.record)
        del self.zones[name]
        with contextlib.suppress(OSError):
            await self.records.delete(name).wait()  # logged by the writer
        reason = exc.message if isinstance(exc, ZonedError) else repr(exc)
        self.hub.publish(
            "zone_state",
            zone=name,
            state="failed",
            previous="creating",
            reason=reason,
            owner_uid=zone.record.owner_uid,
        )
        zone.settled.set()

    def _clean_host(self, record: ZoneRecord) -> None:
        """Remove what the zone had on the host besides its domain: its runtime
        directory and its pids cgroup. Blocking: run in a worker thread."""
        # The agent socket's directory, named after the zone's first name.
        shutil.rmtree(Path(record.agent_socket).parent, ignore_errors=True)
        pids_cgroup = self._pids_cgroup(record)
        if pids_cgroup is not None:
            cgroups.remove_cgroup(pids_cgroup)

    def _pids_cgroup(self, record: ZoneRecord) -> Path | None:
        # Only a cgroup under zoned's own v1 parent is ours to remove.
        ours = self.cgroup_root / "pids" / cgroups.V1_PARENT / record.domain_name
        return ours if record.pids_cgroup == str(ours) else None

    def writable_layer_mib(self, request: CreateZone) -> int:
        """The size of the zone's writable layer; InvalidRequest beyond the kind's limit."""
        size = request.writable_layer_mib
        if request.writable_layer == "tmpfs":
            # tmpfs pages are guest RAM that cannot be swapped: at most half of
            # it (Linux's own default for a tmpfs), so that a full writable
            # layer leaves the agent and the workload room to run.
            limit = request.memory_mib // 2
            if size is not None and size > limit:
                raise InvalidRequest(
                    f"writable_layer_mib={size}: a tmpfs writable layer takes at most half of"
                    f" the zone's memory ({limit} MiB of {request.memory_mib}); use"
                    " writable_layer='disk' for more"
                )
            return size or limit
        limit = self.config.max_scratch_mib
        if size is not None and size > limit:
            raise InvalidRequest(
                f"writable_layer_mib={size} is above this host's scratch disk limit of"
                f" {limit} MiB (max_scratch_mib)"
            )
        return size or min(self.config.default_scratch_mib, limit)

    def _scratch_owner(self, record: ZoneRecord) -> tuple[int, int] | None:
        """Who QEMU runs the zone as: its scratch disk is that user's alone."""
        if os.geteuid() != 0 or record.qemu_uid is None:
            return None
        return record.qemu_uid, record.qemu_uid

    async def _remove_workload_root(self, record: ZoneRecord) -> None:
        """The zone's scratch disk is deleted and its image released (shielded by callers)."""
        if record.scratch_disk:
            try:
                await trio.to_thread.run_sync(
                    scratch.remove_scratch_disk, Path(record.scratch_disk)
                )
            except OSError as exc:
                log.error("could not remove the scratch disk of %s: %s", record.name, exc)
        self.images.release(record.name)

    def _sync_metadata(self, zone: _Zone) -> None:
        """Copy the record into the running domain's metadata too (best effort, async)."""
        if self._nursery is None:
            return
        name = zone.record.name

        async def update() -> None:
            record = zone.record
            if not lifecycle.runs_domain(record.state) or self.zones.get(name) is not zone:
                return
            try:
                await self.hv.set_metadata(
                    record.domain_name,
                    metadata_element(encode_record(record).decode()),
                    METADATA_PREFIX,
                    METADATA_NS,
                )
            except ZonedError as exc:
                log.info("could not update the metadata of %s: %s", name, exc)

        self._nursery.start_soon(update)

    def _prepare_runtime(self, zone_dir: Path, record: ZoneRecord) -> None:
        """The agent socket's directory, root's alone, and a fresh console log.

        libvirtd makes the socket and hands QEMU the listening descriptor, so
        no QEMU needs the directory: no zone can put anything there, or swap
        the socket the daemon connects to for a link to another zone's.
        Blocking: run in a worker thread.
        """
        zones = Path(self.config.runtime_dir) / "zones"
        zones.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(zones, 0o700)
        zone_dir.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(zone_dir, 0, 0)
        os.chmod(zone_dir, 0o700)
        # Its logs' directory (zoned.zonelogs): they outlive the zone.
        Path(record.console_log).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        Path(record.console_log).unlink(missing_ok=True)

    def _domain_spec(self, record: ZoneRecord) -> DomainSpec:
        return DomainSpec(
            domain_name=record.domain_name,
            uuid=record.uuid,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            machine=record.machine,
            accelerator=record.accelerator,
            kernel=Path(record.kernel_image),
            initrd=Path(record.boot_image),
            rootfs=Path(record.rootfs) if record.rootfs else None,
            scratch_disk=Path(record.scratch_disk) if record.scratch_disk else None,
            cmdline=record.cmdline,
            vcpu_pins=tuple(tuple(c) for c in record.placement.vcpu_cpus),
            emulator_cpus=tuple(record.placement.emulator_cpus),
            numa_node=record.placement.numa_node,
            console_log=Path(record.console_log),
            agent_socket=Path(record.agent_socket),
            metadata=encode_record(record).decode(),
            qemu_uid=record.qemu_uid,
            free_page_reporting=self.config.free_page_reporting,
            tcg_tb_cache_mib=self.config.tcg_tb_cache_mib or None,
            network=(
                addressing.zone_addressing(self._net_pools(), record.network.slot)
                if record.network is not None
                else None
            ),
        )

    # ---------------------------------------------------------- agent supervision

    def _start_supervisor(self, zone: _Zone, boot_timeout: float) -> None:
        assert self._nursery is not None, "ZoneManager.run() is not running"
        scope = trio.CancelScope()
        zone.supervisor = scope
        self._nursery.start_soon(self._supervise, zone, scope, boot_timeout)

    async def _supervise(self, zone: _Zone, scope: trio.CancelScope, boot_timeout: float) -> None:
        name = zone.record.name

        def on_hello(hello: AgentHello) -> None:
            boot_s = hello.boot_s if math.isfinite(hello.boot_s) and hello.boot_s >= 0 else None
            changes: dict[str, Any] = {"kernel_release": hello.kernel_release[:128]}
            # A hello after a daemon restart (re-adoption) or a reconnect is not
            # a boot: the first boot's figures stay.
            if zone.record.ready_at is None:
                changes["ready_at"] = time.time()
                changes["guest_boot_s"] = boot_s
            self._set(zone, "agent_hello", changes=changes)

        def on_heartbeat(reply: HeartbeatReply) -> None:
            zone.last_heartbeat = reply
            zone.last_heartbeat_at = time.time()

        def on_mux(mux: AgentMux | None) -> None:
            zone.agent = mux

        with scope:
            fault = await supervise_agent(
                Path(zone.record.agent_socket),
                name,
                boot_timeout=boot_timeout,
                heartbeat_interval=self.config.heartbeat_interval_s,
                silence_limit=self.config.agent_silence_s,
                on_hello=on_hello,
                on_heartbeat=on_heartbeat,
                on_mux=on_mux,
            )
            if lifecycle.hears_agent(zone.record.state):
                # A channel that breaks because QEMU died is QEMU's failure;
                # say so even if libvirt's event has not arrived yet.
                stop, running_state = await self._domain_end(zone)
                if not stop and not isinstance(fault, AgentSilent | AgentProtocolError):
                    # The channel broke: QEMU is ending and libvirt may not
                    # know yet. Its event, if it comes first, takes over.
                    with trio.move_on_after(DOMAIN_END_WAIT_S):
                        while not stop and not zone.failing:
                            await trio.sleep(DOMAIN_END_POLL_S)
                            stop, running_state = await self._domain_end(zone)
                if not lifecycle.hears_agent(zone.record.state) or not self._claim_failure(zone):
                    return  # the libvirt event won the race and fails the zone
                event: lifecycle.Input
                observed: failures.Observed
                if stop:
                    event, observed = "domain_stopped", "channel_closed"
                elif not isinstance(fault, AgentSilent | AgentProtocolError):
                    event, observed = "domain_crashed", "channel_closed"
                elif isinstance(fault, AgentProtocolError):
                    event, observed = "agent_misbehaved", "agent_misbehaved"
                elif zone.record.state == "booting":
                    event, observed = "boot_timeout", "boot_timeout"
                else:
                    event, observed = "agent_silent", "agent_silent"
                await self._fail(
                    zone, event, observed, fault.message, stop=stop, running_state=running_state
                )

    async def _domain_end(self, zone: _Zone) -> tuple[str, str]:
        """How the zone's domain ended ("<state>: <reason>", "vanished"; "" while it
        runs or when libvirt cannot say) and, while it runs, its libvirt state."""
        try:
            state = await self.hv.lookup(zone.record.domain_name)
        except ZonedError:
            return "", ""  # libvirt unreachable: cannot tell, blame the agent
        if state is None:
            return "vanished", ""
        if state.active:
            return "", state.state
        return (f"{state.state}: {state.reason}" if state.reason else state.state), ""

    def _claim_failure(self, zone: _Zone) -> bool:
        """Whether the caller is the first to see the running zone fail (then it
        must call :meth:`_fail`); later witnesses of the same end do nothing."""
        if zone.failing or not lifecycle.runs_domain(zone.record.state):
            return False
        zone.failing = True
        return True

    async def _diagnose(
        self,
        zone: _Zone,
        observed: failures.Observed,
        detail: str,
        stop: str,
        running_state: str,
    ) -> failures.Diagnosis:
        """Why the zone failed, from what it left behind (:mod:`zoned.failures`)."""
        gather = functools.partial(
            postmortem.gather,
            zone.record,
            observed=observed,
            detail=detail,
            stop=stop,
            running_state=running_state,
            qemu_pid=zone.qemu_pid,
            qemu_log_dir=Path(self.config.libvirt_log_dir),
            boot_timeout_s=self.config.boot_timeout_s,
            silence_limit_s=self.config.agent_silence_s,
        )
        diagnosis = failures.diagnose(await trio.to_thread.run_sync(gather))
        # virtlogd may not have written the guest's last words yet when QEMU's
        # end reaches us: a guest that "shut down" without a panic is read again.
        for _ in range(CONSOLE_SETTLE_TRIES):
            if diagnosis.cause != "guest_stopped":
                break
            await trio.sleep(CONSOLE_SETTLE_S)
            diagnosis = failures.diagnose(await trio.to_thread.run_sync(gather))
        return diagnosis

    async def _fail(
        self,
        zone: _Zone,
        event: lifecycle.Input,
        observed: failures.Observed,
        detail: str,
        *,
        stop: str = "",
        running_state: str = "",
    ) -> None:
        """A zone that can no longer be trusted to work: say why, stop QEMU, keep
        the record. Only the caller that claimed the failure calls it."""
        with trio.CancelScope(shield=True):
            diagnosis = await self._diagnose(zone, observed, detail, stop, running_state)
            if not lifecycle.runs_domain(zone.record.state):
                return  # destroyed while we looked: the destroy cleans up
            log.warning("zone %s failed: %s", zone.record.name, diagnosis.reason)
            self._set(zone, event, diagnosis.reason, changes={"failure": diagnosis.cause})
            try:
                await self.hv.remove(zone.record.domain_name)
            except ZonedError as exc:
                log.error("could not stop domain of failed zone %s: %s", zone.record.name, exc)
            else:
                # QEMU is gone: its network, uid and cgroup may serve another zone.
                await self._remove_network(zone)
                await trio.to_thread.run_sync(self._clean_host, zone.record)
                self.qemu_ids.release(zone.record.name)
            self._release(zone)
            await self._repin_shared()

    # ------------------------------------------------------------------- destroy

    async def destroy(self, name: str, caller: Caller) -> ZoneInfo:
        return await self._destroy(name, self.zone_for(name, caller))

    async def destroy_pool_zone(self, name: str) -> None:
        """Destroy ``name`` if it still waits in a pool (it may have been taken)."""
        zone = self.zones.get(name)
        if zone is None or not zone.record.pool:
            return
        with contextlib.suppress(NotFound):  # acquired or destroyed meanwhile
            await self._destroy(name, zone)
        self.pool_changed()

    async def _destroy(self, name: str, zone: _Zone) -> ZoneInfo:
        if not lifecycle.is_settled(zone.record.state) and zone.supervisor is not None:
            # Destroy during boot: stop waiting for the agent at once.
            zone.supervisor.cancel()
        async with zone.lock:
            if self.zones.get(name) is not zone:
                raise NotFound(f"no zone named {name!r}")
            if zone.supervisor is not None:
                zone.supervisor.cancel()
            with trio.CancelScope(shield=True):
                self._set(zone, "destroy_requested")  # a no-op when already stopping
                await self.hv.remove(zone.record.domain_name)
                await self._remove_network(zone)
                self._release(zone)
                await trio.to_thread.run_sync(self._clean_host, zone.record)
                self.qemu_ids.release(name)
                await self._remove_workload_root(zone.record)
                await self._repin_shared()
                self._set(zone, "domain_stopped", "destroyed")
                del self.zones[name]
                await self.records.delete(name).wait()
        return to_info(zone.record)

    # ------------------------------------------------------------ quarantine

    async def freeze(self, name: str, caller: Caller) -> ZoneRecord:
        """Quarantine: pause the zone's vCPUs now; it runs nothing until destroyed.

        A zone that is not running (or still being created) is a
        :class:`Conflict` and nothing changes. Its processes end for their
        clients; its agent is no longer supervised (it cannot answer).
        """
        zone = self.zone_for(name, caller)
        reason = f"by uid {caller.uid}"
        async with zone.lock:
            if self.zones.get(name) is not zone:
                raise NotFound(f"no zone named {name!r}")
            state = zone.record.state
            if not lifecycle.runs_domain(state):
                raise Conflict(f"zone {name!r} is {state}: only a running zone can be quarantined")
            with trio.CancelScope(shield=True):
                if not lifecycle.is_quarantined(state):
                    await self.hv.suspend(zone.record.domain_name)
                    try:
                        await self.cut_network(name)
                    except ZonedError as exc:
                        # Closed, never open: then it has no network at all (its
                        # record keeps what it had, for the evidence).
                        log.error("could not cut the network of quarantined %s: %s", name, exc)
                        await self._remove_network(zone)
                    if zone.agent is not None:
                        zone.agent.lose("the zone was quarantined")
                    if zone.supervisor is not None:
                        zone.supervisor.cancel()
                self._set(zone, "quarantine_requested", reason)
                await self.records.save(name, zone.record).wait()
        return zone.record

    # --------------------------------------------------------------- network

    async def _remove_network(self, zone: _Zone) -> None:
        """The zone's tap, rules and helper (once its QEMU is gone); idempotent."""
        if zone.record.network is None or zone.record.name not in self.nethost.zones():
            return
        with trio.CancelScope(shield=True):
            try:
                await self.nethost.remove(zone.record.name)
            except ZonedError as exc:
                # reclaim() at the next start removes what is left.
                log.error("could not remove the network of %s: %s", zone.record.name, exc)

    async def set_network(self, request: SetZoneNet, caller: Caller) -> tuple[ZoneInfo, int]:
        """A running zone's new policy and/or publishes; returns it and the connections closed."""
        zone = self.zone_for(request.name, caller)
        name = request.name
        async with zone.lock:
            network = zone.record.network
            if network is None:
                raise Conflict(
                    f"zone {name!r} was created without a network: its NIC exists only"
                    " from the start (create it with --net)"
                )
            if lifecycle.is_quarantined(zone.record.state):
                # Its network was cut with the freeze; it stays cut until destroyed.
                raise Conflict(f"zone {name!r} is quarantined: its network stays cut")
            if not lifecycle.runs_domain(zone.record.state) or name not in self.nethost.zones():
                raise Conflict(f"zone {name!r} is {zone.record.state}: its network does not run")
            policy = parse_policy(request.net) if request.net is not None else network.policy
            publishes = network.publishes
            if request.publishes is not None:
                publishes = validate_publishes([parse_publish(t) for t in request.publishes])
            closed = 0
            if request.publishes is not None:
                await self.nethost.update_publishes(name, publishes)
            if request.net is not None:
                try:
                    closed = await self.nethost.update_policy(name, policy)
                except BaseException:
                    if request.publishes is not None:
                        with trio.CancelScope(shield=True):
                            await self.nethost.update_publishes(name, network.publishes)
                    raise
            changed = msgspec.structs.replace(network, policy=policy, publishes=publishes)
            await self._update(zone, network=changed).wait()
        return to_info(zone.record), closed

    async def cut_network(self, name: str) -> int:
        """Nothing in or out of the zone from now on (quarantine); the connections closed.

        No rule, no publish (their host ports are closed), every open
        connection closed; its DNS gets refusals only. A zone without network:
        0. Its record keeps the policy and publishes it had (the evidence of
        what it was allowed); a restarted daemon re-adopts a quarantined
        zone's network cut, and :meth:`set_network` refuses to open it again.
        """
        zone = self.zones.get(name)
        if zone is None or name not in self.nethost.zones():
            return 0
        return await self.nethost.cut(name)

    async def forward_net_events(self) -> None:
        """The zones' network events onto the event hub (refusals, helper state)."""
        async for event in self.nethost.events:
            zone = self.zones.get(event.zone)
            owner = zone.record.owner_uid if zone is not None else None
            if event.kind == "refused":
                self.hub.publish(
                    "net_refused", zone=event.zone, refused=net_refusal(event), owner_uid=owner
                )
                continue
            status = {"helper_down": "restarting", "helper_restored": "up", "failed": "failed"}[
                event.kind
            ]
            self.hub.publish(
                "net_status", zone=event.zone, state=status, reason=event.reason, owner_uid=owner
            )
            if zone is not None and zone.record.network is not None:
                self._update(zone, net_status=status)

    async def _net_metrics(self, name: str) -> NetMetrics | None:
        if name not in self.nethost.zones():
            return None
        try:
            counters = await self.nethost.read_counters(name)
        except ZonedError as exc:
            log.info("no network counters for %s: %s", name, exc)
            counters = self.nethost.counters(name)
        return NetMetrics(status=self.nethost.status(name), **msgspec.structs.asdict(counters))

    # --------------------------------------------------------------- metrics

    async def metrics(self, name: str, caller: Caller) -> ZoneMetricsData:
        """The zone's figures: libvirt's view of its QEMU and the agent's last report."""
        zone = self.zone_for(name, caller)
        record = zone.record
        cpu_time_s: float | None = None
        rss_kib: int | None = None
        if lifecycle.runs_domain(record.state):
            try:
                stats = await self.hv.stats(record.domain_name)
            except ZonedError as exc:
                log.info("no libvirt stats for %s: %s", name, exc)
            else:
                if stats.active:
                    cpu_time_s = stats.cpu_time_ns / 1e9
                    rss_kib = stats.rss_kib
        beat = zone.last_heartbeat
        guest = None
        if beat is not None and lifecycle.is_ready(record.state):
            guest = guest_metrics(beat, zone.last_heartbeat_at)
        return ZoneMetricsData(
            name=record.name,
            state=record.state,
            sampled_at=time.time(),
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            cpu_time_s=cpu_time_s,
            host_rss_kib=rss_kib,
            execs_running=len(zone.agent.execs) if zone.agent is not None else 0,
            guest=guest,
            net=await self._net_metrics(name),
        )

    # ------------------------------------------------------------------ exec

    async def start_exec(self, name: str, request: Exec | RunZone, caller: Caller) -> ExecSession:
        """Start a process in a ready zone; the session streams it."""
        zone = self.zone_for(name, caller)
        agent = zone.agent
        if not lifecycle.is_ready(zone.record.state) or agent is None:
            raise Conflict(
                f"zone {name!r} is {zone.record.state}, not ready: it cannot run processes"
            )

        template = await self._agent_exec(zone.record, request)

        def start(exec_id: int) -> AgentExecStart:
            return msgspec.structs.replace(template, exec_id=exec_id)

        try:
            return await agent.start_exec(start)
        except AgentFault as exc:
            raise HypervisorError(f"zone {name!r}: {exc}") from exc

    async def _agent_exec(self, record: ZoneRecord, request: Exec | RunZone) -> AgentExecStart:
        """What the agent starts for ``request``: the image's settings under the request's.

        The older ``cwd``/``uid``/``gid`` count as given when they are not
        their defaults; the newer ``workdir``/``user`` win over them.
        """
        image = record.image or BUILTIN_IMAGE
        config, accounts = await self.images.settings(record.image_id)
        workdir = request.workdir
        if workdir is None and request.cwd != "/":
            workdir = request.cwd
        user = request.user
        if user is None and (request.uid or request.gid):
            user = f"{request.uid}:{request.gid}"
        spec = request_process(
            image,
            config,
            accounts,
            argv=request.argv,
            entrypoint=request.entrypoint,
            env=request.env,
            working_dir=workdir,
            user=user,
            whole_command=isinstance(request, Exec),
        )
        start = AgentExecStart(
            exec_id=1,
            argv=spec.argv,
            env=dict(entry.split("=", 1) for entry in spec.env),
            cwd=spec.cwd,
            uid=spec.uid,
            gid=spec.gid,
            groups=spec.additional_gids,
            stdin=request.stdin,
            tty=request.tty,
            rows=request.rows,
            cols=request.cols,
            memory_limit_mib=request.memory_limit_mib,
            pids_limit=request.pids_limit,
            no_new_privs=request.no_new_privs,
            agent_tools=request.agent_tools,
        )
        try:
            # What the agent's decoder would refuse must be refused here: the
            # image's settings (its Env, its accounts) are bounded nowhere else.
            decode_to_agent(encode(start))
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"image {image}: the process does not fit the agent protocol: {exc.message}"
            ) from None
        return start

    # --------------------------------------------------------- libvirt events

    async def handle_domain_event(self, event: DomainEvent) -> None:
        if not event.name.startswith(self.domain_prefix):
            return
        zone = self._by_domain(event.name)
        if zone is None or event.kind not in ("stopped", "crashed", "shutdown"):
            return
        if self._claim_failure(zone):
            if zone.supervisor is not None:
                zone.supervisor.cancel()
            crashed = event.kind == "crashed"
            await self._fail(
                zone,
                "domain_crashed" if crashed else "domain_stopped",
                "domain_crashed" if crashed else "domain_stopped",
                f"{event.kind}: {event.detail}",
                stop=f"{event.kind}: {event.detail}",
            )

    async def resync(self) -> None:
        """After a (re)connection: zones whose domain vanished meanwhile are failed,
        destroys that libvirt's absence interrupted are finished."""
        domains = await self.hv.list_domains(self.domain_prefix)
        running = {d.name for d in domains if d.active}
        assert self._nursery is not None
        for zone in list(self.zones.values()):
            record = zone.record
            if lifecycle.runs_domain(record.state) and record.domain_name not in running:
                if self._claim_failure(zone):
                    if zone.supervisor is not None:
                        zone.supervisor.cancel()
                    await self._fail(
                        zone,
                        "domain_vanished",
                        "channel_closed",
                        "QEMU domain vanished while libvirt was unreachable",
                        stop="vanished",
                    )
            elif record.state == "stopping" and not zone.lock.locked():
                # Its destroy failed (libvirt was unreachable): finish it now.
                self._nursery.start_soon(self._finish_destroy, record.name)

    # ------------------------------------------------------------- run / adopt

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Adopt what is running, then supervise zones until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.records.run)
            await self._adopt()
            nursery.start_soon(self.forward_net_events)
            task_status.started()
            await trio.sleep_forever()

    async def _adopt(self) -> None:
        records = await self.records.load_all()
        domains = {
            d.name: d
            for d in await self.hv.list_domains(self.domain_prefix, metadata_uri=METADATA_NS)
            if d.state in ("running", "blocked", "paused")
        }
        records, dropped = one_record_per_domain(records)
        for name in dropped:
            log.warning("zone record %s dropped: its domain was acquired under another name", name)
            await self.records.delete(name).wait()
        # Domains whose record was lost: rebuild it from the domain's metadata.
        recorded = {record.domain_name for record in records.values()}
        for summary in domains.values():
            if summary.name in recorded:
                continue
            try:
                text = read_metadata(await self.hv.xml(summary.name))
                if text is None:
                    log.error("domain %s carries no zone record", summary.name)
                    continue
                found = decode_record(text)
                if found.owner != self.owner:
                    log.info("domain %s belongs to another zoned (%s)", summary.name, found.owner)
                    continue
                records[found.name] = found
                log.warning("zone %s re-created from its domain metadata", found.name)
            except (msgspec.DecodeError, ZonedError) as exc:
                log.error("domain %s carries no usable zone record: %s", summary.name, exc)
        await trio.to_thread.run_sync(self._remove_leftovers, list(records.values()))
        await trio.to_thread.run_sync(
            self._remove_stale_scratch_disks,
            {Path(r.scratch_disk) for r in records.values() if r.scratch_disk},
        )
        for zone_name, record in sorted(records.items()):
            if record.state == "stopped":
                # Destroyed; the daemon stopped before the record was removed.
                await self.records.delete(zone_name).wait()
                continue
            zone = _Zone(record)
            self.zones[zone_name] = zone
            self.images.adopt(zone_name, record.image_id)
            if lifecycle.is_terminal(record.state):
                zone.settled.set()
                continue
            running = record.domain_name in domains
            if running:
                self.allocator.adopt(placement_from_record(zone_name, record.placement))
                zone.holds_placement = True
                if record.qemu_uid is not None:
                    try:
                        self.qemu_ids.adopt(zone_name, record.qemu_uid)
                    except Conflict as exc:
                        # Only hand-edited records get here; the zones still run.
                        log.error("re-adopting %s: %s", zone_name, exc.message)
                await self._adopt_network(zone)
            if record.state == "stopping":
                # A destroy was cut short by the restart (or by libvirt); finish it.
                assert self._nursery is not None
                self._nursery.start_soon(self._finish_destroy, zone_name)
                continue
            if not running:
                if self._claim_failure(zone):
                    await self._fail(
                        zone,
                        "domain_vanished",
                        "channel_closed",
                        "the domain ended while zoned was not running",
                        stop="vanished",
                    )
                else:
                    self._set(
                        zone, "domain_vanished", "domain vanished while zoned was not running"
                    )
                continue
            zone.qemu_pid = await self.hv.qemu_pid(record.domain_name)
            self._set(zone, "resumed_after_restart")
            if lifecycle.is_quarantined(record.state):
                continue  # still paused: nothing to hear from
            self._start_supervisor(zone, self.config.boot_timeout_s)
        # Taps, helpers and the table that no adopted zone claims.
        for leftover in await self.nethost.reclaim():
            log.info("removed %s, left by a zone that is gone", leftover)

    async def _adopt_network(self, zone: _Zone) -> None:
        """A running zone's network again: its tap (QEMU holds it), rules, a new helper.

        A quarantined zone's stays cut: no rule, no publish.
        """
        network = zone.record.network
        if network is None:
            return
        if lifecycle.is_quarantined(zone.record.state):
            network = msgspec.structs.replace(network, policy=NetPolicy(), publishes=[])
        try:
            await self.nethost.adopt(network)
        except ZonedError as exc:
            # Its rules may be gone: it has no network (closed, never open).
            log.error("re-adopting the network of %s failed: %s", zone.record.name, exc)
            self._update(zone, net_status="failed")
            self.hub.publish(
                "net_status",
                zone=zone.record.name,
                state="failed",
                reason=f"not re-adopted after a restart: {exc.message}",
                owner_uid=zone.record.owner_uid,
            )
        else:
            self._update(zone, net_status="up")

    def _remove_leftovers(self, known: builtins.list[ZoneRecord]) -> None:
        """Runtime directories and pids cgroups of zones that are gone (a crash
        between a domain's end and its cleanup). Blocking: run in a worker thread."""
        zones = Path(self.config.runtime_dir) / "zones"
        dirs = {Path(record.agent_socket).parent.name for record in known}
        if zones.is_dir():
            for entry in zones.iterdir():
                if entry.name not in dirs:
                    log.info("removing %s, left by a zone that is gone", entry)
                    shutil.rmtree(entry, ignore_errors=True)
        keep = {record.domain_name for record in known}
        for name in cgroups.remove_stale_cgroups(self.cgroup_root, self.domain_prefix, keep):
            log.info("removed the pids cgroup of %s, a zone that is gone", name)

    def _remove_stale_scratch_disks(self, keep: set[Path]) -> None:
        """Scratch disks of zones that are gone (a crash between a destroy and its
        cleanup). Blocking: run in a worker thread."""
        for path in scratch.remove_stale(Path(self.config.scratch_dir), keep):
            log.info("removed %s, the scratch disk of a zone that is gone", path)

    async def _finish_destroy(self, name: str) -> None:
        try:
            await self.destroy(name, DAEMON)
        except ZonedError as exc:
            log.error("finishing destroy of %s failed: %s", name, exc)


def _move_log_dir(old: Path, new: Path) -> None:
    """Rename a zone's log directory (one file system: virtlogd's open console
    log follows). Blocking: run in a worker thread."""
    new.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.rename(old, new)
    with contextlib.suppress(OSError):
        old.parent.rmdir()  # the old name's directory, if no other zone of it left logs


def _nothing() -> None:
    pass


def one_record_per_domain(
    records: dict[str, ZoneRecord],
) -> tuple[dict[str, ZoneRecord], list[str]]:
    """One record per domain, and the names of those dropped: a restart between
    an acquire's two writes leaves the pool zone's record beside the acquired
    one; the acquired one wins."""
    by_domain: dict[str, ZoneRecord] = {}
    for record in records.values():
        other = by_domain.get(record.domain_name)
        if other is None or (other.pool and not record.pool):
            by_domain[record.domain_name] = record
    kept = {record.name: record for record in by_domain.values()}
    return kept, sorted(set(records) - set(kept))
