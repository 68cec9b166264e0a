"""The HTTP layer (zoned.httpserve) on real sockets: keep-alive, pipelining,
limits, timeouts, bad input; tight limits so that nothing waits long."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
import trio

from zoned.httpserve import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    ListenAddress,
    Router,
    open_http_listeners,
    parse_listen_address,
    serve_http,
)

GUARD_S = 30.0
LIMITS = HttpLimits(
    max_header_bytes=1024,
    max_headers=8,
    max_body_bytes=100,
    request_timeout_s=0.5,
    idle_timeout_s=0.5,
    send_timeout_s=2.0,
    max_requests_per_connection=3,
    max_connections=2,
)


async def echo(request: HttpRequest) -> HttpResponse:
    await trio.lowlevel.checkpoint()
    return HttpResponse(200, f"{request.method} {request.target} {len(request.body)}".encode())


async def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("a handler's bug")


#: What the streamed handler's generator did: chunks it gave, whether it was closed.
STREAMED: dict[str, int] = {}


async def streamed(request: HttpRequest) -> HttpResponse:
    count = int(request.query or "3")

    async def chunks() -> AsyncGenerator[bytes, None]:
        STREAMED.update(given=0, closed=0)
        try:
            for index in range(count):
                STREAMED["given"] = index + 1
                yield f"chunk{index}\n".encode() * 1000
        finally:
            STREAMED["closed"] = 1

    await trio.lowlevel.checkpoint()
    return HttpResponse(200, stream=chunks())


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    router = Router()
    router.add("/echo", echo, ["GET", "POST"])
    router.add("/boom", boom)
    router.add("/stream", streamed)
    listeners = await open_http_listeners(parse_listen_address("127.0.0.1:0"))
    host, port = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, listeners, router, LIMITS)
        yield host, port
        nursery.cancel_scope.cancel()


async def exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, read until the server closes."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(data)
        received = bytearray()
        with trio.fail_after(GUARD_S):
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
    return bytes(received)


def statuses(data: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


REQUEST = b"GET /echo?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"


async def test_keep_alive_pipelining_and_the_request_cap(server: tuple[str, int]) -> None:
    # Four pipelined requests on one connection: three answered, the third
    # with "Connection: close" (the per-connection cap), then the end.
    data = await exchange(server, REQUEST * 4)
    assert statuses(data) == [200, 200, 200]
    assert data.count(b"GET /echo?x=1 0") == 3
    assert data.lower().count(b"connection: close") == 1


async def test_idle_connection_is_closed_quietly(server: tuple[str, int]) -> None:
    # One request, then silence: answered, then closed after the idle limit.
    assert statuses(await exchange(server, REQUEST)) == [200]


async def test_slow_request_gets_408(server: tuple[str, int]) -> None:
    assert statuses(await exchange(server, b"GET /echo HTTP/1.1\r\nHost:")) == [408]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 404),
        (b"DELETE /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 405),
        (b"GET /boom HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 500),
        (b"GET /echo HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 2000 + b"\r\n\r\n", 431),
        (b"GET /echo HTTP/1.1\r\nHost: h\r\n" + b"A: b\r\n" * 9 + b"\r\n", 431),
        (b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n", 413),
        (
            b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"40\r\n"
            + b"z" * 64
            + b"\r\n"
            + b"40\r\n"
            + b"z" * 64
            + b"\r\n0\r\n\r\n",
            413,
        ),
        (b"GET /echo HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"\x00\x01\x02\x03\r\n\r\n", 400),
    ],
)
async def test_bad_requests_get_clear_statuses(
    server: tuple[str, int], request_bytes: bytes, status: int
) -> None:
    assert statuses(await exchange(server, request_bytes)) == [status]
    # And the server goes on.
    assert statuses(await exchange(server, REQUEST)) == [200]


async def test_head_and_a_body_within_the_limit(server: tuple[str, int]) -> None:
    head = await exchange(server, b"HEAD /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert statuses(head) == [200] and head.endswith(b"\r\n\r\n")  # no body
    post = await exchange(
        server,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert post.endswith(b"POST /echo 5")


async def test_connections_beyond_the_limit_are_closed(server: tuple[str, int]) -> None:
    held = [await trio.open_tcp_stream(*server) for _ in range(LIMITS.max_connections)]
    try:
        await trio.sleep(0.05)
        # The third connection is closed unanswered while two are open...
        assert await exchange(server, REQUEST) == b""
    finally:
        for stream in held:
            await stream.aclose()
    # ...and served once they are gone.
    with trio.fail_after(GUARD_S):
        while statuses(await exchange(server, REQUEST)) != [200]:
            await trio.sleep(0.05)


async def test_unix_socket_listener(tmp_path: Path) -> None:
    address = parse_listen_address(str(tmp_path / "m.sock"))
    assert address == ListenAddress(path=str(tmp_path / "m.sock"))
    listeners = await open_http_listeners(address)
    router = Router()
    router.add("/echo", echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, listeners, router, LIMITS)
        assert oct((tmp_path / "m.sock").stat().st_mode & 0o777) == "0o660"
        stream = await trio.open_unix_socket(str(tmp_path / "m.sock"))
        async with stream:
            await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
        assert statuses(bytes(data)) == [200]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "HOST:PORT"),
        ("::1:80", "brackets"),
        ("[::1]80", r"\[ADDRESS\]:PORT"),
        ("127.0.0.1:http", "must be a number"),
        ("127.0.0.1:70000", "within 0..65535"),
    ],
)
def test_bad_listen_addresses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen_address(text)


async def test_a_streamed_response_is_chunked_and_keeps_the_connection(
    server: tuple[str, int],
) -> None:
    data = await exchange(server, b"GET /stream?3 HTTP/1.1\r\nHost: h\r\n\r\n" + REQUEST)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert statuses(data) == [200, 200]
    assert b"transfer-encoding: chunked" in head.lower()
    assert rest.count(b"chunk2\n") == 1000 and b"GET /echo?x=1 0" in rest
    assert STREAMED == {"given": 3, "closed": 1}


async def test_a_stream_whose_client_stops_reading_is_closed(server: tuple[str, int]) -> None:
    # 10**6 chunks of 7 kB: far more than the socket buffers hold; the client
    # reads nothing, so the write times out and the generator is closed.
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        await stream.send_all(b"GET /stream?1000000 HTTP/1.1\r\nHost: h\r\n\r\n")
        with trio.fail_after(GUARD_S):
            while STREAMED.get("closed") != 1:
                await trio.sleep(0.05)
    assert STREAMED["given"] < 1_000_000


async def test_a_stream_never_sent_is_closed_too(server: tuple[str, int]) -> None:
    # HEAD sends no chunk, yet the generator is closed: one never started
    # could not run its finally (and let go of what it holds).
    STREAMED.clear()
    data = await exchange(
        server, b"HEAD /stream?3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    assert statuses(data) == [200] and b"chunk0" not in data
    assert STREAMED == {"given": 1, "closed": 1}


async def test_a_screen_refuses_before_the_body_is_read() -> None:
    def screen(head: HttpRequest) -> HttpResponse | None:
        assert head.body == b""
        return None if head.header("x-key") == "ok" else HttpResponse(401, b"no key\n")

    router = Router()
    router.add("/echo", echo, ["POST"])
    listeners = await open_http_listeners(parse_listen_address("127.0.0.1:0"))
    address = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_http, screen=screen), listeners, router, LIMITS)
        # The body never comes: the refusal does not wait for it.
        refused = await exchange(
            address, b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\n\r\n"
        )
        assert statuses(refused) == [401] and refused.endswith(b"no key\n")
        allowed = await exchange(
            address,
            b"POST /echo HTTP/1.1\r\nHost: h\r\nX-Key: ok\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\nhi",
        )
        assert statuses(allowed) == [200] and allowed.endswith(b"POST /echo 2")
        nursery.cancel_scope.cancel()
