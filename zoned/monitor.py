"""The daemon's observability: audit records, process events, metrics, logs that outlive zones.

:class:`Monitor` sits between the control socket and the request handlers
(:meth:`Monitor.handle` wraps :meth:`zoned.daemon.Daemon.handle`) and
listens to the event hub. It never changes what a request does.

- **Audit**: every request in :data:`AUDITED` gets one record when it ends:
  its caller (``SO_PEERCRED`` and ``/proc/<pid>/exe``, read at connect
  time), its zone and the zone's uuid, its outcome and error code, and for
  a process its argv, cwd, user, terminal, environment by name, and how it
  ended (exit status or signal, OOM, CPU time, peak memory). A caller the
  socket refuses (``permission_denied``) gets a ``denied`` record of what
  it sent first. What a request did is read off the replies it sends
  (:class:`_Progress`), so the handlers know nothing of auditing.
- **Process events**: ``exec_started`` when a process's ``exec_started``
  reply passes, ``exec_ended`` when it ends (same fields as the audit
  record), for ``exec`` and ``run``.
- **Counters** (:class:`~zoned.metrics.Telemetry`): requests by type and
  result, creates and destroys by result, failures by cause (the failed
  zone's diagnosed ``failure``, :mod:`zoned.failures`), agent protocol violations, per-zone process
  counts (forgotten with the zone).
- **Gone zones**: a zone that leaves the manager (destroyed, or its create
  undone) has its ``ended.json`` written after its last records (same
  writer, same order), and the retention runs soon after.
- **Metrics** (``GET /metrics``, :mod:`zoned.httpserve`): a snapshot of the
  manager's zones, the allocator, the counters and the cached libvirt
  statistics, rendered on a worker thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from zoned import lifecycle, zonelogs
from zoned import protocol as p
from zoned.access import AccessPolicy, Caller
from zoned.audit import AuditTrail, exec_record_of, read_records
from zoned.config import Config
from zoned.errors import ConfigError, NotFound, ZonedError, innermost
from zoned.events import EventHub
from zoned.httpserve import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    Router,
    open_http_listeners,
    parse_listen_address,
    serve_http,
    unlink_socket,
)
from zoned.journal import open_journal
from zoned.metrics import (
    CONTENT_TYPE,
    HostSample,
    Snapshot,
    StatsCache,
    Telemetry,
    ZoneCounters,
    ZoneSample,
    render,
)
from zoned.placement import Allocator
from zoned.records import ZoneRecord
from zoned.virt import Hypervisor

if TYPE_CHECKING:
    from zoned.zones import ZoneManager

log = logging.getLogger(__name__)

#: Requests that change or run something: each gets an audit record.
AUDITED: Final = frozenset(
    {
        "create_zone",
        "destroy_zone",
        "exec",
        "run_zone",
        "quarantine_zone",
        "set_pool",
        "remove_pool",
    }
)
#: A process's stderr that the daemon itself wrote, kept as its start error.
_MAX_ERROR_CHARS: Final = 1024

Send = Callable[[p.Reply], Awaitable[None]]


def op_of(request: p.Request) -> str:
    return str(type(request).__struct_config__.tag)


def caller_info(caller: Caller) -> p.CallerInfo:
    """A caller as the audit trail and the events name it."""
    return p.CallerInfo(uid=caller.uid, gid=caller.gid, pid=caller.pid, exe=caller.exe)


def _zone_of(request: p.Request) -> str:
    match request:
        case p.CreateZone() | p.DestroyZone() | p.QuarantineZone():
            return request.name
        case p.Exec():
            return request.zone
        case p.RunZone():
            return request.name
        case _:
            return ""


def _exec_of(request: p.Request) -> p.ExecRecord | None:
    if not isinstance(request, p.Exec | p.RunZone):
        return None
    return exec_record_of(
        request.argv,
        cwd=request.workdir or request.cwd,
        user=request.user,
        entrypoint=request.entrypoint,
        uid=request.uid,
        gid=request.gid,
        tty=request.tty,
        stdin=request.stdin,
        env_names=request.env.keys(),
        memory_limit_mib=request.memory_limit_mib,
        pids_limit=request.pids_limit,
    )


@dataclass
class _Progress:
    """What one audited request did, as its replies tell it."""

    request: p.Request
    caller: p.CallerInfo
    #: Whether the caller may see a zone of that owner (its uuid goes in the record).
    may_see: Callable[[int], bool]
    started: float = field(default_factory=time.monotonic)
    zone: str = ""
    zone_uuid: str = ""
    owner_uid: int | None = None
    exec: p.ExecRecord | None = None
    exec_started: bool = False
    exec_ended: bool = False
    created: bool = False
    start_error: str = ""
    bundle: str = ""

    def __post_init__(self) -> None:
        self.zone = _zone_of(self.request)
        self.exec = _exec_of(self.request)

    def saw_zone(self, zone: p.ZoneInfo) -> None:
        self.zone, self.zone_uuid, self.owner_uid = zone.name, zone.uuid, zone.owner_uid

    def finish_exec(self, **changes: object) -> p.ExecRecord | None:
        if self.exec is None or self.exec_ended:
            return None
        self.exec_ended = True
        duration = round(time.monotonic() - self.started, 6)
        self.exec = msgspec.structs.replace(self.exec, duration_s=duration, **changes)
        return self.exec


#: How an exec ended, as its record keeps it (the exit's fields the record has).
_EXIT_IN_RECORD: Final = tuple(
    field for field in p.ExecExit.__struct_fields__ if field in p.ExecRecord.__struct_fields__
)


class Monitor:
    """Audit, events, counters, retention and the metrics endpoint of one daemon."""

    def __init__(
        self,
        config: Config,
        hv: Hypervisor,
        hub: EventHub,
        allocator: Allocator,
        policy: AccessPolicy,
        *,
        accelerator: str,
        started_at: float,
    ) -> None:
        self.config = config
        self.hub = hub
        self.allocator = allocator
        self.policy = policy
        self.accelerator = accelerator
        self.started_at = started_at
        self.log_dir = Path(config.log_dir)
        journal = None
        if config.audit_journal == "auto":
            journal = open_journal(Path(config.journal_socket))
            if journal is None:
                log.info(
                    "no journald at %s: the audit trail goes to %s only",
                    config.journal_socket,
                    self.log_dir / "audit.jsonl",
                )
            else:
                log.info("audit records also go to the journal (%s)", config.journal_socket)
        self.trail = AuditTrail(
            self.log_dir, config.audit_max_bytes, config.audit_max_files, journal
        )
        self.telemetry = Telemetry()
        prefix = config.domain_prefix
        self.stats = StatsCache(
            lambda: hv.all_domain_stats(prefix),
            max_age_s=config.metrics_stats_max_age_s,
            wait_s=config.metrics_stats_wait_s,
        )
        self.retention = zonelogs.Retention(
            max_age_s=config.log_retention_s,
            max_bytes=config.log_retention_max_bytes,
            max_zones=config.log_retention_max_zones,
        )
        self.manager: ZoneManager | None = None
        #: The warm pools' figures (zoned.pools.PoolKeeper.infos), once they run.
        self.pool_infos: Callable[[], list[p.PoolInfo]] = list
        # The last uuid and record of each zone name seen in an event: a zone's
        # last events are published after it left the manager.
        self._last: dict[str, ZoneRecord] = {}
        self._prune_soon = trio.Event()
        self.metrics_address = ""
        hub.add_listener(self._on_event)

    # ------------------------------------------------------------ running

    async def run(
        self, manager: ZoneManager, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.manager = manager
        async with trio.open_nursery() as nursery:
            await nursery.start(self.trail.run)
            await nursery.start(self.stats.run)
            nursery.start_soon(self._keep_retention)
            if self.config.metrics_enabled:
                await nursery.start(self._serve_metrics)
            task_status.started()

    async def _serve_metrics(self, *, task_status: trio.TaskStatus[None]) -> None:
        address = parse_listen_address(self.config.metrics_listen)
        try:
            listeners = await open_http_listeners(address, socket_gid=self.policy.socket_gid)
        except OSError as exc:
            raise ConfigError(
                f"metrics_listen = {self.config.metrics_listen!r}: cannot listen there: {exc}"
                " (under zoned.service, IP needs a drop-in: see docs/observability.md)"
            ) from exc
        router = Router()
        router.add("/metrics", self._metrics_page)
        if address.path:
            self.metrics_address = address.path
        else:
            host, port = listeners[0].socket.getsockname()[:2]
            self.metrics_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics on http://%s/metrics", self.metrics_address)
        try:
            await serve_http(listeners, router, HttpLimits(), task_status=task_status)
        finally:
            unlink_socket(address)

    async def _keep_retention(self) -> None:
        while True:
            with trio.move_on_after(self.config.log_retention_interval_s):
                await self._prune_soon.wait()
            self._prune_soon = trio.Event()
            await self.trail.barrier()  # gone zones' ended.json first
            live = self._live_uuids()
            names = list(self.manager.zones) if self.manager is not None else []
            try:
                await trio.to_thread.run_sync(
                    zonelogs.prune, self.log_dir, live, time.time(), self.retention, names
                )
            except OSError as exc:
                log.warning("log retention failed: %s", exc)

    def _live_uuids(self) -> set[str]:
        manager = self.manager
        return {zone.record.uuid for zone in manager.zones.values()} if manager else set()

    # ------------------------------------------------------------ requests

    async def handle(
        self,
        request: p.Request,
        send: Send,
        caller: Caller,
        handler: Callable[[p.Request, Send], Awaitable[None]],
    ) -> None:
        """Run ``handler`` for ``request``; count it, and audit it if it changes something."""
        op = op_of(request)
        if op not in AUDITED:
            try:
                await handler(request, send)
            except BaseException as exc:
                self.telemetry.requests[(op, _result_of(exc))] += 1
                raise
            self.telemetry.requests[(op, "ok")] += 1
            return
        progress = _Progress(
            request, caller_info(caller), lambda owner: self.policy.may_act_on(caller, owner)
        )

        async def watched_send(reply: p.Reply) -> None:
            self._saw_reply(progress, reply)
            await send(reply)

        try:
            await handler(request, watched_send)
        except BaseException as raised:
            self._ended(progress, innermost(raised))
            raise
        self._ended(progress, None)

    def _saw_reply(self, progress: _Progress, reply: p.Reply) -> None:
        match reply:
            case p.ZoneReply(zone=zone):
                progress.saw_zone(zone)
                if isinstance(progress.request, p.RunZone) and not progress.created:
                    progress.created = True
                    self.telemetry.creates["ok"] += 1
            case p.QuarantineReply(zone=zone, bundle=bundle):
                progress.saw_zone(zone)
                progress.bundle = bundle.path
            case p.ExecStarted(pid=pid) if progress.exec is not None:
                progress.exec_started = True
                progress.exec = msgspec.structs.replace(progress.exec, pid=pid)
                uuid = progress.zone_uuid or self._visible_uuid(progress)
                if uuid:
                    self.telemetry.zone(uuid).execs_started += 1
                self.hub.publish(
                    "exec_started",
                    zone=progress.zone,
                    exec=progress.exec,
                    caller=progress.caller,
                    zone_uuid=uuid,
                )
            case p.ExecOutput(stream="stderr", data=data) if not progress.exec_started:
                # Before a start, only the daemon writes: why it could not start.
                progress.start_error = data.decode(errors="replace").strip()[:_MAX_ERROR_CHARS]
            case p.ExecExit():
                self._exec_ended(progress, reply, None)
            case _:
                pass

    def _exec_ended(
        self, progress: _Progress, exit: p.ExecExit | None, error: ZonedError | None
    ) -> None:
        uuid = progress.zone_uuid or self._visible_uuid(progress)
        if exit is not None:
            # The record keeps how it ended as the exit says it (ExecRecord's
            # fields of the same names).
            ended = progress.finish_exec(
                **{field: getattr(exit, field) for field in _EXIT_IN_RECORD},
                error="" if progress.exec_started else progress.start_error,
            )
        else:
            ended = progress.finish_exec(error=error.message if error else "cancelled")
        if ended is None:
            return
        reached_zone = progress.exec_started or exit is not None
        if uuid and reached_zone:
            # A refusal by the daemon (no such zone, not ready) is no process.
            counters = self.telemetry.zone(uuid)
            if not progress.exec_started:  # the agent could not start it
                counters.execs_started += 1
                counters.execs_failed += 1
            elif exit is None:  # its end is unknown (the zone went)
                counters.execs_failed += 1
            if ended.oom_killed:
                counters.execs_oom_killed += 1
        if reached_zone:
            self.hub.publish(
                "exec_ended",
                zone=progress.zone,
                exec=ended,
                caller=progress.caller,
                zone_uuid=uuid,
            )

    def _ended(self, progress: _Progress, raised: BaseException | None) -> None:
        request, op = progress.request, op_of(progress.request)
        error = raised if isinstance(raised, ZonedError) else None
        result = _result_of(raised)
        self.telemetry.requests[(op, result)] += 1
        if isinstance(request, p.CreateZone) or (
            isinstance(request, p.RunZone) and not progress.created
        ):
            self.telemetry.creates[result] += 1
        elif isinstance(request, p.DestroyZone):
            self.telemetry.destroys[result] += 1
        elif isinstance(request, p.QuarantineZone):
            self.telemetry.quarantines[result] += 1
        if progress.exec is not None and not progress.exec_ended:
            self._exec_ended(progress, None, error)
        if progress.zone:
            known = self._record_of(progress.zone)
            if (
                known is not None
                and progress.zone_uuid in ("", known.uuid)
                and progress.may_see(known.owner_uid)
            ):
                progress.zone_uuid = known.uuid
                progress.owner_uid = known.owner_uid
        self.trail.record(
            p.AuditRecord(
                time=time.time(),
                op=op,
                outcome="ok" if raised is None else "error",
                caller=progress.caller,
                zone=progress.zone,
                zone_uuid=progress.zone_uuid,
                owner_uid=progress.owner_uid,
                error_code="" if raised is None else result,
                error=_message_of(raised),
                exec=progress.exec,
                bundle=progress.bundle,
            )
        )

    def denied(self, caller: Caller, frame: bytes) -> None:
        """A caller the socket refused: its first message's type, if it decodes."""
        try:
            request = p.decode_request(frame)
        except ZonedError:
            op, zone = "unknown", ""
        else:
            op, zone = op_of(request), _zone_of(request)
        self.telemetry.requests[(op, "permission_denied")] += 1
        self.trail.record(
            p.AuditRecord(
                time=time.time(),
                op=op,
                outcome="denied",
                caller=caller_info(caller),
                zone=zone,
                error_code="permission_denied",
                error=f"uid {caller.uid} is not root and not in the zoned group",
            )
        )

    # ------------------------------------------------------------ zones' events

    def _record_of(self, name: str) -> ZoneRecord | None:
        """The zone of that name now, else the last one seen (its last events come
        after it left the manager)."""
        manager = self.manager
        zone = manager.zones.get(name) if manager is not None else None
        if zone is not None:
            return zone.record
        return self._last.get(name)

    def _uuid_of(self, name: str) -> str:
        record = self._record_of(name)
        return record.uuid if record is not None else ""

    def _visible_uuid(self, progress: _Progress) -> str:
        """The uuid of the request's zone, if its caller may see that zone."""
        record = self._record_of(progress.zone) if progress.zone else None
        if record is None or not progress.may_see(record.owner_uid):
            return ""
        return record.uuid

    def _on_event(self, event: p.Event, zone_uuid: str) -> None:
        if not event.zone:
            return
        manager = self.manager
        zone = manager.zones.get(event.zone) if manager is not None else None
        if zone is not None and (not zone_uuid or zone.record.uuid == zone_uuid):
            self._last[event.zone] = zone.record
        record = self._last.get(event.zone)
        uuid = zone_uuid or (record.uuid if record is not None else "")
        if uuid:
            self.trail.event(event, uuid)
        if event.kind != "zone_state":
            return
        if event.state == "failed" and event.previous != "failed":
            # The zone's diagnosed cause (zoned.failures, the record's
            # ``failure``); a record without one, by the lifecycle input.
            diagnosed = record.failure if record is not None and record.uuid == uuid else ""
            cause = diagnosed or lifecycle.input_of_reason(event.reason) or "unknown"
            self.telemetry.failures[cause] += 1
            if cause == "agent_misbehaved":
                self.telemetry.agent_violations += 1
        gone = zone is None or zone.record.uuid != uuid
        if (
            gone
            and record is not None
            and record.uuid == uuid
            and lifecycle.is_terminal(
                event.state  # type: ignore[arg-type]
            )
        ):
            self._zone_gone(record, event)

    def _zone_gone(self, record: ZoneRecord, event: p.Event) -> None:
        del self._last[record.name]
        self.telemetry.forget_zone(record.uuid)
        # What EndedZone keeps of the record (its fields of the same names, the
        # labels copied), and the end itself as the event says it.
        ended = msgspec.convert(
            msgspec.structs.asdict(record)
            | {"ended_at": event.time, "state": event.state, "reason": event.reason},
            zonelogs.EndedZone,
        )
        log_dir = self.log_dir
        console = Path(record.console_log)

        def mark() -> None:
            directory = zonelogs.zone_log_dir(log_dir, record.name, record.uuid)
            if console.parent != directory and console.exists():
                directory.mkdir(mode=0o750, parents=True, exist_ok=True)
                zonelogs.move_legacy_console_log(console, directory)
            zonelogs.mark_ended(directory, ended)

        self.trail.run_in_order(mark)
        self._prune_soon.set()

    # ------------------------------------------------------------ reading

    async def stream_audit(self, request: p.AuditQuery, send: Send, caller: Caller) -> None:
        """The records ``caller`` may see, in batches; file reads on worker threads."""
        await self.trail.barrier()
        visible = _visibility(caller, self.policy)
        records = read_records(
            self.log_dir,
            self.config.audit_max_files,
            zone=request.zone,
            since=request.since,
            visible=visible,
        )
        try:
            while batch := await trio.to_thread.run_sync(
                lambda: list(itertools.islice(records, p.MAX_AUDIT_BATCH))
            ):
                await send(p.AuditReply(id=request.id, records=batch))
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(records.close)
        await send(p.StreamEnd(id=request.id))

    async def kept_console_log(self, name: str, uuid: str | None, caller: Caller) -> list[Path]:
        """The console files of a gone zone called ``name`` (that ``uuid``, else the
        newest) that ``caller`` may see: another user's gone zone does not exist for it."""
        live = self._live_uuids()
        found = await trio.to_thread.run_sync(zonelogs.find_kept, self.log_dir, name, uuid, live)
        owner = found.ended.owner_uid if found is not None and found.ended is not None else None
        if found is not None and not self.policy.may_act_on(caller, owner or 0):
            found = None
        if found is None:
            which = f" with uuid {uuid}" if uuid else ""
            raise NotFound(f"no zone named {name!r}{which}, and no kept logs of one")
        return await trio.to_thread.run_sync(zonelogs.console_files, found.path)

    # ------------------------------------------------------------ metrics

    async def _metrics_page(self, request: HttpRequest) -> HttpResponse:
        snapshot = await self.snapshot()
        body = await trio.to_thread.run_sync(render, snapshot)
        return HttpResponse(status=200, body=body, content_type=CONTENT_TYPE)

    async def snapshot(self) -> Snapshot:
        stats = await self.stats.current()
        manager = self.manager
        zones = []
        # The networked zones' counters: the helpers' last reports (at most a
        # second old), read without waiting (a scrape never waits for a zone).
        nethost = manager.nethost if manager is not None else None
        networked = set(nethost.zones()) if nethost is not None else set()
        for zone in list(manager.zones.values()) if manager is not None else []:
            record = zone.record
            net = None
            if nethost is not None and record.name in networked:
                net = nethost.counters(record.name)
            guest = None
            if zone.last_heartbeat is not None and lifecycle.is_ready(record.state):
                guest = p.guest_metrics(zone.last_heartbeat, zone.last_heartbeat_at)
            sampled = stats.get(record.domain_name) if lifecycle.runs_domain(record.state) else None
            zones.append(
                ZoneSample(
                    name=record.name,
                    uuid=record.uuid,
                    state=record.state,
                    profile=record.profile,
                    vcpus=record.vcpus,
                    memory_mib=record.memory_mib,
                    machine=record.machine,
                    accelerator=record.accelerator,
                    created_at=record.created_at,
                    owner_uid=record.owner_uid,
                    image=record.image,
                    pool=record.pool or record.from_pool,
                    kernel_release=record.kernel_release,
                    ready_at=record.ready_at,
                    guest_boot_s=record.guest_boot_s,
                    host=sampled,
                    host_sampled_at=self.stats.sampled_at if sampled is not None else None,
                    guest=guest,
                    heartbeat_at=zone.last_heartbeat_at if zone.last_heartbeat else None,
                    execs_running=len(zone.agent.execs) if zone.agent is not None else 0,
                    counters=self.telemetry.zones.get(record.uuid) or _NO_COUNTS,
                    net=net,
                )
            )
        allocation = self.allocator.snapshot()
        topology = self.allocator.topology
        trail = self.trail.stats
        host = HostSample(
            cpus_online=sum(1 for cpu in topology.cpus if cpu.online),
            cpus_reserved=len(set(self.config.reserved_cpus)),
            cpus_free_exclusive=len(allocation.free_exclusive_cpus),
            cpus_shared_pool=len(allocation.shared_pool),
            memory_total_mib=topology.memory_total_mib,
            memory_reserved_mib=self.config.reserved_memory_mib,
            memory_free_mib=allocation.memory_free_mib,
            started_at=self.started_at,
            accelerator=self.accelerator,
            audit_written=trail.written,
            audit_dropped=trail.dropped,
            audit_write_errors=trail.write_errors,
            journal=self.trail.journal is not None,
            stats_refreshes=self.stats.refreshes,
            stats_failures=self.stats.failures,
            stats_refresh_seconds=self.stats.last_refresh_s,
        )
        return Snapshot(
            now=time.time(),
            host=host,
            zones=zones,
            telemetry=self.telemetry,
            pools=self.pool_infos(),
        )


_NO_COUNTS: Final = ZoneCounters()


def _result_of(exc: BaseException | None) -> str:
    exc = innermost(exc) if exc is not None else None
    if exc is None:
        return "ok"
    if isinstance(exc, ZonedError):
        return exc.code
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        return "disconnected"
    return "internal"


def _message_of(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, ZonedError):
        return exc.message[: p.MAX_ERROR_MESSAGE_CHARS]
    if isinstance(exc, trio.Cancelled):
        return "the request was cancelled (the client went away, or the daemon stopped)"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        return "the client went away"
    return "internal error; see the daemon log"


def _visibility(caller: Caller, policy: AccessPolicy) -> Callable[[p.AuditRecord], bool]:
    """Root and administrators see every record; anybody else their own requests'
    and their own zones'."""
    if policy.sees_all(caller):
        return lambda _record: True
    uid = caller.uid
    return lambda record: record.caller.uid == uid or record.owner_uid == uid
