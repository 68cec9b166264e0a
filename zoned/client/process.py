"""A process running in a zone, as a client streams it, and how it ended.

:class:`ExecResult` carries the daemon's :class:`~zoned.protocol.ExecExit`
itself (``result.exit``), so whatever the protocol reports about an exit
reaches the caller without a copy here; ``stdout``/``stderr`` are the output a
caller collected, ``returncode`` the :mod:`subprocess` convention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import trio

from zoned import protocol as p
from zoned.client.connection import ProtocolError
from zoned.errors import innermost

if TYPE_CHECKING:
    from zoned.client.connection import Connection

#: Output chunks kept while waiting for a process to start, at most.
_MAX_EARLY_CHUNKS = 16

#: One piece of a process's stdout or stderr: the wire message itself
#: (``chunk.stream``, ``chunk.data``).
OutputChunk: TypeAlias = p.ExecOutput


class ExecResult(NamedTuple):
    """How a process ended (``exit``), and (from ``exec``/``run``/``communicate``) its output."""

    exit: p.ExecExit
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def returncode(self) -> int:
        """As :mod:`subprocess` has it: the exit code, or minus the signal."""
        if self.exit.exit_code is not None:
            return self.exit.exit_code
        return -(self.exit.signal or 0)


class Process:
    """A process running in a zone (from :meth:`Client.exec_process` / ``run_process``).

    ``async for chunk in process`` yields :data:`OutputChunk` in order until
    the process ends; then :attr:`result` is set. Reading its output is what
    lets it go on writing: the daemon takes output from the zone only as fast
    as this client reads it.
    """

    def __init__(
        self,
        connection: Connection,
        request_id: int,
        replies: trio.MemoryReceiveChannel[p.Reply],
    ) -> None:
        self._connection = connection
        self._id = request_id
        self._replies = replies
        self.pid: int | None = None
        self.zone: p.ZoneInfo | None = None
        self.result: ExecResult | None = None
        # Output that came while started() waited: a process that cannot
        # start says why on stderr, then ends, with no ExecStarted.
        self._early: list[OutputChunk] = []

    def __aiter__(self) -> Process:
        return self

    async def __anext__(self) -> OutputChunk:
        if self._early:
            return self._early.pop(0)
        while self.result is None:
            reply = await self._next_reply()
            if isinstance(reply, p.ExecOutput):
                return reply
        raise StopAsyncIteration

    async def started(self) -> int | None:
        """Wait until the process runs; its pid in the zone. None: it ended
        without starting (:attr:`result` says how; iterating gives the
        output, e.g. why it could not start)."""
        while self.pid is None and self.result is None:
            reply = await self._next_reply()
            if isinstance(reply, p.ExecOutput):
                if len(self._early) >= _MAX_EARLY_CHUNKS:
                    raise ProtocolError("too much output before the process started")
                self._early.append(reply)
        return self.pid

    async def start_failure(self, max_chars: int = 2000) -> str:
        """After :meth:`started` returned None: why the process did not start
        (what the agent wrote, cut to ``max_chars``), read to the end."""
        why = bytearray()
        async for chunk in self:
            why.extend(chunk.data[: max(0, max_chars - len(why))])
        return why.decode("utf-8", "replace").strip()[:max_chars] or "no reason given"

    async def _next_reply(self) -> p.Reply:
        """The next reply of the stream; what it says about the process is recorded."""
        reply = await self._connection._receive(self._replies)
        match reply:
            case p.ExecOutput():
                pass
            case p.ExecStarted():
                self.pid = reply.pid
            case p.ZoneReply():
                self.zone = reply.zone
            case p.ExecExit():
                self.result = ExecResult(reply)
            case _:
                raise ProtocolError(f"unexpected reply in a process stream: {reply!r}")
        return reply

    async def write(self, data: bytes) -> None:
        """Send bytes to the process's stdin (it was started with ``stdin=True``)."""
        view = memoryview(data)
        while view:
            chunk = bytes(view[: p.MAX_EXEC_CHUNK])
            view = view[p.MAX_EXEC_CHUNK :]
            await self._connection._send_input(p.ExecInput(id=self._id, data=chunk))

    async def close_stdin(self) -> None:
        await self._connection._send_input(p.ExecInput(id=self._id, eof=True))

    async def signal(self, signum: int) -> None:
        """Send a signal to the process (its process group)."""
        await self._connection._send_input(p.ExecSignal(id=self._id, signal=signum))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the size of the process's terminal (``tty=True`` only)."""
        await self._connection._send_input(p.ExecResize(id=self._id, rows=rows, cols=cols))

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
