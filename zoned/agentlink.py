"""Host side of a zone's agent channel (the virtio-serial port's unix socket).

Everything the guest sends is hostile input. The link reads through a
bounded :class:`FrameDecoder`, decodes with the strict agent decoder, caps the
rate of control messages, holds the agent to the flow-control windows, and
turns any violation into :class:`~zoned.errors.AgentProtocolError` with a
clear reason (silence is :class:`~zoned.errors.AgentSilent`, a broken channel
:class:`~zoned.errors.AgentFault`); the zone manager then marks that zone
failed. Nothing the guest sends can raise anything else out of here, and
nothing it sends can make the host buffer more than the windows it granted.

Handshake: QEMU listens on the socket from the moment the domain starts. The
host connects and sends ``Heartbeat(seq=0)``; the agent answers every
``seq=0`` heartbeat with its ``AgentHello`` (and also says hello on its own
once it is up), so a host that connects late or reconnects after a daemon
restart always learns who is there. After the hello, the host sends a
heartbeat every interval and expects a reply before the silence limit.

Every hello the agent sends when the host connects comes before its reply
to any heartbeat. A hello after a reply means the agent's side of the channel
started again (it was not expected to: see :mod:`zoned.agent.channel`), and
the processes of its previous session are gone: every one the host still
follows ends with :class:`ExecLost`, the channel stays up.

Processes (exec): one channel carries many processes, each under an
``exec_id`` chosen by the host. The agent may send at most the output
*credit* the host granted (:data:`EXEC_OUTPUT_WINDOW` at start, topped up by
``AgentExecCredit`` as the consumer takes output); the host may send at most
the input credit the agent granted (:data:`EXEC_INPUT_WINDOW`, topped up by
``AgentExecInputCredit``). Both sides count with :class:`zoned.credit.CreditWindow`.
Output waiting for its consumer is merged per stream, so a flood of tiny
messages costs no more memory than its bytes. A process's end is the agent's
own :class:`AgentExecExit` (the daemon converts it once, for the client), or
:class:`ExecLost` when nobody can know how it ended.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

import trio

from zoned.credit import CreditWindow
from zoned.errors import AgentFault, AgentProtocolError, AgentSilent, InvalidRequest, NoCapacity
from zoned.protocol import (
    AGENT_MAX_FRAME,
    EXEC_INPUT_WINDOW,
    EXEC_OUTPUT_WINDOW,
    MAX_EXEC_CHUNK,
    MAX_EXECS_PER_ZONE,
    AgentExecCredit,
    AgentExecExit,
    AgentExecInput,
    AgentExecInputCredit,
    AgentExecOutput,
    AgentExecResize,
    AgentExecSignal,
    AgentExecStart,
    AgentExecStarted,
    AgentHello,
    AgentToHost,
    FrameDecoder,
    Heartbeat,
    HeartbeatReply,
    HostToAgent,
    decode_from_agent,
    encode_frame,
)

log = logging.getLogger(__name__)

# Control messages (everything but output) per second above which a guest is
# flooding the host. Output is bounded by credit instead.
MAX_MESSAGES_PER_SECOND = 200
RECEIVE_CHUNK = 64 * 1024


__all__ = [
    "AgentFault",
    "AgentLink",
    "AgentMux",
    "ExecEvent",
    "ExecLost",
    "ExecOutputPiece",
    "ExecSession",
    "supervise_agent",
]


class AgentLink:
    """One connection to the agent: framed, validated, rate-limited IO."""

    def __init__(self, stream: trio.SocketStream, zone: str) -> None:
        self._stream = stream
        self._zone = zone
        self._decoder = FrameDecoder(AGENT_MAX_FRAME)
        self._window_start = trio.current_time()
        self._window_count = 0
        self._send_lock = trio.Lock()

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

    async def send(self, message: HostToAgent) -> None:
        frame = encode_frame(message, AGENT_MAX_FRAME)
        try:
            async with self._send_lock:
                await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise AgentFault(f"agent channel closed while sending: {exc}") from exc

    async def receive(self) -> AgentToHost:
        """The next message from the guest; AgentFault on anything wrong."""
        while True:
            try:
                payload = self._decoder.next_frame()
            except InvalidRequest as exc:
                raise AgentProtocolError(f"agent sent a bad frame: {exc.message}") from exc
            if payload is not None:
                try:
                    message = decode_from_agent(payload)
                except InvalidRequest as exc:
                    raise AgentProtocolError(
                        f"agent sent an invalid message: {exc.message}"
                    ) from exc
                if not isinstance(message, AgentExecOutput):
                    self._count_message()
                return message
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise AgentFault(f"agent channel failed: {exc}") from exc
            if not data:
                raise AgentFault("agent channel closed by QEMU")
            try:
                self._decoder.feed(data)
            except InvalidRequest as exc:
                raise AgentProtocolError(f"agent sent a bad frame: {exc.message}") from exc

    def _count_message(self) -> None:
        now = trio.current_time()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count > MAX_MESSAGES_PER_SECOND:
            raise AgentProtocolError(
                f"agent flooded the channel (more than {MAX_MESSAGES_PER_SECOND} messages/s)"
            )


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecOutputPiece:
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class ExecLost:
    """Nobody can tell how the process ended: the agent channel broke, or the
    agent started a new session without it. ``reason`` says so, for the client."""

    reason: str


ExecEvent = AgentExecStarted | ExecOutputPiece | AgentExecExit | ExecLost


@dataclass
class ExecSession:
    """One process in the zone, as the host sees it.

    The consumer calls :meth:`next_event` until it returns the end
    (:class:`AgentExecExit` or :class:`ExecLost`); it may call
    :meth:`write_input` and :meth:`signal` meanwhile. Output taken out by
    :meth:`next_event` is credited back to the agent.
    """

    exec_id: int
    mux: AgentMux
    started: AgentExecStarted | None = None
    ended: AgentExecExit | ExecLost | None = None
    # Output not yet taken by the consumer: (stream, bytes) runs, merged.
    _pending: list[tuple[Literal["stdout", "stderr"], bytearray]] = field(default_factory=list)
    _pending_bytes: int = 0
    # Output the agent may still send (we receive), input we may still send.
    _output: CreditWindow = field(default_factory=lambda: CreditWindow(EXEC_OUTPUT_WINDOW))
    _input: CreditWindow = field(default_factory=lambda: CreditWindow(EXEC_INPUT_WINDOW))
    _started_taken: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)
    _input_changed: trio.Event = field(default_factory=trio.Event)
    _input_closed: bool = False
    # Nobody consumes it any more (its client went away): see abandon().
    abandoned: bool = False

    # -- fed by the mux (from the guest) --

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def on_started(self, message: AgentExecStarted) -> None:
        if self.started is not None or self.ended is not None:
            raise AgentProtocolError(f"agent reported exec {self.exec_id} started twice")
        self.started = message
        self._wake()

    def on_output(self, message: AgentExecOutput) -> None:
        if self.started is None or self.ended is not None:
            raise AgentProtocolError(
                f"agent sent output for exec {self.exec_id} outside its lifetime"
            )
        size = len(message.data)
        credit = self._output.available
        if self._output.spend(size):
            raise AgentProtocolError(
                f"agent sent {size} bytes of output for exec {self.exec_id}"
                f" with only {credit} bytes of credit"
            )
        if self.abandoned:
            return  # dropped; the mux credits it back (AgentMux.receive_forever)
        if self._pending and self._pending[-1][0] == message.stream:
            self._pending[-1][1].extend(message.data)
        else:
            self._pending.append((message.stream, bytearray(message.data)))
        self._pending_bytes += size
        self._wake()

    def on_input_credit(self, message: AgentExecInputCredit) -> None:
        if self._input.grant(message.bytes):
            raise AgentProtocolError(
                f"agent granted input credit beyond the window for exec {self.exec_id}"
            )
        self._input_changed.set()
        self._input_changed = trio.Event()

    def on_exit(self, message: AgentExecExit) -> None:
        if self.ended is not None:
            raise AgentProtocolError(f"agent reported exec {self.exec_id} ended twice")
        if message.error:
            if self.started is not None:
                raise AgentProtocolError(
                    f"agent reported a start error for running exec {self.exec_id}"
                )
        elif self.started is None:
            raise AgentProtocolError(f"agent reported exec {self.exec_id} ended before it started")
        elif (message.exit_code is None) == (message.signal is None):
            raise AgentProtocolError(f"agent reported exec {self.exec_id} ended without one status")
        self.ended = message
        if self.abandoned:
            self.mux.forget(self.exec_id)
        self._wake()

    def on_lost(self, reason: str) -> None:
        if self.ended is None:
            self.ended = ExecLost(reason)
        self._wake()
        self._input_changed.set()

    # -- used by the consumer --

    async def next_event(self) -> ExecEvent:
        """The next thing that happened: started, a piece of output, the end."""
        while True:
            if self.started is not None and not self._started_taken:
                self._started_taken = True
                return self.started
            if self._pending:
                stream, data = self._pending[0]
                piece = bytes(data[:MAX_EXEC_CHUNK])
                del data[:MAX_EXEC_CHUNK]
                if not data:
                    self._pending.pop(0)
                self._pending_bytes -= len(piece)
                if self.ended is None:
                    self._output.consume(len(piece))
                    await self.mux.send_quietly(
                        AgentExecCredit(exec_id=self.exec_id, bytes=self._output.release())
                    )
                return ExecOutputPiece(stream, piece)
            if self.ended is not None:
                self.mux.forget(self.exec_id)
                return self.ended
            await self._changed.wait()

    async def wait_ended(self) -> None:
        """Until the process has ended (its output is not taken meanwhile)."""
        while self.ended is None:
            await self._changed.wait()

    async def abandon(self) -> None:
        """Nobody will consume this process any more: its output is dropped (and
        credited back, so that the agent can drain its pipes and report the end),
        and it leaves the table once it ends. Its stdin is closed."""
        if self.abandoned:
            await trio.lowlevel.checkpoint()
            return
        self.abandoned = True
        dropped, self._pending, self._pending_bytes = self._pending_bytes, [], 0
        if self.ended is not None:
            self.mux.forget(self.exec_id)
            await trio.lowlevel.checkpoint()
            return
        await self.return_credit(dropped)
        if not self._input_closed:
            self._input_closed = True
            await self.mux.send_quietly(AgentExecInput(exec_id=self.exec_id, eof=True))

    async def return_credit(self, count: int) -> None:
        """Lend ``count`` bytes of output that arrived back to the agent (taken or dropped)."""
        if count <= 0 or self.ended is not None:
            await trio.lowlevel.checkpoint()
            return
        self._output.consume(count)
        await self.mux.send_quietly(
            AgentExecCredit(exec_id=self.exec_id, bytes=self._output.release())
        )

    async def write_input(self, data: bytes, eof: bool = False) -> None:
        """Send stdin, waiting for the agent's credit; ``eof`` closes stdin after it.

        Returns early once the process has ended (or its channel broke:
        :meth:`next_event` then reports the end).
        """
        if self._input_closed:
            return
        view = memoryview(data)
        while view or eof:
            if self.ended is not None:
                return
            if view and self._input.available == 0:
                await self._input_changed.wait()
                continue
            size = min(len(view), self._input.available, MAX_EXEC_CHUNK)
            chunk = bytes(view[:size])
            view = view[size:]
            last = eof and not view
            self._input.spend(size)
            await self.mux.send_quietly(AgentExecInput(exec_id=self.exec_id, data=chunk, eof=last))
            if last:
                self._input_closed = True
                return

    async def signal(self, signum: int) -> None:
        if self.ended is None:
            await self.mux.send_quietly(AgentExecSignal(exec_id=self.exec_id, signal=signum))

    async def resize(self, rows: int, cols: int) -> None:
        if self.ended is None:
            await self.mux.send_quietly(AgentExecResize(exec_id=self.exec_id, rows=rows, cols=cols))


class AgentMux:
    """Dispatches what the agent sends to the waiting heartbeat and processes."""

    def __init__(self, link: AgentLink, zone: str) -> None:
        self.link = link
        self.zone = zone
        self.execs: dict[int, ExecSession] = {}
        self._ids = itertools.count(1)
        self.last_heartbeat: HeartbeatReply | None = None
        self._heartbeat_seen = trio.Event()
        self.lost: str | None = None
        # The agent answered a heartbeat of this connection: every hello of
        # its greeting came before that reply, so a hello after it starts a
        # new session on the agent's side.
        self._greeted = False

    async def start_exec(self, start: Callable[[int], AgentExecStart]) -> ExecSession:
        """Send ``start(exec_id)`` and return the session that follows it."""
        if self.lost is not None:
            raise AgentFault(f"agent channel lost: {self.lost}")
        if len(self.execs) >= MAX_EXECS_PER_ZONE:
            raise NoCapacity(
                f"zone {self.zone!r} already runs {MAX_EXECS_PER_ZONE} processes (the limit)"
            )
        exec_id = next(self._ids)
        session = ExecSession(exec_id, self)
        self.execs[exec_id] = session
        try:
            await self.link.send(start(exec_id))
        except AgentFault as exc:
            self.lose(str(exc))
            raise
        return session

    def forget(self, exec_id: int) -> None:
        self.execs.pop(exec_id, None)

    async def send_quietly(self, message: HostToAgent) -> None:
        """Send; a broken channel ends every process (with :class:`ExecLost`) instead
        of raising, so that the consumers learn it from :meth:`ExecSession.next_event`."""
        try:
            await self.link.send(message)
        except AgentFault as exc:
            log.debug("zone %s: %s", self.zone, exc)
            self.lose(str(exc))

    async def receive_forever(self) -> None:
        """Dispatch until the channel fails (:class:`AgentFault`)."""
        try:
            while True:
                message = await self.link.receive()
                self._dispatch(message)
                if isinstance(message, AgentExecOutput):
                    session = self.execs.get(message.exec_id)
                    if session is not None and session.abandoned:
                        # Nobody reads it: give the credit straight back.
                        await session.return_credit(len(message.data))
        except AgentFault as exc:
            self.lose(str(exc))
            raise

    def lose(self, reason: str) -> None:
        """The channel is gone: every process ends with :class:`ExecLost`."""
        if self.lost is None:
            self.lost = reason
        self._end_sessions(f"the process's zone went away: agent channel lost: {reason}")
        self._heartbeat_seen.set()

    def _end_sessions(self, reason: str) -> None:
        for session in list(self.execs.values()):
            session.on_lost(reason)

    def _session(self, exec_id: int) -> ExecSession:
        session = self.execs.get(exec_id)
        if session is None:
            raise AgentProtocolError(
                f"agent sent a message for exec {exec_id}, which is not running"
            )
        return session

    def _dispatch(self, message: AgentToHost) -> None:
        match message:
            case AgentExecOutput():
                self._session(message.exec_id).on_output(message)
            case AgentExecInputCredit():
                self._session(message.exec_id).on_input_credit(message)
            case AgentExecStarted():
                self._session(message.exec_id).on_started(message)
            case AgentExecExit():
                self._session(message.exec_id).on_exit(message)
            case HeartbeatReply():
                self._greeted = True
                self.last_heartbeat = message
                self._heartbeat_seen.set()
                self._heartbeat_seen = trio.Event()
            case AgentHello():
                if self._greeted:
                    self._restarted()

    def _restarted(self) -> None:
        """A hello on a greeted channel: the agent's side started a new session,
        without the processes of the old one (it killed them)."""
        if self.execs:
            log.warning(
                "zone %s: the agent said hello again; %d process(es) of its previous"
                " session are gone",
                self.zone,
                len(self.execs),
            )
        self._end_sessions(
            "the zone's agent restarted its channel: the process was killed with its session"
        )
        # Out of the table at once (their consumers still hold them): the new
        # session never names them, and they do not count against the limit.
        self.execs.clear()

    async def heartbeat_forever(
        self,
        interval: float,
        silence_limit: float,
        on_heartbeat: Callable[[HeartbeatReply], None],
    ) -> NoReturn:
        """Send heartbeats until the agent stops answering (:class:`AgentFault`)."""
        seq = 0
        while True:
            seq += 1
            await self.link.send(Heartbeat(seq=seq))
            with trio.move_on_after(silence_limit):
                while True:
                    if self.lost is not None:
                        raise AgentFault(f"agent channel lost: {self.lost}")
                    reply = self.last_heartbeat
                    if reply is not None and reply.seq == seq:
                        on_heartbeat(reply)
                        break
                    if reply is not None and reply.seq > seq:
                        raise AgentProtocolError(
                            f"agent answered heartbeat {reply.seq} that was never sent"
                        )
                    await self._heartbeat_seen.wait()
            if self.last_heartbeat is None or self.last_heartbeat.seq != seq:
                raise AgentSilent(f"no heartbeat reply within {silence_limit:g} s")
            await trio.sleep(max(0.0, interval))


async def supervise_agent(
    path: Path,
    zone: str,
    *,
    boot_timeout: float,
    heartbeat_interval: float,
    silence_limit: float,
    on_hello: Callable[[AgentHello], None],
    on_heartbeat: Callable[[HeartbeatReply], None] = lambda _reply: None,
    on_mux: Callable[[AgentMux | None], None] = lambda _mux: None,
) -> AgentFault:
    """Run the zone's agent link until it fails; returns why (never raises it).

    Calls ``on_hello`` once the agent has introduced itself (within
    ``boot_timeout`` of being called), then ``on_mux`` with the multiplexer
    that runs processes (and with None when the link ends), and
    ``on_heartbeat`` on every reply. Cancel to stop it (destroy, shutdown).
    """
    link: AgentLink | None = None
    mux: AgentMux | None = None
    try:
        with trio.move_on_after(boot_timeout) as boot_scope:
            link = await AgentLink.connect(path, zone)
            await link.send(Heartbeat(seq=0))
            while True:
                message = await link.receive()
                if isinstance(message, AgentHello):
                    on_hello(message)
                    break
                if not isinstance(message, HeartbeatReply):
                    raise AgentProtocolError(
                        f"agent sent {type(message).__name__} before its hello"
                    )
        if boot_scope.cancelled_caught:
            return AgentSilent(f"nothing heard from the agent within {boot_timeout:g} s")
        assert link is not None
        mux = AgentMux(link, zone)
        on_mux(mux)
        result: list[AgentFault] = []

        async def until_fault(
            body: Callable[[], Awaitable[object]], done: trio.CancelScope
        ) -> None:
            try:
                await body()
            except AgentFault as exc:
                result.append(exc)
                mux.lose(str(exc))  # the processes hear the real reason
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                until_fault,
                lambda: mux.heartbeat_forever(heartbeat_interval, silence_limit, on_heartbeat),
                nursery.cancel_scope,
            )
            nursery.start_soon(until_fault, mux.receive_forever, nursery.cancel_scope)
        return result[0] if result else AgentFault("agent link ended")
    except AgentFault as exc:
        return exc
    finally:
        if mux is not None:
            mux.lose("the zone's agent link was closed")
            on_mux(None)
        if link is not None:
            with trio.CancelScope(shield=True):
                await link.aclose()
