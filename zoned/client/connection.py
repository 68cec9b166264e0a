"""One connection to the control socket: the socket, the hello, the reader task, reply routing.

:class:`Connection` is the base of :class:`~zoned.client.Client`; it knows
frames, request ids and streams, not what any request means. The failures
that the daemon did not report are here too (:class:`ClientError` and its
subclasses). The rules it keeps are in :mod:`zoned.client`'s docstring.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Self, TypeVar

import trio

from zoned import protocol as p
from zoned.errors import InvalidRequest, ZonedError, error_from_code

#: Where the daemon listens unless configured otherwise (``Config.socket_path``).
DEFAULT_SOCKET = Path("/run/zoned/zoned.sock")
#: Environment variable naming another socket; an explicit ``path`` wins over it.
SOCKET_ENV = "ZONED_SOCKET"

RECEIVE_CHUNK = 64 * 1024
#: Replies buffered per stream before the reader waits for its consumer.
STREAM_BUFFER = 64
_MAX_REQUEST_ID = 2**32 - 1

_R = TypeVar("_R", bound=p.Reply)
_T = TypeVar("_T")


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
# The connection
# ---------------------------------------------------------------------------


class Connection:
    """The socket and its reader; entered with ``async with`` (connect and hello).

    After entering, :attr:`server` and :attr:`version` hold what the daemon
    said in its hello reply.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        client_name: str = "zonectl",
        *,
        max_frame: int = p.DEFAULT_MAX_FRAME,
        connect: Callable[[], Awaitable[trio.SocketStream]] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else default_socket_path()
        #: Opens the stream instead of connecting to ``path`` (the daemon's own
        #: in-process connections: one end of a socket pair).
        self._connect = connect
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

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a Client can be entered only once")
        self._entered = True
        try:
            if self._connect is not None:
                stream = await self._connect()
            else:
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
            hello = expect(reply, p.HelloReply)
        except BaseException:
            await self._shutdown()
            raise
        self.server = hello.server
        self.version = hello.version
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._shutdown()

    async def aclose(self) -> None:
        """Close the connection (also done by leaving ``async with``); idempotent."""
        await self._shutdown()

    def abort(self, reason: str = "the client gave up on the connection") -> None:
        """Break the connection now, waiting for nothing (sync: safe in any task).

        Every request and stream on it fails with :class:`ConnectionLost`
        (``reason``), and a task blocked writing to a daemon that does not
        read wakes up. For a caller that stops waiting (zonectl on a second
        Ctrl-C); leaving ``async with`` afterwards still cleans up.
        """
        self._fail(_lost(reason))
        if self._stream is not None:
            # trio's socket close wakes every task waiting on the socket.
            self._stream.socket.close()

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
            final = isinstance(reply, p.StreamEnd | p.ExecExit | p.ImageReply | p.ErrorReply)
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
            raise ConnectionLost("the client is not connected (use `async with Client(...)`)")

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
            raise self._failure_or(message) from exc
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
            raise self._failure_or(message_text) from exc

    def _failure_or(self, message: str) -> Exception:
        """The connection's failure (an :meth:`abort` says why), else ``message``."""
        return self._failure() if self._failure is not None else ConnectionLost(message)

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

    async def _stream_of(
        self, build: Callable[[int], p.Request], item: Callable[[p.Reply], _T]
    ) -> AsyncGenerator[_T, None]:
        """A stream request's replies, each made an ``item``, up to its ``stream_end``."""
        request_id, replies = await self._start(build, STREAM_BUFFER, stream=True)
        try:
            with replies:
                while not isinstance(reply := await self._receive(replies), p.StreamEnd):
                    yield item(reply)
        finally:
            self._forget(request_id)

    async def _call(self, build: Callable[[int], p.Request]) -> p.Reply:
        """One request, one reply."""
        request_id, replies = await self._start(build, 1)
        try:
            with replies:
                return await self._receive(replies)
        finally:
            self._forget(request_id)


def expect(reply: p.Reply, kind: type[_R]) -> _R:
    """``reply`` as the kind the request expects, else :class:`ProtocolError`."""
    if not isinstance(reply, kind):
        raise ProtocolError(
            f"unexpected reply from the daemon: {type(reply).__name__}, expected {kind.__name__}"
        )
    return reply


def _lost(message: str) -> Callable[[], Exception]:
    return lambda: ConnectionLost(message)


def _protocol_error(message: str) -> Callable[[], Exception]:
    return lambda: ProtocolError(message)
