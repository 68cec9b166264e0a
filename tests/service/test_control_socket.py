"""The control socket on a real unix socket: handshake, errors, hostile clients."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.peers import hello_as_nobody
from tests.rawframes import FrameStream
from zoned import protocol as p
from zoned.daemon import Daemon


class RawClient(FrameStream[p.Request, p.Reply]):
    """Speaks frames directly, so that tests can also send what a client must not."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream, p.DEFAULT_MAX_FRAME, p.decode_reply)

    @classmethod
    async def open(cls, daemon: Daemon, hello: bool = True) -> RawClient:
        client = cls(await trio.open_unix_socket(daemon.config.socket_path))
        if hello:
            await client.send(p.Hello(id=1, versions=[p.PROTOCOL_VERSION], client="test"))
            reply = await client.receive()
            assert isinstance(reply, p.HelloReply), reply
        return client

    async def receive_error(self) -> p.ErrorReply:
        """The next reply, which must be an error."""
        reply = await self.receive()
        assert isinstance(reply, p.ErrorReply), reply
        return reply

    async def closed_by_server(self) -> bool:
        with trio.fail_after(5):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        return True


async def test_hello_negotiates_version(daemon: Daemon) -> None:
    client = await RawClient.open(daemon, hello=False)
    await client.send(p.Hello(id=7, versions=[p.PROTOCOL_VERSION, 99]))
    reply = await client.receive()
    assert reply == p.HelloReply(id=7, version=p.PROTOCOL_VERSION, server=reply.server)  # type: ignore[union-attr]


async def test_unsupported_version_is_refused(daemon: Daemon) -> None:
    client = await RawClient.open(daemon, hello=False)
    await client.send(p.Hello(id=3, versions=[99]))
    reply = await client.receive_error()
    assert (reply.id, reply.code) == (3, "unsupported_version")


async def test_request_before_hello_is_refused(daemon: Daemon) -> None:
    client = await RawClient.open(daemon, hello=False)
    await client.send(p.ListZones(id=5))
    reply = await client.receive_error()
    assert (reply.id, reply.code) == (5, "invalid_request")
    assert "first request must be hello" in reply.message


async def test_get_unknown_zone_is_not_found(daemon: Daemon) -> None:
    client = await RawClient.open(daemon)
    await client.send(p.GetZone(id=2, name="nope"))
    reply = await client.receive_error()
    assert (reply.id, reply.code) == (2, "not_found")
    await client.send(p.ListZones(id=3))
    assert await client.receive() == p.ZoneListReply(id=3, zones=[])


async def test_host_info_describes_this_host(daemon: Daemon) -> None:
    client = await RawClient.open(daemon)
    await client.send(p.HostInfo(id=2))
    reply = await client.receive()
    assert isinstance(reply, p.HostInfoReply)
    host = reply.host
    assert host.accelerator == "tcg"
    assert len(host.cpus) == os.cpu_count()
    assert host.memory_total_mib > 0
    assert host.zone_count == 0
    # The service layer's kernel store (tests/service/conftest.py), not the host's.
    assert sorted((k.profile, k.kernel_release) for k in host.kernels) == [
        ("containers", "6.12.0-fake"),
        ("strict", "6.12.0-fake"),
    ]


async def test_garbage_payload_gets_error_and_connection_survives(daemon: Daemon) -> None:
    client = await RawClient.open(daemon)
    payload = b"\xc1not msgpack"
    await client.send_raw(struct.pack(">I", len(payload)) + payload)
    reply = await client.receive_error()
    assert reply.code == "invalid_request"
    await client.send(p.ListZones(id=9))
    assert await client.receive() == p.ZoneListReply(id=9, zones=[])


async def test_unknown_field_keeps_its_request_id(daemon: Daemon) -> None:
    client = await RawClient.open(daemon)
    import msgspec

    payload = msgspec.msgpack.encode({"type": "list_zones", "id": 44, "bogus": 1})
    await client.send_raw(struct.pack(">I", len(payload)) + payload)
    reply = await client.receive_error()
    assert (reply.id, reply.code) == (44, "invalid_request")
    assert "bogus" in reply.message


