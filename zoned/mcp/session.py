"""One MCP session's zones on one connection to zoned: the IO shell of the tools.

A :class:`Session` holds one :class:`~zoned.client.Client` for the life of
the MCP session and does each tool call with it; what the arguments mean and
how results look is :mod:`zoned.mcp.tools`.

How a session's zones end with it, whatever happens:

- A session zone is the zone of a ``run_zone`` request whose process (the
  *anchor*, ``sh -c 'read -r _'`` with its stdin kept open) lives as long as
  the session wants the zone. The daemon destroys a run's zone when its
  process ends or when the client's connection goes away, so the zones go
  when this process does, even by SIGKILL; nothing here has to outlive it.
- Ending a zone (``destroy_zone``, the end of the session) closes its
  anchor's stdin: the anchor ends and the daemon destroys the zone before it
  reports the exit. A zone whose anchor does not end within
  :data:`DESTROY_GRACE_S` is destroyed outright.
- ``run_code`` without a zone is a plain ``run_zone`` (a fresh zone, its
  timeout enforced by the daemon too). Every zone carries the session's
  labels (:data:`~zoned.mcp.tools.LABEL_UID`, ``LABEL_SESSION``), so zones
  that outlived a session anyway (the daemon restarted meanwhile and adopted
  them) are found; the first connection destroys those of dead sessions of
  this uid (``reclaim``).
- Every command runs under its timeout, measured here from its start (the
  boot of a fresh zone is not counted); when it passes the process gets
  SIGKILL. A call that is cancelled (the client cancels it, the session
  ends) kills its process too.
- The connection is made at the first call (or at start) and never remade:
  once lost, the session's zones are gone with it and calls fail saying so.
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import trio

from zoned import protocol as p
from zoned.client import Client, ClientError, FileTooLarge, Process
from zoned.errors import ZonedError, innermost
from zoned.mcp import labels as lb
from zoned.mcp import results as r
from zoned.mcp import tools as t
from zoned.mcp.options import Config

log = logging.getLogger(__name__)

#: The anchor of a session zone: it ends when its stdin closes. Its ``$0``
#: names it for whoever lists the zone's processes.
ANCHOR_ARGV = ["sh", "-c", "read -r _", "zoned-mcp-session-anchor"]
#: The anchor runs as root whatever the image's User (it only waits).
ANCHOR_USER = "0:0"
#: After SIGKILL, how long a process may take to report its end.
KILL_GRACE_S = 10.0
#: After its anchor's stdin closed, how long a zone may take to be destroyed.
DESTROY_GRACE_S = 15.0
#: Zones remembered after they ended, to say why they are gone.
_ENDED_MEMORY = 256

Handler = Callable[[Any], Awaitable[r.ToolResult]]


@dataclass
class SessionZone:
    name: str
    short_name: str
    info: p.ZoneInfo
    anchor: Process
    ended: trio.Event = field(default_factory=trio.Event)


@dataclass
class Outcome:
    """How a process ran, as :meth:`Session._drive` saw it."""

    exit: p.ExecExit
    stdout: r.BoundedOutput
    stderr: r.BoundedOutput
    timed_out: bool


def current_session_id() -> lb.SessionId:
    with open("/proc/self/stat") as stat:
        ticks = lb.process_start_ticks(stat.read())
    if ticks is None:
        raise RuntimeError("cannot read this process's start time from /proc/self/stat")
    return lb.SessionId(os.getpid(), ticks)


def session_alive(session: lb.SessionId) -> bool:
    """Whether the process of ``session`` still runs on this host."""
    try:
        with open(f"/proc/{session.pid}/stat") as stat:
            return lb.process_start_ticks(stat.read()) == session.start_ticks
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave its zones alone


class Session:
    """The zones of one MCP session, and the tools over them.

    ``nursery`` holds the connection and the anchors; it must outlive the
    session (:meth:`close` ends what it started there).
    """

    def __init__(self, config: Config, nursery: trio.Nursery) -> None:
        self.config = config
        self.limits = config.limits
        self.uid = os.getuid()
        self.id = current_session_id()
        self.tag = secrets.token_hex(t.SESSION_TAG_CHARS // 2)
        self.labels = lb.session_labels(self.uid, self.id)
        self.zones: dict[str, SessionZone] = {}
        self._nursery = nursery
        self._client: Client | None = None
        self._connect_lock = trio.Lock()
        self._closing = False
        self._close_connection = trio.Event()
        self._connection_closed = trio.Event()
        self._ended: dict[str, str] = {}
        # Zones booting for create_zone, and the fresh zones of run_code calls.
        self._booting: set[str] = set()
        self._numbers = iter(range(1, 2**31))
        self.handlers: dict[str, Handler] = {
            "create_zone": self.create_zone,
            "list_zones": self.list_zones,
            "destroy_zone": self.destroy_zone,
            "run_command": self.run_command,
            "run_code": self.run_code,
            "write_file": self.write_file,
            "read_file": self.read_file,
            "list_files": self.list_files,
        }

    @property
    def name_prefix(self) -> str:
        return f"{self.limits.zone_prefix}{self.tag}-"

    # ------------------------------------------------------------ connection

    async def client(self) -> Client:
        """The session's connection to zoned, made (and leftovers reclaimed) on first use."""
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._closing:
                raise r.ToolError("zoned-mcp: the session is ending")
            if self._client is None:
                self._connection_closed = trio.Event()
                client: Client = await self._nursery.start(self._hold_connection)
                # Calls wait for the reclaim: what they make is never taken for a leftover.
                if self.config.reclaim:
                    await self._reclaim(client)
                self._client = client
        return self._client

    async def _hold_connection(self, *, task_status: trio.TaskStatus[Client]) -> None:
        try:
            name = f"zoned-mcp session {self.id.label()}"
            async with Client(self.config.socket, client_name=name) as client:
                log.info("connected to %s (%s)", client.path, client.server)
                task_status.started(client)
                await self._close_connection.wait()
        finally:
            self._connection_closed.set()

    async def _reclaim(self, client: Client) -> None:
        """Destroy the zones that dead sessions of this uid left (logged, never fatal)."""
        try:
            zones = await client.list_zones({lb.LABEL_UID: str(self.uid)})
            sessions = {
                owner
                for zone in zones
                if (owner := lb.parse_session_label(zone.labels.get(lb.LABEL_SESSION, "")))
            }
            alive = {owner: session_alive(owner) for owner in sessions}
            leftovers = lb.leftover_zones(zones, self.uid, self.id, alive)
            async with trio.open_nursery() as nursery:
                for name in leftovers:
                    nursery.start_soon(self._reclaim_one, client, name)
        except (ZonedError, ClientError) as exc:
            log.warning("could not look for zones of dead sessions: %s", exc)

    async def _reclaim_one(self, client: Client, name: str) -> None:
        try:
            await client.destroy_zone(name)
            log.warning("destroyed zone %s, which a session that no longer runs left", name)
        except (ZonedError, ClientError) as exc:
            log.warning("could not destroy zone %s of a dead session: %s", name, exc)

    # ------------------------------------------------------------ the session's end

    async def close(self) -> None:
        """End every zone of the session, then the connection (callers bound the time)."""
        self._closing = True
        zones = list(self.zones.values())
        async with trio.open_nursery() as nursery:
            for zone in zones:
                nursery.start_soon(self._end_zone_quietly, zone)
        log.info("session ended: %d zone(s) destroyed", len(zones))
        self._close_connection.set()
        if self._client is not None:
            await self._connection_closed.wait()

    async def _end_zone_quietly(self, zone: SessionZone) -> None:
        try:
            await self._end_zone(zone)
        except (ZonedError, ClientError) as exc:
            log.warning("zone %s: %s (the daemon destroys it once we disconnect)", zone.name, exc)

    async def _end_zone(self, zone: SessionZone) -> None:
        """Close the zone's anchor; destroy the zone outright if that does not end it."""
        with suppress(ClientError):  # the connection is gone: so is the zone
            await zone.anchor.close_stdin()
        with trio.move_on_after(DESTROY_GRACE_S):
            await zone.ended.wait()
        if not zone.ended.is_set():
            log.warning("zone %s outlived its anchor's end: destroying it", zone.name)
            client = await self.client()
            await client.destroy_zone(zone.name)
            with trio.move_on_after(DESTROY_GRACE_S):
                await zone.ended.wait()

    # ------------------------------------------------------------ zones

    def _zone(self, ref: str) -> SessionZone:
        """A zone of this session by its name or short name; :class:`ToolInputError` else."""
        zone = self.zones.get(ref) or next(
            (z for z in self.zones.values() if z.short_name == ref), None
        )
        if zone is not None:
            return zone
        why = self._ended.get(ref) or self._ended.get(self.name_prefix + ref)
        if why is not None:
            raise r.ToolInputError(f"zone {ref!r} is gone: {why}")
        known = ", ".join(sorted(self.zones)) or "none (create one with create_zone)"
        raise r.ToolInputError(f"no zone {ref!r} in this session; its zones: {known}")

    def _in_use(self, short_name: str) -> bool:
        name = self.name_prefix + short_name
        return name in self.zones or name in self._booting

    def _unused_name(self, stem: str) -> str:
        """``<stem><n>`` for the next n that no zone of the session has (nor is booting)."""
        while self._in_use(name := f"{stem}{next(self._numbers)}"):
            pass
        return name

    @contextmanager
    def _room_for_a_zone(self, name: str) -> Iterator[None]:
        """Zone ``name`` counted (and its name taken) while it boots, or while a fresh one runs."""
        if len(self.zones) + len(self._booting) >= self.limits.max_zones:
            raise r.ToolInputError(
                f"this session has {self.limits.max_zones} zone(s) already, the most this server"
                " allows: destroy one first"
            )
        self._booting.add(name)
        try:
            yield
        finally:
            self._booting.discard(name)

    async def create_zone(self, args: t.CreateZoneArgs) -> r.ZoneSummary:
        client = await self.client()
        short_name = args.name or self._unused_name("")
        if self._in_use(short_name):
            raise r.ToolInputError(f"this session has a zone named {short_name!r} already")
        name = self.name_prefix + short_name
        with self._room_for_a_zone(name):
            zone: SessionZone = await self._nursery.start(
                self._anchor, client, name, short_name, args
            )
        return r.summary(zone.info, short_name)

    async def _anchor(
        self,
        client: Client,
        name: str,
        short_name: str,
        args: t.CreateZoneArgs,
        *,
        task_status: trio.TaskStatus[SessionZone],
    ) -> None:
        """Boot a zone and keep it while its anchor runs (a task of the session's nursery)."""
        memory_mib = args.memory_mib or self.limits.default_memory_mib
        image = {"image": args.image} if args.image is not None else {}
        async with self._booted(
            client,
            ANCHOR_ARGV,
            stdin=True,
            name=name,
            vcpus=args.vcpus,
            memory_mib=memory_mib,
            user=ANCHOR_USER,
            **image,
            net=args.network,
        ) as process:
            assert process.zone is not None
            zone = SessionZone(name, short_name, process.zone, process)
            self.zones[name] = zone
            task_status.started(zone)
            why = "destroyed"
            try:
                result = await process.wait()
                if not self._closing and result.exit.exit_code != 1:
                    why = f"its session anchor ended ({_how_it_ended(result.exit)}): was it killed?"
            except (ZonedError, ClientError) as exc:
                why = r.error_text(exc)
            finally:
                del self.zones[name]
                self._remember_end(name, why)
                zone.ended.set()
            log.info("zone %s ended: %s", name, why)

    @asynccontextmanager
    async def _booted(
        self, client: Client, argv: list[str], **options: Any
    ) -> AsyncIterator[Process]:
        """``run_process`` up to its start, within the boot timeout; ends it if left early."""
        labels = dict(self.labels)
        async with client.run_process(argv, labels=labels, **options) as process:
            try:
                with trio.fail_after(self.limits.boot_timeout_s):
                    pid = await process.started()
                if pid is None:
                    why = await process.start_failure()
                    raise r.ToolError(f"the process did not start: {why}")
                if process.zone is None:
                    raise r.ToolError("zoned-mcp: the daemon reported no zone for the run")
                yield process
            except trio.TooSlowError:
                await _stop(process)
                raise r.ToolError(
                    f"the zone did not boot within {self.limits.boot_timeout_s:g} s"
                ) from None
            except BaseException:
                await _stop(process)
                raise

    def _remember_end(self, name: str, why: str) -> None:
        if len(self._ended) >= _ENDED_MEMORY:
            del self._ended[next(iter(self._ended))]
        self._ended[name] = why

    async def list_zones(self, args: t.NoArgs) -> r.ZoneListResult:
        client = await self.client()
        zones = await client.list_zones({lb.LABEL_SESSION: self.id.label()})
        return r.ZoneListResult(
            zones=[
                r.summary(zone, zone.name.removeprefix(self.name_prefix))
                for zone in sorted(zones, key=lambda zone: zone.name)
                if zone.name.startswith(self.name_prefix) and zone.state != "stopped"
            ]
        )

    async def destroy_zone(self, args: t.ZoneArgs) -> r.DestroyResult:
        why = self._ended.get(args.zone) or self._ended.get(self.name_prefix + args.zone)
        if why is not None and args.zone not in self.zones:
            return r.DestroyResult(zone=args.zone, destroyed=False, notes=[f"already gone: {why}"])
        zone = self._zone(args.zone)
        await self._end_zone(zone)
        return r.DestroyResult(zone=zone.name, destroyed=zone.ended.is_set())

    # ------------------------------------------------------------ processes

    async def run_command(self, args: t.RunCommandArgs) -> r.CommandResult:
        zone = self._zone(args.zone)
        input = t.stdin_bytes(args)
        client = await self.client()
        timeout_s = args.timeout_s or self.limits.default_timeout_s
        async with client.exec_process(
            zone.name, args.argv, stdin=input is not None, cwd=args.cwd, env=args.env
        ) as process:
            outcome = await self._drive(process, input, timeout_s)
        return self._command_result(zone.name, outcome, timeout_s, fresh_zone=False)

    async def run_code(self, args: t.RunCodeArgs) -> r.CommandResult:
        argv = ["python3" if args.language == "python" else "sh", "-c", args.code]
        timeout_s = args.timeout_s or self.limits.default_timeout_s
        if args.zone is not None and args.image is not None:
            raise r.ToolInputError(
                "image is for a fresh zone: the zone given has its image already"
            )
        if args.zone is not None:
            if args.network is not None:
                raise r.ToolInputError(
                    "network is for a fresh zone: a zone of the session keeps the network it"
                    " was created with"
                )
            return await self.run_command(
                t.RunCommandArgs(zone=args.zone, argv=argv, timeout_s=timeout_s)
            )
        client = await self.client()
        name = self.name_prefix + self._unused_name("run")
        # The daemon's own timeout is the backstop should this process die.
        backstop_s = self.limits.boot_timeout_s + timeout_s + 2 * KILL_GRACE_S
        with self._room_for_a_zone(name):
            async with self._booted(
                client,
                argv,
                name=name,
                memory_mib=self.limits.default_memory_mib,
                timeout_s=min(backstop_s, p.MAX_RUN_TIMEOUT_S),
                # The code is the whole command: no image Entrypoint before it.
                entrypoint=[],
                **({"image": args.image} if args.image is not None else {}),
                net=args.network,
            ) as process:
                outcome = await self._drive(process, None, timeout_s)
        return self._command_result(name, outcome, timeout_s, fresh_zone=True)

    async def _drive(self, process: Process, input: bytes | None, timeout_s: float) -> Outcome:
        """Feed ``input``, collect bounded output, kill at the timeout; how it ended."""
        stdout = r.BoundedOutput("stdout", self.limits.max_output_bytes)
        stderr = r.BoundedOutput("stderr", self.limits.max_output_bytes)

        async def collect() -> None:
            async for chunk in process:
                (stdout if chunk.stream == "stdout" else stderr).add(chunk.data)

        async def feed() -> None:
            if input is not None:
                await process.write(input)
                await process.close_stdin()

        timed_out = False
        try:
            with trio.move_on_after(timeout_s):
                await _together(collect, feed)
            if process.result is None:
                timed_out = True
                await process.signal(signal.SIGKILL)
                with trio.move_on_after(KILL_GRACE_S):
                    await collect()
                if process.result is None:
                    raise r.ToolError(
                        f"the command did not end within {KILL_GRACE_S:g} s of SIGKILL"
                    )
        except BaseException:
            await _stop(process)
            raise
        return Outcome(
            process.result.exit, stdout, stderr, timed_out or process.result.exit.timed_out
        )

    def _command_result(
        self, zone: str, outcome: Outcome, timeout_s: float, *, fresh_zone: bool
    ) -> r.CommandResult:
        exit = outcome.exit
        notes = r.command_notes(exit, outcome.stdout, outcome.stderr, outcome.timed_out, timeout_s)
        if fresh_zone:
            notes.append(f"ran in the fresh zone {zone}, destroyed since")
        return r.CommandResult(
            zone=zone,
            exit_code=exit.exit_code,
            signal=exit.signal,
            timed_out=outcome.timed_out,
            oom_killed=exit.oom_killed,
            stdout=outcome.stdout.text(),
            stderr=outcome.stderr.text(),
            stdout_bytes=outcome.stdout.total,
            stderr_bytes=outcome.stderr.total,
            fresh_zone=fresh_zone,
            notes=notes,
        )

    # ------------------------------------------------------------ files

    async def write_file(self, args: t.WriteFileArgs) -> r.WriteResult:
        zone = self._zone(args.zone)
        data = t.decode_content(args, self.limits)
        client = await self.client()
        with self._file_deadline("write_file"):
            parent = posixpath.dirname(args.path.rstrip("/")) or "/"
            if args.make_parents and parent != "/":
                made = await client.exec(zone.name, ["mkdir", "-p", "--", parent], agent_tools=True)
                if made.returncode != 0:
                    detail = made.stderr.decode(errors="replace").strip()[:1000]
                    raise r.ToolError(f"cannot create {parent!r} in zone {zone.name!r}: {detail}")
            written = await client.put_file(
                zone.name, args.path, data, mode=t.octal_mode(args.mode)
            )
        return r.WriteResult(zone=zone.name, path=args.path, bytes_written=written)

    async def read_file(self, args: t.ReadFileArgs) -> r.ReadResult:
        zone = self._zone(args.zone)
        client = await self.client()
        limit = args.max_bytes or self.limits.max_read_bytes
        data = bytearray()
        with self._file_deadline("read_file"):
            try:
                # A chunk more than the limit: whether there is more is then known.
                async for chunk in client.stream_file(
                    zone.name, args.path, max_bytes=limit + p.MAX_EXEC_CHUNK
                ):
                    data += chunk
                larger = len(data) > limit
            except FileTooLarge:
                larger = True
        content, notes = r.file_text(bytes(data[:limit]), args.encoding, truncated=larger)
        if larger:
            notes.insert(
                0,
                f"the file is larger than {limit} bytes: only its first {limit} are shown (read"
                f" further with run_command, e.g. tail -c +{limit + 1} FILE | head -c N)",
            )
        return r.ReadResult(
            zone=zone.name,
            path=args.path,
            content=content,
            encoding=args.encoding,
            bytes_read=min(len(data), limit),
            truncated=larger,
            notes=notes,
        )

    async def list_files(self, args: t.ListFilesArgs) -> r.ListResult:
        zone = self._zone(args.zone)
        client = await self.client()
        limit = self.limits.max_list_entries
        with self._file_deadline("list_files"):
            listing = await client.list_directory(zone.name, args.path, max_entries=limit)
        notes = []
        if not listing.complete:
            notes.append(
                f"the directory has more than {limit} entries: {limit} of them are listed (list"
                " it with run_command and a filter, e.g. find DIR -name '*.py')"
            )
        return r.ListResult(
            zone=zone.name,
            path=args.path,
            entries=[r.file_entry(entry) for entry in listing.entries],
            truncated=not listing.complete,
            notes=notes,
        )

    @contextmanager
    def _file_deadline(self, tool: str) -> Iterator[None]:
        """File tools have no timeout argument; they get the default one."""
        try:
            with trio.fail_after(self.limits.default_timeout_s):
                yield
        except trio.TooSlowError:
            raise r.ToolError(
                f"{tool} did not finish within {self.limits.default_timeout_s:g} s"
            ) from None


def _how_it_ended(exit: p.ExecExit) -> str:
    if exit.signal is not None:
        return f"by {r.signal_name(exit.signal)}"
    return f"with status {exit.exit_code}"


async def _together(*functions: Callable[[], Awaitable[None]]) -> None:
    """Run ``functions`` concurrently; the one error they raise, not a group around it."""
    try:
        async with trio.open_nursery() as nursery:
            for function in functions:
                nursery.start_soon(function)
    except BaseExceptionGroup as group:
        inner = innermost(group)
        if isinstance(inner, Exception) and not isinstance(inner, BaseExceptionGroup):
            raise inner from None
        raise


async def _stop(process: Process) -> None:
    """A process left early (cancelled, failed): SIGKILL it and wait for its end, bounded.

    The daemon queues the signal if the process has not started yet. The end
    of a run (or of an anchor) comes once its zone is destroyed.
    """
    if process.result is not None:
        return
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(KILL_GRACE_S),
        suppress(ZonedError, ClientError),
    ):
        await process.signal(signal.SIGKILL)
        await process.wait()
