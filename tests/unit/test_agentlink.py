"""The host side of the agent channel against scripted agents, good and hostile.

Each test serves a unix socket the way QEMU does for a zone and plays the
agent on it: a well-behaved one that runs "processes" by script, and hostile
ones that send garbage, oversize frames, floods, output beyond their credit,
messages for processes that do not exist, or nothing at all. The host code
under test is the real :func:`zoned.agentlink.supervise_agent`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
import trio

from tests.rawframes import FrameStream
from tests.waiting import wait_until_async
from zoned import protocol as p
from zoned.agentlink import (
    MAX_MESSAGES_PER_SECOND,
    AgentMux,
    ExecEvent,
    ExecLost,
    ExecOutputPiece,
    ExecSession,
    supervise_agent,
)
from zoned.errors import AgentFault, AgentProtocolError, AgentSilent

ENDS = (p.AgentExecExit, ExecLost)

HELLO = p.AgentHello(version=1, agent="fake-agent/1", kernel_release="6.12.0", boot_s=1.0, pid=1)


class FakeAgent(FrameStream[p.AgentToHost, p.HostToAgent]):
    """The guest end of one connection: frames in and out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream, p.AGENT_MAX_FRAME, p.decode_to_agent)

    async def answer_heartbeats_until(self, kind: type[p.HostToAgent]) -> p.HostToAgent:
        """Answer heartbeats (hello on seq 0) until a message of ``kind`` arrives."""
        while True:
            message = await self.receive()
            if isinstance(message, kind):
                return message
            if isinstance(message, p.Heartbeat):
                if message.seq == 0:
                    await self.send(HELLO)
                await self.send(
                    p.HeartbeatReply(
                        seq=message.seq,
                        uptime_s=1.0,
                        load1=0.0,
                        mem_total_kib=1,
                        mem_available_kib=1,
                    )
                )


AgentScript = Callable[[FakeAgent], Awaitable[None]]


class Harness:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mux: AgentMux | None = None
        self.mux_ready = trio.Event()
        self.facts: p.AgentHello | None = None
        self.fault: AgentFault | None = None
        self.reason: str | None = None
        self.done = trio.Event()

    def on_mux(self, mux: AgentMux | None) -> None:
        if mux is not None:
            self.mux = mux
            self.mux_ready.set()

    def on_hello(self, hello: p.AgentHello) -> None:
        self.facts = hello


async def serve_one(path: Path, script: AgentScript) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    conn, _ = await sock.accept()
    sock.close()
    stream = trio.SocketStream(conn)
    try:
        await script(FakeAgent(stream))
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def run_with(
    tmp_path: Path,
    script: AgentScript,
    host: Callable[[Harness], Awaitable[None]] | None = None,
    *,
    boot_timeout: float = 5.0,
    silence_limit: float = 5.0,
) -> Harness:
    harness = Harness(tmp_path / "agent.sock")

    async def supervise() -> None:
        harness.fault = await supervise_agent(
            harness.path,
            "zt",
            boot_timeout=boot_timeout,
            heartbeat_interval=0.05,
            silence_limit=silence_limit,
            on_hello=harness.on_hello,
            on_mux=harness.on_mux,
        )
        harness.reason = harness.fault.message
        harness.done.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one, harness.path, script)
            nursery.start_soon(supervise)
            if host is not None:
                await harness.mux_ready.wait()
                await host(harness)
            await harness.done.wait()
            nursery.cancel_scope.cancel()
    return harness


def start_message(exec_id: int) -> p.AgentExecStart:
    return p.AgentExecStart(exec_id=exec_id, argv=["prog"])


async def events_to_end(session: ExecSession) -> list[ExecEvent]:
    """Every event of a session, its end last."""
    events = [await session.next_event()]
    while not isinstance(events[-1], ENDS):
        events.append(await session.next_event())
    return events


