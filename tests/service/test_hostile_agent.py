"""A hostile (or dying) guest agent against the whole daemon.

libvirt's test driver runs no QEMU, so the test itself listens on the zone's
agent socket (where QEMU would) and plays an agent that first behaves, then
turns hostile. The daemon must mark that zone failed with a clear reason,
keep its record, and go on serving every other client and zone.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from tests.zone_events import watching
from zoned import protocol as p
from zoned.client import Client
from zoned.daemon import Daemon
from zoned.errors import HypervisorError

#: What the fake agent does when the first exec starts (the stream is its channel).
Betrayal = Callable[[trio.SocketStream, p.AgentExecStart], Awaitable[None]]


def sends(data: bytes) -> Betrayal:
    async def betray(stream: trio.SocketStream, _start: p.AgentExecStart) -> None:
        await stream.send_all(data)

    return betray


HELLO = p.AgentHello(version=1, agent="evil/1", kernel_release="6.12.0", boot_s=0.5, pid=1)


async def fake_agent(
    path: Path,
    betray: Betrayal,
    *,
    every_exec: bool = False,
    task_status: trio.TaskStatus[None],
) -> None:
    """Say hello, answer heartbeats until the first exec starts, then ``betray``
    (and stop answering), or with ``every_exec`` ``betray`` each exec and go on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)
    task_status.started()
    conn, _ = await listener.accept()
    stream = trio.SocketStream(conn)
    decoder = p.FrameDecoder(p.AGENT_MAX_FRAME)
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                message = p.decode_to_agent(frame)
                if isinstance(message, p.Heartbeat):
                    if message.seq == 0:
                        await stream.send_all(p.encode_frame(HELLO))
                    reply = p.HeartbeatReply(
                        seq=message.seq,
                        uptime_s=1,
                        load1=0,
                        mem_total_kib=1,
                        mem_available_kib=1,
                    )
                    await stream.send_all(p.encode_frame(reply))
                elif isinstance(message, p.AgentExecStart):
                    await betray(stream, message)
                    if not every_exec:
                        await trio.sleep_forever()


async def test_hostile_agent_fails_only_its_own_zone(daemon: Daemon) -> None:
    runtime = Path(daemon.config.runtime_dir) / "zones"
    oversize = struct.pack(">I", p.AGENT_MAX_FRAME + 1)
    bad_output = p.encode_frame(
        p.AgentExecOutput(exec_id=77, stream="stdout", data=b"not yours"), p.AGENT_MAX_FRAME
    )
    async with trio.open_nursery() as agents:
        await agents.start(fake_agent, runtime / "evil" / "agent.sock", sends(oversize))
        await agents.start(fake_agent, runtime / "liar" / "agent.sock", sends(bad_output))
        await agents.start(fake_agent, runtime / "good" / "agent.sock", sends(b""))
        async with (
            Client(daemon.config.socket_path, client_name="test") as client,
            watching(client) as events,
        ):
            for name in ("evil", "liar", "good"):
                zone = await client.create_zone(name)
                assert zone.state == "ready", zone
            for name, expected in (
                ("evil", "bad frame"),
                ("liar", "exec 77, which is not running"),
            ):
                with trio.fail_after(10):
                    with pytest.raises(HypervisorError, match="went away"):
                        await client.exec(name, ["true"])
                    failed = await events.wait_for_state(name, "failed")
                # Reported as what it is: not silence.
                assert failed.reason.startswith("agent broke the protocol: "), failed.reason
                assert expected in failed.reason, failed.reason
                zone = await client.get_zone(name)
                assert (zone.state, zone.reason) == ("failed", failed.reason)
            # The daemon and the well-behaved zone carry on.
            good = await client.get_zone("good")
            assert good.state == "ready"
            states = {z.name: z.state for z in await client.list_zones()}
            assert states == {"evil": "failed", "liar": "failed", "good": "ready"}
            for name in ("evil", "liar", "good"):
                await client.destroy_zone(name)
        agents.cancel_scope.cancel()


async def test_input_into_a_process_whose_zone_dies_ends_with_a_clear_error(
    daemon: Daemon,
) -> None:
    """The zone stops reading its channel while the client streams input: the
    client hears that the zone went away (``hypervisor``), not ``internal``."""

    async def dies(stream: trio.SocketStream, start: p.AgentExecStart) -> None:
        started = p.AgentExecStarted(exec_id=start.exec_id, pid=2)
        await stream.send_all(p.encode_frame(started, p.AGENT_MAX_FRAME))
        # Writes to the channel now fail (EPIPE); nothing else shows yet.
        stream.socket.shutdown(socket.SHUT_RD)

    runtime = Path(daemon.config.runtime_dir) / "zones"
    async with trio.open_nursery() as agents:
        await agents.start(fake_agent, runtime / "doomed" / "agent.sock", dies)
        async with (
            Client(daemon.config.socket_path, client_name="test") as client,
            watching(client) as events,
        ):
            assert (await client.create_zone("doomed")).state == "ready"
            with trio.fail_after(30):
                with pytest.raises(HypervisorError) as raised:
                    await client.exec("doomed", ["cat"], input=b"x" * (1024 * 1024))
                await events.wait_for_state("doomed", "failed")
            assert "the process's zone went away" in raised.value.message, raised.value.message
            assert "Broken pipe" in raised.value.message, raised.value.message
            await client.destroy_zone("doomed")
        agents.cancel_scope.cancel()
