"""zonectl's terminal while a process runs in a zone: raw mode, stdin, window size, signals.

Signals, from :class:`SignalRelay`:

- Ctrl-C (SIGINT) and SIGHUP go to the process; zonectl keeps waiting for it
  and exits with its status. After the first Ctrl-C it says on stderr that a
  second one stops waiting.
- SIGTERM, or Ctrl-C a second time, make zonectl stop waiting: the signal
  still goes to the process (given at most :data:`LEAVE_GRACE_S` to go out),
  then the connection is broken (:meth:`~zoned.client.Client.abort`) and
  zonectl exits 143 (SIGTERM) or 130 (Ctrl-C). That holds when the zone or
  the daemon no longer answers: nothing waits on them. A signal before the
  request was sent has nothing to go to: zonectl stops at once.
- With a terminal (``-t``), SIGWINCH resizes the zone's terminal to the local one.

Forwarding runs in tasks of its own, so a forward stuck on a daemon that does
not read never keeps the next signal from being seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import TextIO

import trio

from zoned import protocol as p
from zoned.cli.exits import EXIT_INTERRUPTED, PROG, StoppedWaiting
from zoned.client import Client, ClientError, Process
from zoned.errors import ZonedError

#: When zonectl stops waiting, how long the signal it forwards may take to go out.
LEAVE_GRACE_S = 1.0


def terminal_size() -> tuple[int, int]:
    """The local terminal's (rows, cols), bounded as the protocol wants; 24x80 if none."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return 24, 80
    return max(1, min(size.lines, 4096)), max(1, min(size.columns, 4096))


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """The local terminal in raw mode (so Ctrl-C etc. reach the zone), restored after."""
    if not enabled:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def forward_stdin(process: Process) -> None:
    """zonectl's stdin to the process, then EOF."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while data := await stream.receive_some(p.MAX_EXEC_CHUNK):
            await process.write(data)
    await process.close_stdin()


def _exit_status(signum: int) -> int:
    return EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum


class SignalRelay:
    """The signals zonectl gets while one process runs (rules in the module docstring).

    Open :attr:`signals` with ``trio.open_signal_receiver`` before the request
    is sent, run :meth:`serve` beside the process, set :attr:`process` once
    it exists. When it stops waiting, :attr:`left` says why and ``done`` (the
    scope around the process) is cancelled.
    """

    def __init__(self, client: Client, stderr: TextIO, *, tty: bool) -> None:
        self.client = client
        self.stderr = stderr
        self.tty = tty
        self.process: Process | None = None
        self.left: StoppedWaiting | None = None
        self._interrupted = False

    @property
    def signals(self) -> list[int]:
        wanted: list[int] = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        return [*wanted, signal.SIGWINCH] if self.tty else wanted

    async def serve(self, signals: AsyncIterator[int], done: trio.CancelScope) -> None:
        async with trio.open_nursery() as forwards:
            async for signum in signals:
                if signum == signal.SIGWINCH:
                    forwards.start_soon(self._resize)
                    continue
                leaving = (
                    self.process is None
                    or signum == signal.SIGTERM
                    or (signum == signal.SIGINT and self._interrupted)
                )
                if not leaving:
                    if signum == signal.SIGINT:
                        self._interrupted = True
                        self._say("sent SIGINT to the process; Ctrl-C again stops waiting for it")
                    forwards.start_soon(self._forward, signum)
                    continue
                await self._leave(signum, forwards)
                done.cancel()
                return

    async def _leave(self, signum: int, forwards: trio.Nursery) -> None:
        self.left = StoppedWaiting(signum, _exit_status(signum))
        if self.process is not None:
            sent = trio.Event()

            async def last_word() -> None:
                await self._forward(signum)
                sent.set()

            forwards.start_soon(last_word)
            with trio.move_on_after(LEAVE_GRACE_S):
                await sent.wait()
        # Wakes a forward or a write still stuck on a daemon that does not read.
        self.client.abort("zonectl stopped waiting for the process")

    async def _forward(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ClientError, ZonedError):  # nothing left to send it to
            await self.process.signal(signum)

    async def _resize(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ClientError, ZonedError):
                await self.process.resize(*terminal_size())

    def _say(self, message: str) -> None:
        self.stderr.write(f"{PROG}: {message}\n")
        self.stderr.flush()