async def test_a_process_streams_in_order_and_output_is_credited_back(tmp_path: Path) -> None:
    credits: list[int] = []

    async def agent(a: FakeAgent) -> None:
        start = await a.answer_heartbeats_until(p.AgentExecStart)
        assert isinstance(start, p.AgentExecStart) and start.argv == ["prog"]
        await a.send(p.AgentExecStarted(exec_id=start.exec_id, pid=42))
        await a.send(p.AgentExecOutput(exec_id=start.exec_id, stream="stdout", data=b"one "))
        await a.send(p.AgentExecOutput(exec_id=start.exec_id, stream="stdout", data=b"two"))
        await a.send(p.AgentExecOutput(exec_id=start.exec_id, stream="stderr", data=b"err"))
        # The host credits back what its consumer took.
        while sum(credits) < 10:
            credit = await a.answer_heartbeats_until(p.AgentExecCredit)
            assert isinstance(credit, p.AgentExecCredit)
            credits.append(credit.bytes)
        await a.send(p.AgentExecExit(exec_id=start.exec_id, exit_code=3))
        # Then the agent goes away: the link ends with that reason.

    events: list[object] = []

    async def host(h: Harness) -> None:
        assert h.mux is not None
        events.extend(await events_to_end(await h.mux.start_exec(start_message)))

    harness = await run_with(tmp_path, agent, host)
    assert events[0] == p.AgentExecStarted(exec_id=1, pid=42)
    # The end is the agent's own message.
    assert events[-1] == p.AgentExecExit(exec_id=1, exit_code=3)
    pieces = [e for e in events[1:-1] if isinstance(e, ExecOutputPiece)]
    assert len(pieces) == len(events) - 2
    assert b"".join(e.data for e in pieces if e.stream == "stdout") == b"one two"
    assert [e.data for e in pieces if e.stream == "stderr"] == [b"err"]
    assert sum(credits) == 10
    assert harness.facts is not None and harness.facts.agent == "fake-agent/1"
    assert harness.reason is not None and "closed" in harness.reason


async def test_stdin_respects_the_agents_input_credit(tmp_path: Path) -> None:
    received = bytearray()
    total = p.EXEC_INPUT_WINDOW * 3

    async def agent(a: FakeAgent) -> None:
        start = await a.answer_heartbeats_until(p.AgentExecStart)
        assert isinstance(start, p.AgentExecStart)
        await a.send(p.AgentExecStarted(exec_id=start.exec_id, pid=7))
        unacknowledged = 0
        while True:
            message = await a.answer_heartbeats_until(p.AgentExecInput)
            assert isinstance(message, p.AgentExecInput)
            received.extend(message.data)
            unacknowledged += len(message.data)
            # The host never sends more than the window without credit.
            assert unacknowledged <= p.EXEC_INPUT_WINDOW
            if unacknowledged == p.EXEC_INPUT_WINDOW or message.eof:
                if unacknowledged:
                    await a.send(
                        p.AgentExecInputCredit(exec_id=start.exec_id, bytes=unacknowledged)
                    )
                unacknowledged = 0
            if message.eof:
                break
        await a.send(p.AgentExecExit(exec_id=start.exec_id, exit_code=0))

    async def host(h: Harness) -> None:
        assert h.mux is not None
        session = await h.mux.start_exec(start_message)
        await session.write_input(b"x" * total, eof=True)
        await events_to_end(session)

    await run_with(tmp_path, agent, host)
    assert bytes(received) == b"x" * total


async def _hello_then(a: FakeAgent) -> p.AgentExecStart:
    start = await a.answer_heartbeats_until(p.AgentExecStart)
    assert isinstance(start, p.AgentExecStart)
    await a.send(p.AgentExecStarted(exec_id=start.exec_id, pid=9))
    return start


async def _start_and_wait(h: Harness) -> None:
    """Start a process and read nothing: no credit flows back to the agent."""
    assert h.mux is not None
    session = await h.mux.start_exec(start_message)
    await h.done.wait()
    assert isinstance(session.ended, ExecLost), session.ended
    assert session.ended.reason.startswith("the process's zone went away: agent channel lost")


HOSTILE: list[tuple[str, AgentScript, str, type[AgentFault]]] = []


def hostile(
    expected: str, kind: type[AgentFault] = AgentProtocolError
) -> Callable[[AgentScript], AgentScript]:
    def register(script: AgentScript) -> AgentScript:
        HOSTILE.append((script.__name__, script, expected, kind))
        return script

    return register


