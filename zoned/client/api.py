"""The async client's API: one method per control-socket request, processes, files.

:class:`Client` is a :class:`~zoned.client.connection.Connection` (the
socket and its reply routing) with the requests on top; its file methods
come from :class:`~zoned.client.files.FileTransfer`, its image calls from
:class:`~zoned.client.images.ImageCalls`. Options of processes and zones are
the TypedDicts of :mod:`zoned.client.options`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from zoned import protocol as p
from zoned.client.connection import STREAM_BUFFER, Connection, expect
from zoned.client.files import FileTransfer
from zoned.client.images import ImageCalls
from zoned.client.options import net_rules, wire_request
from zoned.client.process import ExecResult, Process

if TYPE_CHECKING:
    from typing import Unpack

    from zoned.client.options import (
        CreateOptions,
        ExecOptions,
        ProcessOptions,
        RunExecOptions,
        RunProcessOptions,
    )


class Client(FileTransfer, ImageCalls, Connection):
    """A connection to zoned: ``async with Client(path) as client``.

    ``path`` defaults to :func:`~zoned.client.default_socket_path`;
    ``client_name`` is what the daemon logs. Nothing happens until it is
    entered, which connects and shakes hands, raising
    :class:`~zoned.client.DaemonUnavailable`, the daemon's error (e.g.
    :class:`~zoned.errors.PermissionDenied`,
    :class:`~zoned.errors.UnsupportedVersion`) or
    :class:`~zoned.client.ConnectionLost`. After entering, :attr:`server` and
    :attr:`version` hold what the daemon said in its hello reply. Every
    method may raise the typed :class:`~zoned.errors.ZonedError` the daemon
    answered with, or a :class:`~zoned.client.ClientError`.
    """

    # ------------------------------------------------------------ zones

    async def host_info(self) -> p.HostInfoData:
        """The host: accelerator, CPUs, NUMA nodes, free capacity, kernels."""
        reply = await self._call(lambda id: p.HostInfo(id=id))
        return expect(reply, p.HostInfoReply).host

    async def create_zone(self, name: str, **options: Unpack[CreateOptions]) -> p.ZoneInfo:
        """Create and boot a zone; returns once it is ready (the daemon raises if it fails).

        The daemon validates every value; bad ones are
        :class:`~zoned.errors.InvalidRequest`.
        """
        reply = await self._call(lambda id: wire_request(p.CreateZone, id, options, name=name))
        return expect(reply, p.ZoneReply).zone

    async def get_zone(self, name: str) -> p.ZoneInfo:
        """One zone; :class:`~zoned.errors.NotFound` if there is none by that name."""
        reply = await self._call(lambda id: p.GetZone(id=id, name=name))
        return expect(reply, p.ZoneReply).zone

    async def list_zones(self, labels: Mapping[str, str] | None = None) -> list[p.ZoneInfo]:
        """Every zone carrying all of ``labels`` (every zone when empty)."""
        label_dict = dict(labels or {})
        reply = await self._call(lambda id: p.ListZones(id=id, labels=label_dict))
        return expect(reply, p.ZoneListReply).zones

    async def destroy_zone(self, name: str) -> p.ZoneInfo:
        """Stop a zone for good; returns its final record (state ``stopped``)."""
        reply = await self._call(lambda id: p.DestroyZone(id=id, name=name))
        return expect(reply, p.ZoneReply).zone

    # ------------------------------------------------------------ pools

    async def set_pool(self, name: str, spec: p.PoolSpec) -> p.PoolInfo:
        """Create or change a warm pool (root and administrators); it fills in the
        background. A template the host cannot serve is InvalidRequest."""
        reply = await self._call(lambda id: p.SetPool(id=id, name=name, spec=spec))
        return expect(reply, p.PoolReply).pool

    async def list_pools(self) -> list[p.PoolInfo]:
        """Every warm pool: its template, ready and booting zones, hits, misses, failures."""
        reply = await self._call(lambda id: p.ListPools(id=id))
        return expect(reply, p.PoolListReply).pools

    async def remove_pool(self, name: str) -> p.PoolInfo:
        """Remove a warm pool; its unused zones are destroyed in the background."""
        reply = await self._call(lambda id: p.RemovePool(id=id, name=name))
        return expect(reply, p.PoolReply).pool

    def watch_events(
        self, zones: Sequence[str] = (), kinds: Sequence[p.EventKind] = ()
    ) -> AsyncGenerator[p.Event, None]:
        """Events from now on, until the connection closes or the daemon cuts the stream.

        ``zones``: only those zones' events; ``kinds``: only those kinds (by
        default the daemon sends :data:`~zoned.protocol.DEFAULT_EVENT_KINDS`;
        name ``exec_started``/``exec_ended`` to get process events, ``net_refused``/
        ``net_status`` to get network events). An async
        generator: close it when you stop early
        (``async with contextlib.aclosing(client.watch_events()) as events``).
        """
        zone_list, kind_list = list(zones), list(kinds)
        return self._stream_of(
            lambda id: p.WatchEvents(id=id, zones=zone_list, kinds=kind_list),
            lambda reply: expect(reply, p.EventReply).event,
        )

    async def set_zone_net(
        self,
        name: str,
        net: str | Iterable[str] | None = None,
        publishes: Iterable[str] | None = None,
    ) -> tuple[p.ZoneInfo, int]:
        """A running networked zone's new policy (``net``, as in
        :class:`~zoned.client.options.ZoneOptions`; None: kept, ``"none"``:
        nothing allowed) and/or publishes (None: kept), without a restart.

        Returns the zone and how many open connections the new policy closed.
        """
        rules = None if net is None else (net_rules(net) or [])
        published = None if publishes is None else list(publishes)
        reply = await self._call(
            lambda id: p.SetZoneNet(id=id, name=name, net=rules, publishes=published)
        )
        answer = expect(reply, p.ZoneNetReply)
        return answer.zone, answer.connections_closed

    def console_log(
        self,
        name: str,
        follow: bool = False,
        tail_bytes: int | None = None,
        *,
        uuid: str | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """A zone's serial console output as raw byte chunks (not lines, not UTF-8).

        Without ``follow`` it ends at the log's current end; with it, it goes
        on until closed. ``tail_bytes`` starts that many bytes before the end.
        A destroyed zone's log is kept for the daemon's retention: the newest
        zone of that name, or the one with ``uuid``. An async generator:
        close it when you stop early (``contextlib.aclosing``).
        """
        return self._stream_of(
            lambda id: p.ConsoleLog(
                id=id, name=name, follow=follow, tail_bytes=tail_bytes, uuid=uuid
            ),
            lambda reply: expect(reply, p.LogChunk).data,
        )

    async def audit(
        self, zone: str = "", since: float | None = None
    ) -> AsyncGenerator[p.AuditRecord, None]:
        """The audit trail's records this caller may see, oldest first: of ``zone``
        only, from Unix time ``since`` on."""
        batches = self._stream_of(
            lambda id: p.AuditQuery(id=id, zone=zone, since=since),
            lambda reply: expect(reply, p.AuditReply).records,
        )
        try:
            async for batch in batches:
                for record in batch:
                    yield record
        finally:
            await batches.aclose()

    async def quarantine_zone(self, name: str, *, destroy: bool = False) -> p.QuarantineReply:
        """Freeze a zone now and collect its evidence; the zone and the bundle.

        Takes as long as the guest's memory takes to write (seconds per GiB).
        With ``destroy`` the zone is destroyed afterwards.
        """
        reply = await self._call(lambda id: p.QuarantineZone(id=id, name=name, destroy=destroy))
        return expect(reply, p.QuarantineReply)

    async def zone_metrics(self, name: str) -> p.ZoneMetricsData:
        """A zone's CPU time and memory as the host sees them, and the guest's own report."""
        reply = await self._call(lambda id: p.ZoneMetrics(id=id, name=name))
        return expect(reply, p.ZoneMetricsReply).metrics

    # ------------------------------------------------------------ processes

    def exec_process(
        self, zone: str, argv: Sequence[str], **options: Unpack[ProcessOptions]
    ) -> AbstractAsyncContextManager[Process]:
        """Start ``argv`` in a ready zone; use as ``async with``.

        Iterate the :class:`Process` for its output as it comes; then
        :attr:`Process.result` holds how it ended. With ``stdin=True`` feed it
        with :meth:`Process.write` and :meth:`Process.close_stdin`. With
        ``tty=True`` it runs on a ``rows`` x ``cols`` pseudo-terminal (all its
        output arrives as ``stdout``; :meth:`Process.resize` changes the size).
        ``memory_limit_mib`` and ``pids_limit`` bound the process and
        everything it starts (its own cgroup in the zone).
        """
        return self._process(lambda id: wire_request(p.Exec, id, options, zone=zone, argv=argv))

    def run_process(
        self, argv: Sequence[str], **options: Unpack[RunProcessOptions]
    ) -> AbstractAsyncContextManager[Process]:
        """Like :meth:`exec_process`, in a fresh zone the daemon destroys afterwards.

        :attr:`Process.zone` is the zone once it is ready. ``timeout_s`` is how
        long the process may run, from its start (the boot is not counted);
        when it passes the process is killed (``result.exit.timed_out``). The
        zone is destroyed even if this client goes away.
        """
        return self._process(lambda id: wire_request(p.RunZone, id, options, argv=argv))

    @asynccontextmanager
    async def _process(self, build: Callable[[int], p.Request]) -> AsyncIterator[Process]:
        request_id, replies = await self._start(build, STREAM_BUFFER, stream=True)
        try:
            with replies:
                yield Process(self, request_id, replies)
        finally:
            self._forget(request_id)

    async def exec(
        self,
        zone: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        **options: Unpack[ExecOptions],
    ) -> ExecResult:
        """Run ``argv`` in a ready zone to its end; its output collected in memory."""
        async with self.exec_process(zone, argv, stdin=input is not None, **options) as process:
            return await process.communicate(input)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        **options: Unpack[RunExecOptions],
    ) -> ExecResult:
        """Boot a fresh zone, run ``argv`` in it to its end, destroy the zone."""
        async with self.run_process(argv, stdin=input is not None, **options) as process:
            return await process.communicate(input)
