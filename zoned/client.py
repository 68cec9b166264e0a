"""The typed client of the zoned control socket (async, trio), and a sync wrapper.

Usage::

    async with Client.connect() as client:          # or: async with open_client() as client
        zone = await client.create_zone("web", vcpus=2, labels={"team": "a"})
        async with contextlib.aclosing(client.watch_events()) as events:
            async for event in events:
                ...

Rules:

- One connection per :class:`Client`. Entering it opens the unix socket and
  does the ``hello`` handshake; leaving it closes the connection, which is
  also what ends the daemon's side of every stream still running on it.
- One reader task per client, in a nursery the client owns, reads every reply
  and hands it to the request waiting for its ``id``. Requests and streams may
  therefore run concurrently on one client from many tasks; ids are allocated
  incrementally from 1.
- A reply is one of: the expected record, or an ``error_reply``, which is
  raised as the typed :class:`~zoned.errors.ZonedError` of its code
  (:func:`~zoned.errors.error_from_code`). Failures that the daemon did not
  report are :class:`ClientError`: :class:`DaemonUnavailable` (no socket, no
  permission to open it), :class:`ConnectionLost` (the daemon went away or
  broke the connection) and :class:`ProtocolError` (a reply that makes no
  sense).
- Streams (:meth:`Client.watch_events`, :meth:`Client.console_log`) are async
  generators. Close one that you leave early (``contextlib.aclosing``): until
  then its replies queue up, and once its small buffer is full the reader
  waits for it, stalling every other request on the connection. The protocol
  has no "stop this stream" request: the daemon keeps sending an abandoned
  stream's replies (the client drops them) until the connection closes, so a
  long-lived program that starts and stops watches should give each its own
  :class:`Client`.
- A request is written whole or not at all: a cancellation already pending
  stops it before the first byte, and the write itself is shielded (requests
  are small). Cancelling the wait for a reply is always safe; the late reply
  is dropped.
- Callers own timeouts: wrap calls in ``trio.move_on_after`` / ``fail_after``.

:class:`SyncClient` is for scripts: each method runs ``trio.run``, opening a
connection, doing one request and closing it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar

import trio

from zoned import protocol as p
from zoned.errors import InvalidRequest, ZonedError, error_from_code, innermost

__all__ = [
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "Client",
    "ClientError",
    "ConnectionLost",
    "DaemonUnavailable",
    "ExecResult",
    "OutputChunk",
    "Process",
    "ProtocolError",
    "SyncClient",
    "default_socket_path",
    "open_client",
]

#: Where the daemon listens unless configured otherwise (``Config.socket_path``).
DEFAULT_SOCKET = Path("/run/zoned/zoned.sock")
#: Environment variable naming another socket; an explicit ``path`` wins over it.
SOCKET_ENV = "ZONED_SOCKET"

RECEIVE_CHUNK = 64 * 1024
#: Replies buffered per stream before the reader waits for its consumer.
STREAM_BUFFER = 64
#: Largest file or tree :meth:`Client.get_file` and friends take by default.
DEFAULT_MAX_FILE = 1024 * 1024 * 1024
_MAX_REQUEST_ID = 2**32 - 1

_T = TypeVar("_T")
_R = TypeVar("_R", bound=p.Reply)


# ---------------------------------------------------------------------------
# Errors the daemon did not report
# ---------------------------------------------------------------------------


class ClientError(Exception):
    """The request failed on the client's side: there is no daemon error code for it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DaemonUnavailable(ClientError, OSError):
    """The control socket could not be opened: zoned is not running, or not for us.

    An :class:`OSError` too, with the ``errno`` of the failed connect
    (``ENOENT``, ``ECONNREFUSED``, ``EACCES``...); ``path`` is the socket.
    """

    def __init__(self, path: Path, cause: OSError) -> None:
        code = cause.errno
        if code == errno.ENOENT:
            why = "no such socket (is zoned running? is this its socket path?)"
        elif code == errno.ECONNREFUSED:
            why = "connection refused (the socket exists but nothing listens: is zoned running?)"
        elif code in (errno.EACCES, errno.EPERM):
            why = "permission denied (only root and members of the zoned group may connect)"
        else:
            why = f"{cause.strerror or cause} (is zoned running? are you in the zoned group?)"
        message = f"cannot connect to zoned at {path}: {why}"
        ClientError.__init__(self, message)
        OSError.__init__(self, code, message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class ConnectionLost(ClientError):
    """The connection closed or broke before the reply came."""


class ProtocolError(ClientError):
    """The daemon sent something this client cannot make sense of."""


def default_socket_path() -> Path:
    """``$ZONED_SOCKET`` if set (and not empty), else :data:`DEFAULT_SOCKET`."""
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


# ---------------------------------------------------------------------------
# The async client
# ---------------------------------------------------------------------------


class Client:
    """A connection to zoned. Use as ``async with Client.connect(path) as client``.

    After entering, :attr:`server` and :attr:`version` hold what the daemon
    said in its hello reply. Every method may raise the typed
    :class:`~zoned.errors.ZonedError` the daemon answered with, or a
    :class:`ClientError`.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        client_name: str = "zonectl",
        *,
        max_frame: int = p.DEFAULT_MAX_FRAME,
    ) -> None:
        self.path = Path(path) if path is not None else default_socket_path()
        self.client_name = client_name
        self.max_frame = max_frame
        #: Set by the handshake.
        self.server = ""
        self.version = 0
        self._stream: trio.SocketStream | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._send_lock = trio.Lock()
        self._waiters: dict[int, trio.MemorySendChannel[p.Reply]] = {}
        self._next_id = 1
        # Why the connection is unusable, as a factory: each waiter raises its
        # own exception object (they are raised from many tasks).
        self._failure: Callable[[], Exception] | None = None
        self._entered = False
        # Requests whose replies form a stream (final only at its end).
        self._streams: set[int] = set()

    @classmethod
    def connect(
        cls,
        path: str | Path | None = None,
        client_name: str = "zonectl",
        *,
        max_frame: int = p.DEFAULT_MAX_FRAME,
    ) -> Client:
        """A client for the socket at ``path`` (default: :func:`default_socket_path`).

        Nothing happens until it is entered with ``async with``, which
        connects and shakes hands, raising :class:`DaemonUnavailable`, the
        daemon's error (e.g. :class:`~zoned.errors.PermissionDenied`,
        :class:`~zoned.errors.UnsupportedVersion`) or :class:`ConnectionLost`.
        """
        return cls(path, client_name, max_frame=max_frame)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        if self._entered:
            raise RuntimeError("a Client can be entered only once")
        self._entered = True
        try:
            stream = await trio.open_unix_socket(str(self.path))
        except OSError as exc:
            raise DaemonUnavailable(self.path, exc) from exc
        self._stream = stream
        # The nursery is entered and exited by hand so that an exception from
        # the body of ``async with client`` never passes through it: callers
        # see their own exception, not an ExceptionGroup around it. The
        # reader, its only task, never raises (but Cancelled).
        manager = trio.open_nursery()
        try:
            self._nursery = await manager.__aenter__()
        except BaseException:
            await self._close()
            raise
        self._nursery_manager = manager
        self._nursery.start_soon(self._read_replies)
        try:
            reply = await self._call(
                lambda id: p.Hello(id=id, versions=[p.PROTOCOL_VERSION], client=self.client_name)
            )
            hello = _expect(reply, p.HelloReply)
        except BaseException:
            await self._shutdown()
            raise
        self.server = hello.server
        self.version = hello.version
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def aclose(self) -> None:
        """Close the connection (also done by leaving ``async with``); idempotent."""
        await self._shutdown()

    async def _shutdown(self) -> None:
        manager, self._nursery_manager = self._nursery_manager, None
        if manager is None:
            return
        self._fail(_lost("the client was closed"))
        try:
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            await manager.__aexit__(None, None, None)
        finally:
            self._nursery = None
            await self._close()

    async def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _fail(self, failure: Callable[[], Exception]) -> None:
        """Mark the connection unusable and wake every waiter with ``failure``."""
        if self._failure is None:
            self._failure = failure
        waiters, self._waiters = self._waiters, {}
        for send in waiters.values():
            send.close()

    # ------------------------------------------------------------ the reader

    async def _read_replies(self) -> None:
        """The reader task: dispatch replies by id until the connection ends.

        Never raises but Cancelled: whatever ends it becomes the connection's
        failure, raised to every waiter present and future.
        """
        assert self._stream is not None
        decoder = p.FrameDecoder(self.max_frame)
        failure = _lost("the client stopped reading")
        try:
            while self._failure is None:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
                if not data:
                    failure = _lost("the daemon closed the connection")
                    return
                decoder.feed(data)
                while self._failure is None and (frame := decoder.next_frame()) is not None:
                    await self._dispatch(p.decode_reply(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            failure = _lost(f"the connection to the daemon broke: {exc}")
        except ZonedError as exc:  # FrameError, or InvalidRequest from decode_reply
            failure = _protocol_error(f"invalid data from the daemon: {exc.message}")
        except Exception as exc:
            failure = _protocol_error(f"the client's reader failed: {exc!r}")
        finally:
            self._fail(failure)

    async def _dispatch(self, reply: p.Reply) -> None:
        if isinstance(reply, p.ErrorReply) and reply.id == 0:
            # Not about any request: the daemon is dropping the connection.
            code, message = reply.code, reply.message
            self._fail(lambda: error_from_code(code, message))
            return
        send = self._waiters.get(reply.id)
        if send is None:
            return  # an abandoned request or stream: drop its replies
        if reply.id in self._streams:
            final = isinstance(reply, p.StreamEnd | p.ExecExit | p.ErrorReply)
        else:
            final = True
        try:
            # Blocks while a stream's consumer lags: that is the backpressure
            # that lets the daemon notice a slow watcher.
            await send.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            final = True  # the waiter has gone
        if final:
            self._waiters.pop(reply.id, None)
            self._streams.discard(reply.id)
            send.close()

    # ------------------------------------------------------------ requests

    def _allocate_id(self) -> int:
        while True:
            request_id = self._next_id
            self._next_id = 1 if request_id >= _MAX_REQUEST_ID else request_id + 1
            if request_id not in self._waiters:
                return request_id

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure()
        if self._stream is None:
            raise ConnectionLost("the client is not connected (use `async with Client.connect()`)")

    async def _start(
        self, build: Callable[[int], p.Request], buffer: int, *, stream: bool = False
    ) -> tuple[int, trio.MemoryReceiveChannel[p.Reply]]:
        """Send one request; returns its id and the channel its replies arrive on.

        The caller closes the channel (``with``) and then calls :meth:`_forget`.
        """
        self._raise_failure()
        request_id = self._allocate_id()
        try:
            request = build(request_id)
        except ValueError as exc:  # a __post_init__ check, e.g. kernel_args too long
            raise InvalidRequest(str(exc)) from None
        frame = p.encode_frame(request, self.max_frame)
        send, receive = trio.open_memory_channel[p.Reply](buffer)
        self._waiters[request_id] = send
        if stream:
            self._streams.add(request_id)
        try:
            async with self._send_lock:
                await trio.lowlevel.checkpoint_if_cancelled()
                self._raise_failure()
                assert self._stream is not None
                with trio.CancelScope(shield=True):
                    await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._forget(request_id)
            receive.close()
            message = f"could not send to the daemon: {exc}"
            self._fail(_lost(message))
            raise ConnectionLost(message) from exc
        except BaseException:
            self._forget(request_id)
            receive.close()
            raise
        return request_id, receive

    async def _send_input(self, message: p.StreamInput) -> None:
        """Send stream input for a running request (no reply of its own)."""
        self._raise_failure()
        frame = p.encode_frame(message, self.max_frame)
        try:
            async with self._send_lock:
                self._raise_failure()
                assert self._stream is not None
                with trio.CancelScope(shield=True):
                    await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            message_text = f"could not send to the daemon: {exc}"
            self._fail(_lost(message_text))
            raise ConnectionLost(message_text) from exc

    def _forget(self, request_id: int) -> None:
        self._streams.discard(request_id)
        send = self._waiters.pop(request_id, None)
        if send is not None:
            send.close()

    async def _receive(self, replies: trio.MemoryReceiveChannel[p.Reply]) -> p.Reply:
        """The next reply; raises the daemon's error for an ``error_reply``."""
        try:
            reply = await replies.receive()
        except trio.EndOfChannel:
            self._raise_failure()
            raise ConnectionLost("the connection closed before the reply came") from None
        if isinstance(reply, p.ErrorReply):
            raise error_from_code(reply.code, reply.message)
        return reply

    async def _call(self, build: Callable[[int], p.Request]) -> p.Reply:
        """One request, one reply."""
        request_id, replies = await self._start(build, 1)
        try:
            with replies:
                return await self._receive(replies)
        finally:
            self._forget(request_id)

    # ------------------------------------------------------------ the API

    async def host_info(self) -> p.HostInfoData:
        """The host: accelerator, CPUs, NUMA nodes, free capacity, kernels."""
        reply = await self._call(lambda id: p.HostInfo(id=id))
        return _expect(reply, p.HostInfoReply).host

    async def create_zone(
        self,
        name: str,
        *,
        vcpus: int = 1,
        memory_mib: int = 256,
        profile: str = "strict",
        kernel_args: Iterable[str] = (),
        placement: p.Placement = "shared",
        labels: Mapping[str, str] | None = None,
        machine: p.Machine | None = None,
    ) -> p.ZoneInfo:
        """Create and boot a zone; returns once it is ready (the daemon raises if it fails).

        The daemon validates every value; bad ones are
        :class:`~zoned.errors.InvalidRequest`.
        """
        args = list(kernel_args)
        label_dict = dict(labels or {})
        reply = await self._call(
            lambda id: p.CreateZone(
                id=id,
                name=name,
                vcpus=vcpus,
                memory_mib=memory_mib,
                profile=profile,
                kernel_args=args,
                placement=placement,
                labels=label_dict,
                machine=machine,
            )
        )
        return _expect(reply, p.ZoneReply).zone

    async def get_zone(self, name: str) -> p.ZoneInfo:
        """One zone; :class:`~zoned.errors.NotFound` if there is none by that name."""
        reply = await self._call(lambda id: p.GetZone(id=id, name=name))
        return _expect(reply, p.ZoneReply).zone

    async def list_zones(self, labels: Mapping[str, str] | None = None) -> list[p.ZoneInfo]:
        """Every zone carrying all of ``labels`` (every zone when empty)."""
        label_dict = dict(labels or {})
        reply = await self._call(lambda id: p.ListZones(id=id, labels=label_dict))
        return _expect(reply, p.ZoneListReply).zones

    async def destroy_zone(self, name: str) -> p.ZoneInfo:
        """Stop a zone for good; returns its final record (state ``stopped``)."""
        reply = await self._call(lambda id: p.DestroyZone(id=id, name=name))
        return _expect(reply, p.ZoneReply).zone

    async def watch_events(self) -> AsyncGenerator[p.Event, None]:
        """Events from now on, until the connection closes or the daemon cuts the stream.

        An async generator: close it when you stop early
        (``async with contextlib.aclosing(client.watch_events()) as events``).
        """
        request_id, replies = await self._start(
            lambda id: p.WatchEvents(id=id), STREAM_BUFFER, stream=True
        )
        try:
            with replies:
                while not isinstance(reply := await self._receive(replies), p.StreamEnd):
                    yield _expect(reply, p.EventReply).event
        finally:
            self._forget(request_id)

    async def console_log(
        self, name: str, follow: bool = False, tail_bytes: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """A zone's serial console output as raw byte chunks (not lines, not UTF-8).

        Without ``follow`` it ends at the log's current end; with it, it goes
        on until closed. ``tail_bytes`` starts that many bytes before the end.
        An async generator: close it when you stop early (``contextlib.aclosing``).
        """
        request_id, replies = await self._start(
            lambda id: p.ConsoleLog(id=id, name=name, follow=follow, tail_bytes=tail_bytes),
            STREAM_BUFFER,
            stream=True,
        )
        try:
            with replies:
                while not isinstance(reply := await self._receive(replies), p.StreamEnd):
                    yield _expect(reply, p.LogChunk).data
        finally:
            self._forget(request_id)

    async def zone_metrics(self, name: str) -> p.ZoneMetricsData:
        """A zone's CPU time and memory as the host sees them, and the guest's own report."""
        reply = await self._call(lambda id: p.ZoneMetrics(id=id, name=name))
        return _expect(reply, p.ZoneMetricsReply).metrics

    # ------------------------------------------------------------ processes

    def exec_process(
        self,
        zone: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        uid: int = 0,
        gid: int = 0,
        stdin: bool = False,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        memory_limit_mib: int | None = None,
        pids_limit: int | None = None,
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
        fields = _exec_fields(
            argv, env, cwd, uid, gid, stdin, tty, rows, cols, memory_limit_mib, pids_limit
        )
        return self._process(lambda id: p.Exec(id=id, zone=zone, **fields))

    def run_process(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        uid: int = 0,
        gid: int = 0,
        stdin: bool = False,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        memory_limit_mib: int | None = None,
        pids_limit: int | None = None,
        name: str = "",
        vcpus: int = 1,
        memory_mib: int = 256,
        profile: str = "strict",
        placement: p.Placement = "shared",
        labels: Mapping[str, str] | None = None,
        machine: p.Machine | None = None,
        timeout_s: float | None = None,
    ) -> AbstractAsyncContextManager[Process]:
        """Like :meth:`exec_process`, in a fresh zone the daemon destroys afterwards.

        :attr:`Process.zone` is the zone once it is ready. ``timeout_s`` covers
        the whole run; when it passes the process is killed
        (:attr:`ExecResult.timed_out`). The zone is destroyed even if this
        client goes away.
        """
        fields = _exec_fields(
            argv, env, cwd, uid, gid, stdin, tty, rows, cols, memory_limit_mib, pids_limit
        )
        label_dict = dict(labels or {})
        return self._process(
            lambda id: p.RunZone(
                id=id,
                name=name,
                vcpus=vcpus,
                memory_mib=memory_mib,
                profile=profile,
                placement=placement,
                labels=label_dict,
                machine=machine,
                timeout_s=timeout_s,
                **fields,
            )
        )

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
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        uid: int = 0,
        gid: int = 0,
        memory_limit_mib: int | None = None,
        pids_limit: int | None = None,
    ) -> ExecResult:
        """Run ``argv`` in a ready zone to its end; its output collected in memory."""
        async with self.exec_process(
            zone,
            argv,
            env=env,
            cwd=cwd,
            uid=uid,
            gid=gid,
            stdin=input is not None,
            memory_limit_mib=memory_limit_mib,
            pids_limit=pids_limit,
        ) as process:
            return await process.communicate(input)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        vcpus: int = 1,
        memory_mib: int = 256,
        profile: str = "strict",
        timeout_s: float | None = None,
    ) -> ExecResult:
        """Boot a fresh zone, run ``argv`` in it to its end, destroy the zone."""
        async with self.run_process(
            argv,
            env=env,
            cwd=cwd,
            stdin=input is not None,
            vcpus=vcpus,
            memory_mib=memory_mib,
            profile=profile,
            timeout_s=timeout_s,
        ) as process:
            return await process.communicate(input)

    # ------------------------------------------------------------ files

    async def put_file(
        self,
        zone: str,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
    ) -> int:
        """Write a file in the zone's workload root, atomically; returns its size.

        ``data`` is bytes or an async iterable of chunks (streamed, never held
        whole). The file appears under its name only once complete, with
        ``mode`` and owner ``uid``:``gid``.
        """
        argv = [
            "sh",
            "-c",
            _PUT_SCRIPT,
            "zoned-put",
            path,
            f"{mode & 0o7777:o}",
            str(uid),
            str(gid),
        ]
        async with self.exec_process(zone, argv, stdin=True) as process:
            sent = await _feed(process, data)
            result = await _checked(process, f"cannot write {path!r} in zone {zone!r}")
        del result
        return sent

    async def get_file(self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE) -> bytes:
        """A file of the zone's workload root; :class:`InvalidRequest` beyond ``max_bytes``."""
        data = bytearray()
        async for chunk in self.stream_file(zone, path, max_bytes=max_bytes):
            data.extend(chunk)
        return bytes(data)

    async def stream_file(
        self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> AsyncGenerator[bytes, None]:
        """A file of the zone's workload root as chunks, as they come."""
        async for chunk in self._stream_command(
            zone, ["cat", "--", path], f"cannot read {path!r} in zone {zone!r}", max_bytes
        ):
            yield chunk

    async def put_tree(self, zone: str, directory: str, tar_stream: AsyncIterable[bytes]) -> None:
        """Unpack a tar stream into ``directory`` of the zone (created if missing)."""
        argv = ["sh", "-c", 'mkdir -p -- "$1" && exec tar -x -f - -C "$1"', "zoned-put", directory]
        async with self.exec_process(zone, argv, stdin=True) as process:
            await _feed(process, tar_stream)
            await _checked(process, f"cannot unpack into {directory!r} in zone {zone!r}")

    async def stream_tree(
        self, zone: str, directory: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> AsyncGenerator[bytes, None]:
        """``directory`` of the zone as a tar stream, as it comes."""
        async for chunk in self._stream_command(
            zone,
            ["tar", "-c", "-f", "-", "-C", directory, "."],
            f"cannot pack {directory!r} in zone {zone!r}",
            max_bytes,
        ):
            yield chunk

    async def is_directory(self, zone: str, path: str) -> bool:
        result = await self.exec(zone, ["test", "-d", path])
        return result.exit_code == 0

    async def _stream_command(
        self, zone: str, argv: list[str], failure: str, max_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        received = 0
        errors = bytearray()
        async with self.exec_process(zone, argv) as process:
            async for chunk in process:
                if chunk.stream == "stderr":
                    errors.extend(chunk.data[:4096])
                    continue
                received += len(chunk.data)
                if received > max_bytes:
                    await process.signal(9)
                    await process.wait()
                    raise InvalidRequest(f"{failure}: larger than the limit of {max_bytes} bytes")
                yield chunk.data
        assert process.result is not None
        _raise_on_failure(process.result, errors, failure)


class ExecResult(NamedTuple):
    """How a process ended, and (from ``exec``/``run``/``communicate``) its output."""

    exit_code: int | None
    signal: int | None
    timed_out: bool = False
    stdout: bytes = b""
    stderr: bytes = b""
    # The OOM killer ended it (memory_limit_mib); resources it used, by the guest's report.
    oom_killed: bool = False
    cpu_time_s: float | None = None
    memory_peak_kib: int | None = None

    @property
    def returncode(self) -> int:
        """As :mod:`subprocess` has it: the exit code, or minus the signal."""
        if self.exit_code is not None:
            return self.exit_code
        return -(self.signal or 0)


class OutputChunk(NamedTuple):
    stream: Literal["stdout", "stderr"]
    data: bytes


class Process:
    """A process running in a zone (from :meth:`Client.exec_process` / ``run_process``).

    ``async for chunk in process`` yields :class:`OutputChunk` in order until
    the process ends; then :attr:`result` is set. Reading its output is what
    lets it go on writing: the daemon takes output from the zone only as fast
    as this client reads it.
    """

    def __init__(
        self, client: Client, request_id: int, replies: trio.MemoryReceiveChannel[p.Reply]
    ) -> None:
        self._client = client
        self._id = request_id
        self._replies = replies
        self.pid: int | None = None
        self.zone: p.ZoneInfo | None = None
        self.result: ExecResult | None = None
        #: (stdout, stderr) where a caller collected them (zonectl --json).
        self.collected: tuple[bytes, bytes] = (b"", b"")

    def __aiter__(self) -> Process:
        return self

    async def __anext__(self) -> OutputChunk:
        while self.result is None:
            reply = await self._client._receive(self._replies)
            match reply:
                case p.ExecOutput():
                    return OutputChunk(reply.stream, reply.data)
                case p.ExecStarted():
                    self.pid = reply.pid
                case p.ZoneReply():
                    self.zone = reply.zone
                case p.ExecExit():
                    self.result = _result(reply)
                case _:
                    raise ProtocolError(f"unexpected reply in a process stream: {reply!r}")
        raise StopAsyncIteration

    async def started(self) -> int | None:
        """Wait until the process runs (or ended without output); its pid in the zone."""
        while self.pid is None and self.result is None:
            reply = await self._client._receive(self._replies)
            match reply:
                case p.ExecStarted():
                    self.pid = reply.pid
                case p.ZoneReply():
                    self.zone = reply.zone
                case p.ExecExit():
                    self.result = _result(reply)
                case p.ExecOutput():
                    raise ProtocolError("output before the process started")
                case _:
                    raise ProtocolError(f"unexpected reply in a process stream: {reply!r}")
        return self.pid

    async def write(self, data: bytes) -> None:
        """Send bytes to the process's stdin (it was started with ``stdin=True``)."""
        view = memoryview(data)
        while view:
            chunk = bytes(view[: p.MAX_EXEC_CHUNK])
            view = view[p.MAX_EXEC_CHUNK :]
            await self._client._send_input(p.ExecInput(id=self._id, data=chunk))

    async def close_stdin(self) -> None:
        await self._client._send_input(p.ExecInput(id=self._id, eof=True))

    async def signal(self, signum: int) -> None:
        """Send a signal to the process (its process group)."""
        await self._client._send_input(p.ExecSignal(id=self._id, signal=signum))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the size of the process's terminal (``tty=True`` only)."""
        await self._client._send_input(p.ExecResize(id=self._id, rows=rows, cols=cols))

    async def wait(self) -> ExecResult:
        """Read (and drop) the rest of the output; how the process ended."""
        async for _chunk in self:
            pass
        assert self.result is not None
        return self.result

    async def communicate(self, input: bytes | None = None) -> ExecResult:
        """Send ``input`` (then EOF) while collecting all output; the result with it."""
        out = bytearray()
        err = bytearray()

        async def feed() -> None:
            if input is None:
                return
            await self.write(input)
            await self.close_stdin()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                async for chunk in self:
                    (out if chunk.stream == "stdout" else err).extend(chunk.data)
        except BaseExceptionGroup as group:
            # Callers get the daemon's typed error, not a group around it.
            inner = innermost(group)
            if isinstance(inner, Exception) and not isinstance(inner, BaseExceptionGroup):
                raise inner from None
            raise
        assert self.result is not None
        return self.result._replace(stdout=bytes(out), stderr=bytes(err))


# Writes stdin to a temporary name beside the target, then renames it: the
# file appears whole or not at all. $1 path, $2 octal mode, $3 uid, $4 gid.
_PUT_SCRIPT = (
    'tmp="$1.zoned-put.$$" && cat > "$tmp" && chmod "$2" "$tmp" && chown "$3:$4" "$tmp"'
    ' && mv -f "$tmp" "$1" || { rm -f "$tmp"; exit 1; }'
)


async def _feed(process: Process, data: bytes | AsyncIterable[bytes]) -> int:
    sent = 0
    if isinstance(data, bytes):
        await process.write(data)
        sent = len(data)
    else:
        async for chunk in data:
            await process.write(chunk)
            sent += len(chunk)
    await process.close_stdin()
    return sent


async def _checked(process: Process, failure: str) -> ExecResult:
    errors = bytearray()
    async for chunk in process:
        errors.extend(chunk.data[:4096])
    result = process.result
    assert result is not None
    _raise_on_failure(result, errors, failure)
    return result


def _raise_on_failure(result: ExecResult, stderr: bytes | bytearray, failure: str) -> None:
    """A helper command that failed: its stderr (or status) as the error."""
    if result.returncode != 0:
        detail = bytes(stderr).decode(errors="replace").strip() or f"status {result.returncode}"
        raise InvalidRequest(f"{failure}: {detail}")


def _result(reply: p.ExecExit) -> ExecResult:
    return ExecResult(
        reply.exit_code,
        reply.signal,
        reply.timed_out,
        oom_killed=reply.oom_killed,
        cpu_time_s=reply.cpu_time_s,
        memory_peak_kib=reply.memory_peak_kib,
    )


def _exec_fields(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str,
    uid: int,
    gid: int,
    stdin: bool,
    tty: bool = False,
    rows: int = 24,
    cols: int = 80,
    memory_limit_mib: int | None = None,
    pids_limit: int | None = None,
) -> dict[str, Any]:
    return {
        "argv": list(argv),
        "env": dict(env or {}),
        "cwd": cwd,
        "uid": uid,
        "gid": gid,
        "stdin": stdin,
        "tty": tty,
        "rows": rows,
        "cols": cols,
        "memory_limit_mib": memory_limit_mib,
        "pids_limit": pids_limit,
    }


def open_client(
    path: str | Path | None = None,
    client_name: str = "zonectl",
    *,
    max_frame: int = p.DEFAULT_MAX_FRAME,
) -> Client:
    """``async with open_client() as client``: the same as :meth:`Client.connect`."""
    return Client.connect(path, client_name, max_frame=max_frame)


def _expect(reply: p.Reply, kind: type[_R]) -> _R:
    if not isinstance(reply, kind):
        raise ProtocolError(
            f"unexpected reply from the daemon: {type(reply).__name__}, expected {kind.__name__}"
        )
    return reply


def _lost(message: str) -> Callable[[], Exception]:
    return lambda: ConnectionLost(message)


def _protocol_error(message: str) -> Callable[[], Exception]:
    return lambda: ProtocolError(message)


# ---------------------------------------------------------------------------
# The sync wrapper
# ---------------------------------------------------------------------------


class SyncClient:
    """Blocking calls for scripts: each one is a ``trio.run`` with its own connection.

    Not for use inside a running trio (or asyncio) loop, and not for streams:
    use :class:`Client` for those.
    """

    def __init__(self, path: str | Path | None = None, client_name: str = "zonectl") -> None:
        self.path = Path(path) if path is not None else default_socket_path()
        self.client_name = client_name

    def _run(self, call: Callable[[Client], Awaitable[_T]]) -> _T:
        async def one_call() -> _T:
            async with Client.connect(self.path, self.client_name) as client:
                return await call(client)

        return trio.run(one_call)

    def host_info(self) -> p.HostInfoData:
        return self._run(lambda client: client.host_info())

    def create_zone(
        self,
        name: str,
        *,
        vcpus: int = 1,
        memory_mib: int = 256,
        profile: str = "strict",
        kernel_args: Iterable[str] = (),
        placement: p.Placement = "shared",
        labels: Mapping[str, str] | None = None,
        machine: p.Machine | None = None,
    ) -> p.ZoneInfo:
        return self._run(
            lambda client: client.create_zone(
                name,
                vcpus=vcpus,
                memory_mib=memory_mib,
                profile=profile,
                kernel_args=kernel_args,
                placement=placement,
                labels=labels,
                machine=machine,
            )
        )

    def get_zone(self, name: str) -> p.ZoneInfo:
        return self._run(lambda client: client.get_zone(name))

    def list_zones(self, labels: Mapping[str, str] | None = None) -> list[p.ZoneInfo]:
        return self._run(lambda client: client.list_zones(labels))

    def destroy_zone(self, name: str) -> p.ZoneInfo:
        return self._run(lambda client: client.destroy_zone(name))

    def zone_metrics(self, name: str) -> p.ZoneMetricsData:
        return self._run(lambda client: client.zone_metrics(name))

    def exec(
        self,
        zone: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        uid: int = 0,
        gid: int = 0,
        memory_limit_mib: int | None = None,
        pids_limit: int | None = None,
    ) -> ExecResult:
        """Run ``argv`` in a ready zone to its end; output collected (see :meth:`Client.exec`)."""
        return self._run(
            lambda client: client.exec(
                zone,
                argv,
                input=input,
                env=env,
                cwd=cwd,
                uid=uid,
                gid=gid,
                memory_limit_mib=memory_limit_mib,
                pids_limit=pids_limit,
            )
        )

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        vcpus: int = 1,
        memory_mib: int = 256,
        profile: str = "strict",
        timeout_s: float | None = None,
    ) -> ExecResult:
        """Boot a fresh zone, run ``argv`` to its end, destroy the zone."""
        return self._run(
            lambda client: client.run(
                argv,
                input=input,
                env=env,
                cwd=cwd,
                vcpus=vcpus,
                memory_mib=memory_mib,
                profile=profile,
                timeout_s=timeout_s,
            )
        )

    def put_file(
        self, zone: str, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> int:
        return self._run(
            lambda client: client.put_file(zone, path, data, mode=mode, uid=uid, gid=gid)
        )

    def get_file(self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE) -> bytes:
        return self._run(lambda client: client.get_file(zone, path, max_bytes=max_bytes))
