"""The client and zonectl against a scripted daemon on a real unix socket.

The peer here speaks the real protocol: it answers the hello, and then
either answers requests from a script (to drive zonectl's reports without a
zone), or takes them without ever answering (a zone or a daemon that
hangs), or stops reading altogether (a daemon that does not even take
input). What it received is the test's evidence, in order; nothing is timed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from tests.zonectl_run import ZONECTL
from zoned import protocol as p
from zoned.cli.exits import EXIT_INTERRUPTED, EXIT_TERMINATED
from zoned.client import Client, ConnectionLost
from zoned.errors import InvalidRequest

#: A guard against a hang, never an assertion: the tests wait on events.
HANG_GUARD_S = 60.0
EOF_SEEN = "eof"


Script = Callable[[p.Request], Sequence[p.Reply]]


def never_answer(request: p.Request) -> Sequence[p.Reply]:
    return ()


class ScriptedDaemon:
    """Answers the hello; records every other request and answers it from ``script``.

    With ``deaf`` it stops reading once an exec or run request came: what
    the client sends after it piles up in the socket's buffers.
    """

    def __init__(self, path: Path, script: Script = never_answer, *, deaf: bool = False) -> None:
        self.path = path
        self.script = script
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
                    for answer in self.script(request):
                        await stream.send_all(p.encode_frame(answer))
                    if self.deaf and isinstance(request, p.Exec | p.RunZone):
                        await trio.sleep_forever()
            await self._send.send(EOF_SEEN)

    async def next(self) -> p.Request | str:
        return await self.received.receive()


@asynccontextmanager
async def scripted_daemon(
    tmp: Path, script: Script = never_answer, *, deaf: bool = False
) -> AsyncIterator[ScriptedDaemon]:
    daemon = ScriptedDaemon(tmp / "scripted.sock", script, deaf=deaf)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        yield daemon
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def zonectl(
    daemon: ScriptedDaemon, *args: str, stdin: int = subprocess.DEVNULL
) -> AsyncIterator[trio.Process]:
    process = await trio.lowlevel.open_process(
        [*ZONECTL, "--socket", str(daemon.path), *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def all_of(stream: trio.abc.ReceiveStream | None) -> bytes:
    assert stream is not None
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data.extend(chunk)
    return bytes(data)


async def stderr_of(process: trio.Process) -> str:
    return (await all_of(process.stderr)).decode(errors="replace")


async def expect_request(daemon: ScriptedDaemon, kind: type[p.Request]) -> p.Request:
    request = await daemon.next()
    assert isinstance(request, kind), request
    return request


# --------------------------------------------------------------------------- the client


@pytest.mark.parametrize("how", ["exec_process", "run_process", "exec", "run"])
async def test_a_string_argv_is_refused_before_anything_is_sent(short_tmp: Path, how: str) -> None:
    async with scripted_daemon(short_tmp) as daemon, Client(daemon.path, "test") as client:
        with pytest.raises(InvalidRequest, match="argv must be a list"):
            if how == "exec_process":
                async with client.exec_process("web", "ls -l"):
                    pass
            elif how == "run_process":
                async with client.run_process("ls -l"):
                    pass
            elif how == "exec":
                await client.exec("web", "ls -l")
            else:
                await client.run("ls -l")
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
        scripted_daemon(short_tmp, deaf=True) as daemon,
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
        scripted_daemon(short_tmp) as daemon,
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
        scripted_daemon(short_tmp) as daemon,
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
            scripted_daemon(short_tmp, deaf=True) as daemon,
            zonectl(daemon, "exec", "-i", "web", "--", "cat", stdin=stdin.fileno()) as process,
        ):
            with trio.fail_after(HANG_GUARD_S):
                await expect_request(daemon, p.Exec)
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == EXIT_TERMINATED


# --------------------------------------------------------------------------- zonectl's reports


def exits_with(exit: p.ExecExit, stdout: bytes = b"", stderr: bytes = b"") -> Script:
    """A process that starts, writes, and ends as ``exit`` says."""

    def script(request: p.Request) -> Sequence[p.Reply]:
        if not isinstance(request, p.Exec | p.RunZone):
            return ()
        rid = request.id
        replies: list[p.Reply] = [p.ExecStarted(id=rid, pid=42)]
        replies += [p.ExecOutput(id=rid, stream="stdout", data=stdout)] if stdout else []
        replies += [p.ExecOutput(id=rid, stream="stderr", data=stderr)] if stderr else []
        return [*replies, msgspec.structs.replace(exit, id=rid)]

    return script


async def run_zonectl(daemon: ScriptedDaemon, *args: str) -> tuple[int, bytes, bytes]:
    async with zonectl(daemon, *args) as process:
        with trio.fail_after(HANG_GUARD_S):
            results: dict[str, bytes] = {}
            async with trio.open_nursery() as nursery:

                async def collect(name: str, stream: trio.abc.ReceiveStream | None) -> None:
                    results[name] = await all_of(stream)

                nursery.start_soon(collect, "stdout", process.stdout)
                nursery.start_soon(collect, "stderr", process.stderr)
                status = await process.wait()
    return status, results["stdout"], results["stderr"]


async def test_exec_passes_output_and_exit_status(short_tmp: Path) -> None:
    script = exits_with(p.ExecExit(id=0, exit_code=3), b"hi\n", b"oops\n")
    async with scripted_daemon(short_tmp, script) as daemon:
        done = await run_zonectl(daemon, "exec", "web", "--", "sh", "-c", "exit 3")
    assert done == (3, b"hi\n", b"oops\n")


async def test_out_of_memory_without_a_limit_is_reported_without_one(short_tmp: Path) -> None:
    script = exits_with(p.ExecExit(id=0, signal=9, oom_killed=True, memory_peak_kib=9000))
    async with scripted_daemon(short_tmp, script) as daemon:
        status, _, err = await run_zonectl(daemon, "exec", "web", "--", "hog")
    assert status == 128 + 9
    assert err == b"zonectl: killed: out of memory (no limit was set: the zone ran out)\n"


async def test_run_timeout_is_reported(short_tmp: Path) -> None:
    script = exits_with(p.ExecExit(id=0, signal=9, timed_out=True))
    async with scripted_daemon(short_tmp, script) as daemon:
        status, _, err = await run_zonectl(daemon, "run", "--timeout", "5", "--", "sleep", "9")
        request = await expect_request(daemon, p.RunZone)
    assert (status, err) == (124, b"zonectl: the command timed out after 5 s of running; killed\n")
    assert isinstance(request, p.RunZone) and request.timeout_s == 5.0


async def test_json_report_carries_every_field_of_the_exit(short_tmp: Path) -> None:
    exit = p.ExecExit(id=0, exit_code=0, cpu_time_s=0.5, memory_peak_kib=1234)
    async with scripted_daemon(short_tmp, exits_with(exit, b"4\n")) as daemon:
        status, out, err = await run_zonectl(daemon, "--json", "exec", "web", "--", "true")
    assert (status, err) == (0, b"")
    report = msgspec.json.decode(out)
    assert report == {
        "zone": "web",
        "pid": 42,
        **{name: getattr(exit, name) for name in p.ExecExit.__struct_fields__ if name != "id"},
        "stdout": "4\n",
        "stderr": "",
    }
