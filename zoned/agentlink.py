"""Host side of a zone's agent channel (the virtio-serial port's unix socket).

Everything the guest sends is hostile input. The link reads through a
bounded :class:`FrameDecoder`, decodes with the strict agent decoder, caps the
rate of messages, and turns any violation into :class:`AgentFault` with a
clear reason; the zone manager marks that zone failed. Nothing the guest sends
can raise anything else out of here.

Handshake: QEMU listens on the socket from the moment the domain starts. The
host connects and sends ``Heartbeat(seq=0)``; the agent answers every
``seq=0`` heartbeat with its ``AgentHello`` (and also says hello on its own
once it is up), so a host that connects late or reconnects after a daemon
restart always learns who is there. After the hello, the host sends a
heartbeat every interval and expects a reply before the silence limit.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from zoned.errors import InvalidRequest
from zoned.protocol import (
    AGENT_MAX_FRAME,
    AgentHello,
    FrameDecoder,
    Heartbeat,
    HeartbeatReply,
    decode_from_agent,
    encode_frame,
)

log = logging.getLogger(__name__)

# Messages per second above which a guest is flooding the host.
MAX_MESSAGES_PER_SECOND = 200
RECEIVE_CHUNK = 64 * 1024


class AgentFault(Exception):
    """The guest agent broke the protocol, went silent or the channel failed."""


@dataclass(frozen=True)
class AgentFacts:
    agent: str
    kernel_release: str
    boot_s: float
    pid: int
    version: int


class AgentLink:
    def __init__(self, stream: trio.SocketStream, zone: str) -> None:
        self._stream = stream
        self._zone = zone
        self._decoder = FrameDecoder(AGENT_MAX_FRAME)
        self._window_start = trio.current_time()
        self._window_count = 0
        self.last_heartbeat: HeartbeatReply | None = None

    @classmethod
    async def connect(cls, path: Path, zone: str) -> AgentLink:
        """Connect to the channel socket, waiting for QEMU to create it.

        The caller bounds the wait with a cancel scope.
        """
        delay = 0.02
        while True:
            try:
                stream = await trio.open_unix_socket(str(path))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise AgentFault(f"cannot connect to agent channel {path}: {exc}") from exc
            else:
                return cls(stream, zone)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def send(self, message: Heartbeat) -> None:
        try:
            await self._stream.send_all(encode_frame(message, AGENT_MAX_FRAME))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise AgentFault(f"agent channel closed while sending: {exc}") from exc

    async def receive(self) -> AgentHello | HeartbeatReply:
        """The next message from the guest; AgentFault on anything wrong."""
        while True:
            try:
                payload = self._decoder.next_frame()
            except InvalidRequest as exc:
                raise AgentFault(f"agent sent a bad frame: {exc.message}") from exc
            if payload is not None:
                self._count_message()
                try:
                    message = decode_from_agent(payload)
                except InvalidRequest as exc:
                    raise AgentFault(f"agent sent an invalid message: {exc.message}") from exc
                if isinstance(message, AgentHello | HeartbeatReply):
                    return message
                raise AgentFault(f"agent sent an unexpected message: {type(message).__name__}")
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise AgentFault(f"agent channel failed: {exc}") from exc
            if not data:
                raise AgentFault("agent channel closed by QEMU")
            try:
                self._decoder.feed(data)
            except InvalidRequest as exc:
                raise AgentFault(f"agent sent a bad frame: {exc.message}") from exc

    def _count_message(self) -> None:
        now = trio.current_time()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count > MAX_MESSAGES_PER_SECOND:
            raise AgentFault(
                f"agent flooded the channel (more than {MAX_MESSAGES_PER_SECOND} messages/s)"
            )


async def supervise_agent(
    path: Path,
    zone: str,
    *,
    boot_timeout: float,
    heartbeat_interval: float,
    silence_limit: float,
    on_hello: Callable[[AgentFacts], None],
    on_heartbeat: Callable[[HeartbeatReply], None] = lambda _reply: None,
) -> str:
    """Run the zone's agent link until it fails; returns the failure reason.

    Calls ``on_hello`` once the agent has introduced itself (within
    ``boot_timeout`` of being called) and ``on_heartbeat`` on every reply.
    Cancel to stop it (destroy, daemon shutdown).
    """
    link: AgentLink | None = None
    try:
        with trio.move_on_after(boot_timeout) as boot_scope:
            link = await AgentLink.connect(path, zone)
            await link.send(Heartbeat(seq=0))
            while True:
                message = await link.receive()
                if isinstance(message, AgentHello):
                    on_hello(
                        AgentFacts(
                            agent=message.agent,
                            kernel_release=message.kernel_release,
                            boot_s=message.boot_s,
                            pid=message.pid,
                            version=message.version,
                        )
                    )
                    break
        if boot_scope.cancelled_caught:
            return f"nothing heard from the agent within {boot_timeout:g} s"
        assert link is not None
        seq = 0
        while True:
            seq += 1
            await link.send(Heartbeat(seq=seq))
            deadline = trio.current_time() + silence_limit
            answered = False
            with trio.move_on_at(deadline):
                while not answered:
                    message = await link.receive()
                    if isinstance(message, HeartbeatReply):
                        if message.seq == seq:
                            answered = True
                            on_heartbeat(message)
                        elif message.seq > seq:
                            return f"agent answered heartbeat {message.seq} that was never sent"
                    # A repeated hello is harmless (the agent may re-announce itself).
            if not answered:
                return f"no heartbeat reply within {silence_limit:g} s"
            await trio.sleep(max(0.0, heartbeat_interval))
    except AgentFault as exc:
        return str(exc)
    finally:
        if link is not None:
            with trio.CancelScope(shield=True):
                await link.aclose()
    return "agent link ended"  # pragma: no cover - loops above only return
