"""The control socket: framing, authentication, the handshake and dispatch.

Rules:

- Callers are identified by ``SO_PEERCRED``. Root and members of the
  configured group may act; anybody else gets ``permission_denied`` to their
  first request and the connection is closed.
- The first request must be ``hello``; the reply names the chosen version.
- Each request runs as its own task in the connection's nursery, so that a
  stream (watch, logs, exec) and other requests share one connection. A
  connection may have at most ``MAX_INFLIGHT`` requests running.
- Stream input (``exec_input``, ``exec_signal``, ``exec_resize``) is not a request of its
  own: it carries the ``id`` of a running ``exec``/``run_zone`` and goes to
  that request's handler, in order. While the handler does not take it (the
  process does not read its stdin), the connection is not read any further:
  that is the backpressure, and it holds back only this connection.
- A frame that breaks the framing (oversize, zero length) gets an error with
  id 0 and the connection is closed, since the byte stream can no longer be
  trusted. A well-framed message that fails to decode gets an error with its
  id (when it can be read) and the connection carries on.
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

from zoned import protocol as p
from zoned.errors import (
    InternalError,
    InvalidRequest,
    PermissionDenied,
    ZonedError,
    innermost,
)

log = logging.getLogger(__name__)

MAX_INFLIGHT = 64
RECEIVE_CHUNK = 64 * 1024
SERVER_NAME = "zoned/0.1"

Send = Callable[[p.Reply], Awaitable[None]]
#: Stream input for one request: None for requests that take none.
StreamInputs = trio.MemoryReceiveChannel[p.StreamInput] | None
Handler = Callable[[p.Request, Send, StreamInputs], Awaitable[None]]
#: Requests whose handler receives stream input.
TAKES_INPUT = (p.Exec, p.RunZone)
#: Stream input messages buffered per request before the connection stops reading.
STREAM_INPUT_BUFFER = 8


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


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


def is_authorised(uid: int, gid: int, groups: set[int], allowed_gid: int | None) -> bool:
    if uid == 0:
        return True
    return allowed_gid is not None and (gid == allowed_gid or allowed_gid in groups)


class Connection:
    def __init__(
        self,
        stream: trio.SocketStream,
        handler: Handler,
        allowed_gid: int | None,
        max_frame: int,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._allowed_gid = allowed_gid
        self._max_frame = max_frame
        self._send_lock = trio.Lock()
        self._inflight = 0
        self._greeted = False
        self._closed = False
        self._inputs: dict[int, trio.MemorySendChannel[p.StreamInput]] = {}

    async def send(self, reply: p.Reply) -> None:
        if self._closed:
            raise trio.ClosedResourceError("connection closed")
        frame = p.encode_frame(reply, self._max_frame)
        async with self._send_lock:
            await self._stream.send_all(frame)

    async def serve(self) -> None:
        pid, uid, gid = peer_credentials(self._stream.socket)
        authorised = is_authorised(uid, gid, process_groups(pid), self._allowed_gid)
        decoder = p.FrameDecoder(self._max_frame)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await self._stream.receive_some(RECEIVE_CHUNK)
                    except (trio.BrokenResourceError, OSError):
                        break
                    if not data:
                        break
                    try:
                        decoder.feed(data)
                        frames = []
                        while (frame := decoder.next_frame()) is not None:
                            frames.append(frame)
                    except p.FrameError as exc:
                        await self._try_send(p.error_reply(0, exc))
                        break
                    for frame in frames:
                        if not authorised:
                            request_id = p.peek_request_id(frame) or 0
                            await self._try_send(
                                p.error_reply(
                                    request_id,
                                    PermissionDenied(
                                        f"uid {uid} may not use zoned: only root and members "
                                        "of the zoned group may"
                                    ),
                                )
                            )
                            return
                        await self._dispatch(frame, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _try_send(self, reply: p.Reply) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.send(reply)

    async def _dispatch(self, frame: bytes, nursery: trio.Nursery) -> None:
        try:
            request = p.decode_request(frame)
        except InvalidRequest as exc:
            await self._try_send(p.error_reply(p.peek_request_id(frame) or 0, exc))
            return
        if not self._greeted:
            if not isinstance(request, p.Hello):
                await self._try_send(
                    p.error_reply(request.id, InvalidRequest("the first request must be hello"))
                )
                return
            try:
                version = p.negotiate_version(request.versions)
            except ZonedError as exc:
                await self._try_send(p.error_reply(request.id, exc))
                return
            self._greeted = True
            await self._try_send(p.HelloReply(id=request.id, version=version, server=SERVER_NAME))
            return
        if isinstance(request, p.Hello):
            await self._try_send(p.error_reply(request.id, InvalidRequest("hello already done")))
            return
        if isinstance(request, p.ExecInput | p.ExecSignal | p.ExecResize):
            target = self._inputs.get(request.id)
            if target is None:
                await self._try_send(
                    p.error_reply(
                        request.id,
                        InvalidRequest(f"no running exec with id {request.id} on this connection"),
                    )
                )
                return
            # Blocks this connection's reading while the process does not
            # take its input: backpressure for this client only.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await target.send(request)
            return
        if isinstance(request, TAKES_INPUT) and request.id in self._inputs:
            await self._try_send(
                p.error_reply(request.id, InvalidRequest(f"id {request.id} is already running"))
            )
            return
        if self._inflight >= MAX_INFLIGHT:
            await self._try_send(
                p.error_reply(
                    request.id,
                    InvalidRequest(f"too many requests in flight (limit {MAX_INFLIGHT})"),
                )
            )
            return
        self._inflight += 1
        inputs: StreamInputs = None
        if isinstance(request, TAKES_INPUT):
            send_input, inputs = trio.open_memory_channel[p.StreamInput](STREAM_INPUT_BUFFER)
            self._inputs[request.id] = send_input
        nursery.start_soon(self._run_request, request, inputs)

    async def _run_request(self, request: p.Request, inputs: StreamInputs) -> None:
        try:
            await self._handler(request, self.send, inputs)
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
            self._inflight -= 1
            if inputs is not None:
                self._inputs.pop(request.id, None)
                inputs.close()


async def open_control_socket(path: Path, group: str) -> tuple[trio.socket.SocketType, int | None]:
    """Bind the listening socket: mode 0660, owned by ``group`` when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        allowed_gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        allowed_gid = None
        log.warning("group %r does not exist: only root can use the control socket", group)
    if path.is_socket() or path.exists():
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if allowed_gid is not None and os.geteuid() == 0:
        os.chown(path, 0, allowed_gid)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock, allowed_gid


async def serve_control_socket(
    path: Path,
    group: str,
    handler: Handler,
    max_frame: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    sock, allowed_gid = await open_control_socket(path, group)
    listener = trio.SocketListener(sock)

    async def one(stream: trio.SocketStream) -> None:
        try:
            await Connection(stream, handler, allowed_gid, max_frame).serve()
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