@hostile("agent sent 1 bytes of output for exec 1 with only 0 bytes of credit")
async def output_beyond_credit(a: FakeAgent) -> None:
    start = await _hello_then(a)
    chunk = b"y" * p.MAX_EXEC_CHUNK
    for _ in range(p.EXEC_OUTPUT_WINDOW // len(chunk)):
        await a.send(p.AgentExecOutput(exec_id=start.exec_id, stream="stdout", data=chunk))
    await a.send(p.AgentExecOutput(exec_id=start.exec_id, stream="stdout", data=b"!"))
    await trio.sleep_forever()


@hostile("exec 99, which is not running")
async def output_for_a_process_that_does_not_exist(a: FakeAgent) -> None:
    await _hello_then(a)
    await a.send(p.AgentExecOutput(exec_id=99, stream="stdout", data=b"boo"))
    await trio.sleep_forever()


@hostile("ended before it started")
async def exit_before_start(a: FakeAgent) -> None:
    start = await a.answer_heartbeats_until(p.AgentExecStart)
    assert isinstance(start, p.AgentExecStart)
    await a.send(p.AgentExecExit(exec_id=start.exec_id, exit_code=0))
    await trio.sleep_forever()


@hostile("input credit beyond the window")
async def credit_inflation(a: FakeAgent) -> None:
    start = await _hello_then(a)
    await a.send(p.AgentExecInputCredit(exec_id=start.exec_id, bytes=1))
    await trio.sleep_forever()


@hostile("agent sent an invalid message")
async def garbage_payload(a: FakeAgent) -> None:
    await _hello_then(a)
    payload = msgspec.msgpack.encode({"type": "agent_exec_output", "exec_id": 1, "rm": "-rf"})
    await a.send_raw(struct.pack(">I", len(payload)) + payload)
    await trio.sleep_forever()


@hostile("agent sent a bad frame")
async def oversize_frame(a: FakeAgent) -> None:
    await _hello_then(a)
    await a.send_raw(struct.pack(">I", p.AGENT_MAX_FRAME + 1))
    await trio.sleep_forever()


@hostile("flooded the channel")
async def heartbeat_flood(a: FakeAgent) -> None:
    await _hello_then(a)
    reply = p.HeartbeatReply(seq=0, uptime_s=0, load1=0, mem_total_kib=0, mem_available_kib=0)
    frame = p.encode_frame(reply, p.AGENT_MAX_FRAME)
    await a.send_raw(frame * (MAX_MESSAGES_PER_SECOND * 2))
    await trio.sleep_forever()


@hostile("agent channel", AgentFault)
async def hangs_up_mid_process(a: FakeAgent) -> None:
    start = await _hello_then(a)
    await a.send(p.AgentExecOutput(exec_id=start.exec_id, stream="stdout", data=b"half a li"))


@pytest.mark.parametrize(
    ("script", "expected", "kind"),
    [(script, expected, kind) for _, script, expected, kind in HOSTILE],
    ids=[name for name, _, _, _ in HOSTILE],
)
async def test_a_hostile_agent_ends_its_link_with_a_clear_reason(
    tmp_path: Path, script: AgentScript, expected: str, kind: type[AgentFault]
) -> None:
    harness = await run_with(tmp_path, script, _start_and_wait)
    assert harness.reason is not None and expected in harness.reason, harness.reason
    # What it is: a protocol violation is not silence, a hang-up is neither.
    assert type(harness.fault) is kind, repr(harness.fault)
    assert harness.mux is not None and harness.mux.lost is not None


async def test_an_agent_that_never_says_hello_times_out(tmp_path: Path) -> None:
    async def mute(a: FakeAgent) -> None:
        await trio.sleep_forever()

    harness = await run_with(tmp_path, mute, boot_timeout=0.3)
    assert harness.reason == "nothing heard from the agent within 0.3 s"
    assert isinstance(harness.fault, AgentSilent)
    assert harness.mux is None


async def test_an_agent_that_stops_answering_heartbeats_is_silent(tmp_path: Path) -> None:
    async def goes_quiet(a: FakeAgent) -> None:
        await a.answer_heartbeats_until(p.AgentExecStart)
        await trio.sleep_forever()

    async def host(h: Harness) -> None:
        assert h.mux is not None
        await h.mux.start_exec(start_message)

    harness = await run_with(tmp_path, goes_quiet, host, silence_limit=0.3)
    assert harness.reason == "no heartbeat reply within 0.3 s"
    assert isinstance(harness.fault, AgentSilent)


async def test_tiny_output_messages_are_merged_not_queued(tmp_path: Path) -> None:
    """10 000 one-byte messages cost their bytes, not 10 000 queue entries."""
    pending_runs: list[int] = []

    async def chatty(a: FakeAgent) -> None:
        start = await _hello_then(a)
        frames = b"".join(
            p.encode_frame(
                p.AgentExecOutput(exec_id=start.exec_id, stream="stdout", data=b"."),
                p.AGENT_MAX_FRAME,
            )
            for _ in range(10_000)
        )
        await a.send_raw(frames)
        await a.send(p.AgentExecExit(exec_id=start.exec_id, exit_code=0))
        await a.answer_heartbeats_until(p.AgentExecSignal)  # until the host hangs up

    async def host(h: Harness) -> None:
        assert h.mux is not None
        session = await h.mux.start_exec(start_message)
        assert isinstance(await session.next_event(), p.AgentExecStarted)
        await wait_until_async(lambda: session.ended is not None, "the exit of exec 1")
        pending_runs.append(len(session._pending))
        total = 0
        while not isinstance(event := await session.next_event(), ENDS):
            assert isinstance(event, ExecOutputPiece)
            total += len(event.data)
        assert total == 10_000
        # After the end a signal is not sent; the host hangs up.
        await session.signal(1)
        await h.mux.link.aclose()

    await run_with(tmp_path, chatty, host, silence_limit=30)
    assert pending_runs == [1]


async def test_a_new_hello_ends_the_processes_of_the_old_session(tmp_path: Path) -> None:
    """The agent restarted its side of the channel: its old processes are gone,
    their consumers hear so at once, and the channel goes on serving."""

    async def restarts(a: FakeAgent) -> None:
        await _hello_then(a)
        await a.send(HELLO)  # a new session: exec 1 was killed with the old one
        start = await a.answer_heartbeats_until(p.AgentExecStart)
        assert isinstance(start, p.AgentExecStart) and start.exec_id == 2
        await a.send(p.AgentExecStarted(exec_id=2, pid=10))
        await a.send(p.AgentExecExit(exec_id=2, exit_code=0))
        await a.answer_heartbeats_until(p.AgentExecSignal)  # until the host hangs up

    ends: list[object] = []

    async def host(h: Harness) -> None:
        assert h.mux is not None
        old = await h.mux.start_exec(start_message)
        assert isinstance(await old.next_event(), p.AgentExecStarted)
        ends.append(await old.next_event())
        assert h.mux.execs == {}
        ends.append((await events_to_end(await h.mux.start_exec(start_message)))[-1])
        await h.mux.link.aclose()

    harness = await run_with(tmp_path, restarts, host, silence_limit=30)
    lost, exited = ends
    assert isinstance(lost, ExecLost) and "agent restarted its channel" in lost.reason, lost
    assert exited == p.AgentExecExit(exec_id=2, exit_code=0)
    assert harness.mux is not None


async def test_the_hellos_of_one_greeting_are_one_session(tmp_path: Path) -> None:
    """An agent that noticed the connection says hello on its own and for seq=0."""

    async def greets_twice(a: FakeAgent) -> None:
        heartbeat = await a.receive()
        assert heartbeat == p.Heartbeat(seq=0)
        await a.send(HELLO)
        await a.send(HELLO)
        await a.send(
            p.HeartbeatReply(seq=0, uptime_s=1, load1=0, mem_total_kib=1, mem_available_kib=1)
        )
        start = await a.answer_heartbeats_until(p.AgentExecStart)
        assert isinstance(start, p.AgentExecStart)
        await a.send(p.AgentExecStarted(exec_id=start.exec_id, pid=10))
        await a.send(p.AgentExecExit(exec_id=start.exec_id, exit_code=5))

    ended: list[object] = []

    async def host(h: Harness) -> None:
        assert h.mux is not None
        ended.append((await events_to_end(await h.mux.start_exec(start_message)))[-1])

    await run_with(tmp_path, greets_twice, host)
    assert ended == [p.AgentExecExit(exec_id=1, exit_code=5)]


async def test_input_into_a_broken_channel_ends_the_process_without_raising(
    tmp_path: Path,
) -> None:
    """The guest stops reading (its zone dies): sending input fails, the
    consumer learns it from the session's end, the link reports it."""

    async def stops_reading(a: FakeAgent) -> None:
        await _hello_then(a)
        a.stream.socket.shutdown(socket.SHUT_RD)
        await trio.sleep_forever()

    ends: list[object] = []

    async def host(h: Harness) -> None:
        assert h.mux is not None
        session = await h.mux.start_exec(start_message)
        assert isinstance(await session.next_event(), p.AgentExecStarted)
        await session.write_input(b"to nobody", eof=True)  # does not raise
        ends.append(await session.next_event())

    harness = await run_with(tmp_path, stops_reading, host, silence_limit=30)
    (lost,) = ends
    assert isinstance(lost, ExecLost), lost
    assert "the process's zone went away: agent channel lost" in lost.reason
    assert "Broken pipe" in lost.reason
    assert harness.reason is not None and "Broken pipe" in harness.reason
