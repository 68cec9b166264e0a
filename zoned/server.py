"""The control socket's IO: listening, SO_PEERCRED, framing bytes in and out, tasks.

Every rule of the conversation (hello first, the in-flight cap, stream
input, what closes a connection) is in :mod:`zoned.conversation`; this
module carries out what it decides.

- Callers are identified by ``SO_PEERCRED`` (pid, uid, gid) and the
  supplementary groups and executable of that pid, read from ``/proc`` when
  it connects: one :class:`~zoned.access.Caller`, handed to every request's
  handler. A caller refused for who it is is reported to ``on_denied``
  (the audit trail) with the first frame it sent.
- Each started request runs as its own task in the connection's nursery, so
  that a stream (watch, logs, exec) and other requests share one connection.
- Stream input goes to the running request's handler through a small
  channel, in order. While the handler does not take it (the process does
  not read its stdin), the connection is not read any further: that is the
  backpressure, and it holds back only this connection.
- Nothing a client sends can take the daemon down: every error is either a
  typed ``ZonedError`` sent to that client, or an unexpected exception, which
  is logged with its traceback and reported only as ``internal``.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from zoned import conversation as rules
from zoned import protocol as p
from zoned.access import AccessPolicy, Caller
from zoned.errors import InternalError, ZonedError, innermost
from zoned.httpserve import bind_unix_socket

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 64 * 1024

Send = Callable[[p.Reply], Awaitable[None]]
#: Stream input for one request: None for requests that take none.
StreamInputs = trio.MemoryReceiveChannel[p.StreamInput] | None
Handler = Callable[[p.Request, Send, StreamInputs, Caller], Awaitable[None]]
#: Told of a caller refused for who it is, with the first frame it sent.
DeniedHook = Callable[[Caller, bytes], None]
#: Stream input messages buffered per request before the connection stops reading.
STREAM_INPUT_BUFFER = 8


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def peer_executable(pid: int) -> str:
    """``/proc/<pid>/exe`` of a peer ("" if it cannot be read, or the peer is gone)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def process_groups(pid: int) -> set[int]:
    """Supplementary groups of a live process, from /proc (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class Connection:
    def __init__(
        self,
        stream: trio.SocketStream,
        handler: Handler,
        policy: AccessPolicy,
        max_frame: int,
        on_denied: DeniedHook | None = None,
        *,
        caller: Caller | None = None,
    ) -> None:
        self._stream = stream
        # Given: the connection is the daemon's own (the E2B endpoint's, for
        # an API key's owner), not a peer whose SO_PEERCRED says who it is.
        self._caller = caller
        self._handler = handler
        self._on_denied = on_denied
        self._policy = policy
        self._max_frame = max_frame
        self._send_lock = trio.Lock()
        self._closed = False
        self._inputs: dict[int, trio.MemorySendChannel[p.StreamInput]] = {}

    async def send(self, reply: p.Reply) -> None:
        if self._closed:
            raise trio.ClosedResourceError("connection closed")
        frame = p.encode_frame(reply, self._max_frame)
        async with self._send_lock:
            await self._stream.send_all(frame)

    async def serve(self) -> None:
        caller = self._caller
        if caller is None:
            pid, uid, gid = peer_credentials(self._stream.socket)
            groups = await trio.to_thread.run_sync(process_groups, pid)
            exe = await trio.to_thread.run_sync(peer_executable, pid)
            caller = Caller(uid=uid, gid=gid, groups=frozenset(groups), pid=pid, exe=exe)
        conversation = rules.Conversation(
            authorised=self._policy.may_connect(caller) or self._caller is not None,
            uid=caller.uid,
            max_frame=self._max_frame,
        )
        try:
            async with trio.open_nursery() as nursery:
                while conversation.state != "closed":
                    try:
                        data = await self._stream.receive_some(RECEIVE_CHUNK)
                    except (trio.BrokenResourceError, OSError):
                        break
                    if not data:
                        break
                    conversation.receive_data(data)
                    while (action := conversation.next_action()) is not None:
                        await self._carry_out(action, conversation, nursery, caller)
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _try_send(self, reply: p.Reply) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.send(reply)

    async def _carry_out(
        self,
        action: rules.Action,
        conversation: rules.Conversation,
        nursery: trio.Nursery,
        caller: Caller,
    ) -> None:
        match action:
            case rules.RespondAndClose(reply, denied) if denied is not None:
                if self._on_denied is not None:
                    self._on_denied(caller, denied)
                await self._try_send(reply)
            case rules.Respond(reply) | rules.RespondAndClose(reply):
                await self._try_send(reply)
            case rules.Forward(message):
                target = self._inputs.get(message.id)
                if target is None:
                    return  # its request ended while this input waited
                # Blocks this connection's reading while the process does not
                # take its input: backpressure for this client only.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await target.send(message)
            case rules.Start(request, takes_input):
                inputs: StreamInputs = None
                if takes_input:
                    send_input, inputs = trio.open_memory_channel[p.StreamInput](
                        STREAM_INPUT_BUFFER
                    )
                    self._inputs[request.id] = send_input
                nursery.start_soon(self._run_request, request, inputs, conversation, caller)

    async def _run_request(
        self,
        request: p.Request,
        inputs: StreamInputs,
        conversation: rules.Conversation,
        caller: Caller,
    ) -> None:
        try:
            await self._handler(request, self.send, inputs, caller)
        except Exception as raised:
            # Handlers with nurseries raise their errors wrapped in groups.
            exc = innermost(raised)
            if isinstance(exc, ZonedError):
                await self._try_send(p.error_reply(request.id, exc))
            elif isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
                pass  # the client went away mid-reply
            else:
                log.exception("request %s failed unexpectedly", type(request).__name__)
                await self._try_send(
                    p.error_reply(request.id, InternalError("internal error; see the daemon log"))
                )
        finally:
            conversation.finished(request)
            if inputs is not None:
                self._inputs.pop(request.id, None)
                inputs.close()


async def open_own_connection(
    nursery: trio.Nursery, handler: Handler, policy: AccessPolicy, max_frame: int, caller: Caller
) -> trio.SocketStream:
    """A control connection of the daemon's own, for ``caller``: the client's end.

    The other end of a socket pair is served in ``nursery`` like any peer of
    the control socket, with ``caller`` given instead of read from
    ``SO_PEERCRED`` (the E2B endpoint acts so for each API key's owner);
    it ends when the client closes its end.
    """
    await trio.lowlevel.checkpoint()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_side = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    connection = Connection(server_side, handler, policy, max_frame, caller=caller)

    async def serve() -> None:
        try:
            await connection.serve()
        except Exception:
            log.exception("in-process control connection failed")

    nursery.start_soon(serve)
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours))


def socket_group_id(group: str) -> int | None:
    """The control socket's group, or None (and a warning) when the host has none."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("group %r does not exist: only root can use the control socket", group)
        return None


async def open_control_socket(path: Path, socket_gid: int | None) -> trio.socket.SocketType:
    """Bind the listening socket: mode 0660, owned by group ``socket_gid`` when there is one."""
    return await bind_unix_socket(path, socket_gid)


async def serve_control_socket(
    path: Path,
    policy: AccessPolicy,
    handler: Handler,
    max_frame: int,
    *,
    on_denied: DeniedHook | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket; ``policy`` says who may connect (and owns its group)."""
    sock = await open_control_socket(path, policy.socket_gid)
    listener = trio.SocketListener(sock)

    async def one(stream: trio.SocketStream) -> None:
        try:
            await Connection(stream, handler, policy, max_frame, on_denied).serve()
        except Exception:
            log.exception("connection handler crashed")

    try:
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(one, stream)
    finally:
        path.unlink(missing_ok=True)
