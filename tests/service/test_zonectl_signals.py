"""The client and zonectl against a daemon that never answers, on a real unix socket.

The peer here speaks the real protocol: it answers the hello and then takes
requests without ever answering them (a zone or a daemon that hangs), or
stops reading altogether (a daemon that does not even take input). What it
received is the test's evidence, in order; nothing is timed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from zoned import protocol as p
from zoned.cli.exits import EXIT_INTERRUPTED, EXIT_TERMINATED
from zoned.client import Client, ConnectionLost
from zoned.errors import InvalidRequest

ZONECTL = [sys.executable, "-m", "zoned.cli"]
#: A guard against a hang, never an assertion: the tests wait on events.
HANG_GUARD_S = 60.0
EOF_SEEN = "eof"


class QuietDaemon:
    """Answers the hello; records every other request and never answers it.

    With ``deaf`` it stops reading once an exec or run request came: what
    the client sends after it piles up in the socket's buffers.
    """

    def __init__(self, path: Path, *, deaf: bool = False) -> None:
        self.path = path
        self.deaf = deaf
        self._send, self.received = trio.open_memory_channel[p.Request | str](1000)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(self.path))
        listener.listen()
        task_status.started()
        with listener:
            sock, _ = await listener.accept()
        async with trio.SocketStream(sock) as stream:
            decoder = p.FrameDecoder(p.DEFAULT_MAX_FRAME)
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    request = p.decode_request(frame)
                    if isinstance(request, p.Hello):
                        reply = p.HelloReply(id=request.id, version=p.PROTOCOL_VERSION, server="q")
                        await stream.send_all(p.encode_frame(reply))
                        continue
                    await self._send.send(request)
                    if self.deaf and isinstance(request, p.Exec | p.RunZone):
                        await trio.sleep_forever()
            await self._send.send(EOF_SEEN)

    async def next(self) -> p.Request | str:
        return await self.received.receive()


@asynccontextmanager
async def quiet_daemon(tmp: Path, *, deaf: bool = False) -> AsyncIterator[QuietDaemon]:
    daemon = QuietDaemon(tmp / "quiet.sock", deaf=deaf)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        yield daemon
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def zonectl(
    daemon: QuietDaemon, *args: str, stdin: int = subprocess.DEVNULL
) -> AsyncIterator[trio.Process]:
    process = await trio.lowlevel.open_process(
        [*ZONECTL, "--socket", str(daemon.path), *args],
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stderr_of(process: trio.Process) -> str:
    assert process.stderr is not None
    data = bytearray()
    while chunk := await process.stderr.receive_some(65536):
        data.extend(chunk)
    return data.decode(errors="replace")


async def expect_request(daemon: QuietDaemon, kind: type[p.Request]) -> p.Request:
    request = await daemon.next()
    assert isinstance(request, kind), request
    return request


# --------------------------------------------------------------------------- the client


@pytest.mark.parametrize("how", ["exec_process", "run_process", "exec", "run"])
async def test_an_empty_argv_is_refused_before_anything_is_sent(short_tmp: Path, how: str) -> None:
    async with quiet_daemon(short_tmp) as daemon, Client(daemon.path, "test") as client:
        with pytest.raises(InvalidRequest, match="argv must be a non-empty list"):
            if how == "exec_process":
                async with client.exec_process("web", []):
                    pass
            elif how == "run_process":
                async with client.run_process([]):
                    pass
            elif how == "exec":
                await client.exec("web", [])
            else:
                await client.run([])
        # Frames arrive in order: the next thing the daemon gets is this.
        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.get_zone, "after")
                after = await daemon.next()
                nursery.cancel_scope.cancel()  # it is never answered
    assert isinstance(after, p.GetZone) and after.name == "after", after


async def test_abort_wakes_a_write_stuck_on_a_daemon_that_does_not_read(short_tmp: Path) -> None:
    woken = trio.Event()
    async with (
        quiet_daemon(short_tmp, deaf=True) as daemon,
        Client(daemon.path, "t") as client,
        client.exec_process("web", ["cat"], stdin=True) as process,
    ):
        with trio.fail_after(HANG_GUARD_S):
            await expect_request(daemon, p.Exec)

        async def write_forever() -> None:
            with pytest.raises(ConnectionLost) as raised:
                while True:
                    await process.write(b"x" * p.MAX_EXEC_CHUNK)
            assert "zonectl gave up" in str(raised.value)
            woken.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_forever)
            # Only a write that blocks lets this task run while the other loops.
            await trio.testing.wait_all_tasks_blocked()
            client.abort("zonectl gave up")
    assert woken.is_set()


# --------------------------------------------------------------------------- zonectl


async def test_second_ctrl_c_ends_zonectl_when_the_zone_never_answers(short_tmp: Path) -> None:
    async with (
        quiet_daemon(short_tmp) as daemon,
        zonectl(daemon, "exec", "web", "--", "sleep", "1000") as process,
    ):
        with trio.fail_after(HANG_GUARD_S):
            exec_request = await expect_request(daemon, p.Exec)
            process.send_signal(signal.SIGINT)
            # The first Ctrl-C goes to the process, as ever.
            first = await expect_request(daemon, p.ExecSignal)
            assert first == p.ExecSignal(id=exec_request.id, signal=signal.SIGINT)
            process.send_signal(signal.SIGINT)
            assert await process.wait() == EXIT_INTERRUPTED
            # The second goes too, then zonectl hangs up.
            assert await daemon.next() == first
            assert await daemon.next() == EOF_SEEN
            err = await stderr_of(process)
    assert "Ctrl-C again stops waiting" in err
    assert err.endswith("zonectl: interrupted: stopped waiting for the process\n"), err


async def test_sigterm_ends_zonectl_when_the_zone_never_answers(short_tmp: Path) -> None:
    async with (
        quiet_daemon(short_tmp) as daemon,
        zonectl(daemon, "run", "--", "sleep", "1000") as process,
    ):
        with trio.fail_after(HANG_GUARD_S):
            run_request = await expect_request(daemon, p.RunZone)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == EXIT_TERMINATED
            assert await daemon.next() == p.ExecSignal(id=run_request.id, signal=signal.SIGTERM)
            assert await daemon.next() == EOF_SEEN


async def test_sigterm_ends_zonectl_when_the_daemon_does_not_even_read(short_tmp: Path) -> None:
    """zonectl's stdin fills the socket towards a deaf daemon: every write of
    zonectl's is stuck, and it still ends."""
    payload = short_tmp / "payload"
    payload.write_bytes(os.urandom(16 * 1024 * 1024))
    with payload.open("rb") as stdin:
        async with (
            quiet_daemon(short_tmp, deaf=True) as daemon,
            zonectl(daemon, "exec", "-i", "web", "--", "cat", stdin=stdin.fileno()) as process,
        ):
            with trio.fail_after(HANG_GUARD_S):
                await expect_request(daemon, p.Exec)
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == EXIT_TERMINATED