async def test_oversize_frame_closes_only_that_connection(daemon: Daemon) -> None:
    bystander = await RawClient.open(daemon)
    offender = await RawClient.open(daemon)
    await offender.send_raw(struct.pack(">I", p.DEFAULT_MAX_FRAME + 1) + b"x" * 100)
    reply = await offender.receive_error()
    assert reply.code == "invalid_request"
    assert await offender.closed_by_server()
    await bystander.send(p.ListZones(id=4))
    assert await bystander.receive() == p.ZoneListReply(id=4, zones=[])


async def test_half_frame_then_disconnect_harms_nobody(daemon: Daemon) -> None:
    for _ in range(5):
        client = await RawClient.open(daemon)
        await client.send_raw(struct.pack(">I", 1000) + b"half")
        await client.stream.aclose()
    survivor = await RawClient.open(daemon)
    await survivor.send(p.ListZones(id=1))
    assert await survivor.receive() == p.ZoneListReply(id=1, zones=[])


async def test_many_concurrent_clients(daemon: Daemon) -> None:
    async def one(i: int) -> None:
        client = await RawClient.open(daemon)
        await client.send(p.GetZone(id=i + 10, name=f"z{i}"))
        reply = await client.receive_error()
        assert (reply.id, reply.code) == (i + 10, "not_found")

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)


def _sync_list_zones(socket_path: str) -> p.Reply:
    """A well-behaved client, blocking, for the synchronous property test."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        decoder = p.FrameDecoder(p.DEFAULT_MAX_FRAME)
        replies: list[p.Reply] = []
        for message in (
            p.Hello(id=1, versions=[p.PROTOCOL_VERSION], client="test"),
            p.ListZones(id=2),
        ):
            sock.sendall(p.encode_frame(message))
            while (frame := decoder.next_frame()) is None:
                data = sock.recv(65536)
                assert data, "server closed the connection"
                decoder.feed(data)
            replies.append(p.decode_reply(frame))
        assert isinstance(replies[0], p.HelloReply), replies[0]
        return replies[1]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(chunks=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=8))
def test_arbitrary_bytes_never_hurt_the_server(
    threaded_daemon: Daemon, chunks: list[bytes]
) -> None:
    socket_path = threaded_daemon.config.socket_path
    with socket.socket(socket.AF_UNIX) as hostile:
        hostile.connect(socket_path)
        for chunk in chunks:
            try:
                hostile.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
    assert _sync_list_zones(socket_path) == p.ZoneListReply(id=2, zones=[])


async def test_create_refusals_change_nothing(daemon: Daemon) -> None:
    client = await RawClient.open(daemon)
    cases = [
        (p.CreateZone(id=2, name="a", profile="nosuch"), "not_found"),
        (p.CreateZone(id=3, name="b", kernel_args=["mitigations=off"]), "invalid_request"),
        (p.CreateZone(id=4, name="c", vcpus=32, placement="exclusive"), "no_capacity"),
        (p.CreateZone(id=6, name="e", vcpus=256), "invalid_request"),
        (p.CreateZone(id=5, name="d", memory_mib=1024 * 1024), "invalid_request"),
    ]
    for request, code in cases:
        await client.send(request)
        reply = await client.receive_error()
        assert (reply.id, reply.code) == (request.id, code), reply.message
    await client.send(p.ListZones(id=9))
    assert await client.receive() == p.ZoneListReply(id=9, zones=[])
    assert not list(Path(daemon.config.state_dir, "zones").glob("*.json"))


async def test_non_member_gets_permission_denied(daemon: Daemon) -> None:
    """SO_PEERCRED decides, even if the socket's mode were too open."""
    socket_path = daemon.config.socket_path
    os.chmod(socket_path, 0o666)
    os.chmod(Path(socket_path).parent, 0o755)
    reply = await trio.to_thread.run_sync(hello_as_nobody, Path(socket_path))
    assert "permission_denied" in reply, reply
    assert "may not use zoned" in reply
