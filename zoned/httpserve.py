"""A small HTTP/1.1 server on trio: h11 parses, this module moves bytes and keeps limits.

The daemon serves its metrics with it (:mod:`zoned.metrics`), and later the
E2B-compatible API: any endpoint that must never hold up the daemon, whatever
a client sends or how slowly it reads.

Rules:

- h11 is the parser and the state machine (requests, keep-alive, what may
  be sent when); this module writes no HTTP syntax of its own.
- Every client is bounded (:class:`HttpLimits`): the request line and
  headers together (``431``), the number of header fields (``431``), the
  body (``413``, from ``Content-Length`` before any of it is read, else
  while it arrives), the time a whole request may take to arrive (``408``),
  how long a kept-alive connection may sit idle (then it is closed), how
  long a response may take to be written (then the connection is dropped),
  requests per connection (the last answer says ``Connection: close``), and
  connections at once (one more is closed at once, unanswered).
- Malformed HTTP gets h11's own status (``400``, or ``431`` for an
  oversized head) and the connection closes; nothing a client sends raises
  out of here.
- A *screen* (optional) sees each request's head before its body is read
  and may answer it at once (an endpoint's authentication): a refused
  request's body is never read, and the connection closes after the answer.
- :class:`Router` answers a path it does not know with ``404`` and a method
  a path does not take with ``405`` and ``Allow``; ``HEAD`` is served by a
  path's ``GET`` handler without the body. A handler that raises gets
  ``500`` (logged with its traceback).
- A response is a whole body (sent with ``Content-Length``) or a stream of
  chunks (:attr:`HttpResponse.stream`, sent chunked: a server stream such as
  the E2B endpoint's process output). Each chunk must be written within the
  send limit; a client that stops reading, or goes away, ends the stream
  (its generator is closed) and the connection. The generator is started
  before the head is sent, so that closing it always runs its ``finally``.
- Listeners: TCP (``host:port``, ``[v6]:port``) or a Unix socket (an
  absolute path, made mode 0660 and given to a group when one is named).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import h11
import trio

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 16 * 1024
#: After an error answer: how long, and how much, to read before closing.
LINGER_S = 1.0
LINGER_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class HttpLimits:
    """What one client may send and how long it may take."""

    #: Request line plus headers, in bytes.
    max_header_bytes: int = 8 * 1024
    max_headers: int = 64
    max_body_bytes: int = 64 * 1024
    #: From a request's first byte (or the connection's start) to its end.
    request_timeout_s: float = 10.0
    #: Between requests on a kept-alive connection.
    idle_timeout_s: float = 30.0
    #: Writing one whole response.
    send_timeout_s: float = 10.0
    max_requests_per_connection: int = 100
    max_connections: int = 64


@dataclass(frozen=True)
class HttpRequest:
    method: str
    #: The request target as sent (path and query).
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    #: Instead of ``body``: chunks sent as they come (chunked transfer coding).
    stream: AsyncGenerator[bytes, None] | None = None


def text_response(status: int, text: str, headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
    return HttpResponse(status=status, body=(text + "\n").encode(), headers=tuple(headers))


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
#: Sees a request's head (``body`` empty) before its body is read; an answer refuses it.
Screen = Callable[[HttpRequest], HttpResponse | None]


@dataclass
class Router:
    """Paths to methods to handlers; the 404/405 answers for everything else."""

    routes: dict[str, dict[str, Handler]] = field(default_factory=dict)

    def add(self, path: str, handler: Handler, methods: Sequence[str] = ("GET",)) -> None:
        for method in methods:
            self.routes.setdefault(path, {})[method.upper()] = handler

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        methods = self.routes.get(request.path)
        if methods is None:
            await trio.lowlevel.checkpoint()
            return text_response(
                404,
                f"not found: {request.path[:200]!r} (try one of: "
                + ", ".join(sorted(self.routes))
                + ")",
            )
        method = "GET" if request.method == "HEAD" and "GET" in methods else request.method
        handler = methods.get(method)
        if handler is None:
            allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
            await trio.lowlevel.checkpoint()
            return text_response(
                405,
                f"method {request.method[:32]} not allowed here; allowed: {', '.join(allowed)}",
                [("allow", ", ".join(allowed))],
            )
        return await handler(request)


class _ClientError(Exception):
    """The request cannot be served: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Refused(Exception):
    """The screen answered the request's head: send ``response`` and close."""

    def __init__(self, request: HttpRequest, response: HttpResponse) -> None:
        super().__init__(response.status)
        self.request = request
        self.response = response


class _Closed(Exception):
    """The client went away, or stayed silent too long between requests."""


class HttpConnection:
    """One client connection: requests in, responses out, within :class:`HttpLimits`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        limits: HttpLimits,
        screen: Screen | None = None,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._limits = limits
        self._screen = screen
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)

    async def serve(self) -> None:
        served = 0
        try:
            while True:
                try:
                    request = await self._read_request(first=served == 0)
                except _ClientError as exc:
                    if await self._answer_error(exc.status, exc.message):
                        await self._linger()
                    return
                except _Refused as refused:
                    await self._send(refused.request, refused.response, close=True)
                    await self._linger()
                    return
                served += 1
                last = served >= self._limits.max_requests_per_connection
                response = await self._respond(request)
                keep = await self._send(request, response, close=last)
                if not keep:
                    return
                self._conn.start_next_cycle()
        except _Closed:
            return
        finally:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _receive(self) -> bool:
        """Feed h11 what arrived; False at EOF (h11 then says ConnectionClosed)."""
        try:
            data = await self._stream.receive_some(RECEIVE_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Closed() from exc
        self._conn.receive_data(bytes(data))
        return bool(data)

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                raise _ClientError(
                    431, f"request head larger than {self._limits.max_header_bytes} bytes"
                ) from None
            raise _ClientError(status, f"bad request: {exc}") from None

    async def _read_request(self, *, first: bool) -> HttpRequest:
        """The next whole request.

        Until its first byte arrives the connection may idle (the first
        request of a connection gets no idle time); from then on the whole
        request must arrive within the request limit.
        """
        limits = self._limits
        started = first or bool(self._conn.trailing_data[0])
        scope = trio.CancelScope()
        scope.relative_deadline = limits.request_timeout_s if started else limits.idle_timeout_s
        with scope:
            head: h11.Request | None = None
            body = bytearray()
            while True:
                event = self._next_event()
                if event is h11.NEED_DATA:
                    if await self._receive() and not started:
                        started = True
                        scope.deadline = trio.current_time() + limits.request_timeout_s
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    raise _Closed()
                if isinstance(event, h11.Request):
                    head = event
                    # h11 bounds a head that arrives in pieces; one that came
                    # whole in a single read is measured here.
                    if _head_size(event) > limits.max_header_bytes:
                        raise _ClientError(
                            431, f"request head larger than {limits.max_header_bytes} bytes"
                        )
                    if len(event.headers) > limits.max_headers:
                        raise _ClientError(
                            431, f"more than {limits.max_headers} header fields in the request"
                        )
                    length = _content_length(event.headers)
                    if length is not None and length > limits.max_body_bytes:
                        raise _ClientError(
                            413, f"request body larger than {limits.max_body_bytes} bytes"
                        )
                    if self._screen is not None:
                        bare = _request(event, b"")
                        refusal = self._screen(bare)
                        if refusal is not None:
                            raise _Refused(bare, refusal)
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.max_body_bytes:
                        raise _ClientError(
                            413, f"request body larger than {limits.max_body_bytes} bytes"
                        )
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # PAUSED cannot come before the request's end
                    raise _ClientError(400, "unexpected data in the request")
        if scope.cancelled_caught:
            if not started:
                raise _Closed()
            raise _ClientError(408, f"request not received within {limits.request_timeout_s:g} s")
        assert head is not None
        return _request(head, bytes(body))

    async def _respond(self, request: HttpRequest) -> HttpResponse:
        try:
            return await self._handler(request)
        except Exception:
            log.exception("HTTP handler for %s %s failed", request.method, request.path[:200])
            return text_response(500, "internal error; see the daemon log")

    async def _send(self, request: HttpRequest, response: HttpResponse, *, close: bool) -> bool:
        """Write the response; whether the connection may carry another request."""
        if response.stream is not None:
            return await self._send_stream(request, response, response.stream, close=close)
        body = b"" if request.method == "HEAD" else response.body
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        try:
            data = self._conn.send(_response(response.status, headers)) or b""
            if body:
                data += self._conn.send(h11.Data(data=body)) or b""
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            log.exception("HTTP response to %s could not be framed", request.path[:200])
            return False
        if not await self._write(data):
            return False
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def _send_stream(
        self,
        request: HttpRequest,
        response: HttpResponse,
        stream: AsyncGenerator[bytes, None],
        *,
        close: bool,
    ) -> bool:
        """Write a streamed response, chunk by chunk (h11 frames them).

        The generator is started before the head is written: one never started
        would not run its ``finally`` on ``aclose`` (a HEAD request, a client
        gone before the head), so what it holds would never be let go. So the
        head goes out with the first chunk, once the generator has one.
        """
        headers = [("content-type", response.content_type), *response.headers]
        if close:
            headers.append(("connection", "close"))
        try:
            first = await anext(stream, b"")
            try:
                head = self._conn.send(_response(response.status, headers)) or b""
            except h11.LocalProtocolError:
                log.exception("HTTP response to %s could not be framed", request.path[:200])
                return False
            if not await self._write(head):
                return False
            if request.method != "HEAD":
                if first and not await self._write(self._conn.send(h11.Data(data=first)) or b""):
                    return False
                async for chunk in stream:
                    if chunk and not await self._write(
                        self._conn.send(h11.Data(data=chunk)) or b""
                    ):
                        return False
            if not await self._write(self._conn.send(h11.EndOfMessage()) or b""):
                return False
            return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _answer_error(self, status: int, message: str) -> bool:
        """Answer a request that cannot be served; whether the answer was written."""
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        body = (message + "\n").encode()
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        try:
            data = self._conn.send(_response(status, headers)) or b""
            data += self._conn.send(h11.Data(data=body)) or b""
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False
        return await self._write(data)

    async def _linger(self) -> None:
        """Close gently after an error answer: stop sending, then read (and drop) what
        the client still sends for a moment, so that the kernel does not reset the
        connection, with the answer unread, over unread request bytes."""
        with trio.move_on_after(LINGER_S):
            try:
                if isinstance(self._stream, trio.SocketStream):
                    await self._stream.send_eof()
                drained = 0
                while drained < LINGER_MAX_BYTES:
                    data = await self._stream.receive_some(RECEIVE_CHUNK)
                    if not data:
                        return
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def _write(self, data: bytes) -> bool:
        with trio.move_on_after(self._limits.send_timeout_s) as scope:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
        return not scope.cancelled_caught


def _request(head: h11.Request, body: bytes) -> HttpRequest:
    target = head.target.decode("ascii", errors="replace")
    path, _, query = target.partition("?")
    return HttpRequest(
        method=head.method.decode("ascii", errors="replace"),
        target=target,
        path=path,
        query=query,
        headers=tuple(
            (name.decode("ascii", errors="replace").lower(), value.decode("latin-1"))
            for name, value in head.headers
        ),
        body=body,
    )


def _response(status: int, headers: Sequence[tuple[str, str]]) -> h11.Response:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return h11.Response(status_code=status, headers=list(headers), reason=reason)


def _head_size(request: h11.Request) -> int:
    """The request line and headers' size as sent (give or take whitespace)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 has refused it already
    return None


# --------------------------------------------------------------------------
# Listening
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: TCP ``host``/``port``, or a Unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """``127.0.0.1:9469``, ``[::1]:9469``, ``localhost:9469``, or an absolute socket path.

    Raises :class:`ValueError` with what is wrong.
    """
    if text.startswith("/"):
        return ListenAddress(path=text)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [ADDRESS]:PORT, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT or an absolute socket path, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets: [ADDRESS]:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"the port must be a number, got {port_text!r} in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"the port must be within 0..65535, got {port}")
    return ListenAddress(host=host, port=port)


async def bind_unix_socket(path: Path, gid: int | None) -> trio.socket.SocketType:
    """A listening Unix socket at ``path``: mode 0660, owned by group ``gid`` when
    given (as root). Whatever was at ``path`` (a stale socket) is replaced."""
    await trio.Path(path.parent).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        await trio.Path(path).unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if gid is not None and os.geteuid() == 0:
        os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


async def open_http_listeners(
    address: ListenAddress, *, socket_gid: int | None = None
) -> list[trio.SocketListener]:
    """Bind ``address``; a Unix socket is made mode 0660 (group ``socket_gid`` if given)."""
    if not address.path:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    sock = await bind_unix_socket(Path(address.path), socket_gid)
    return [trio.SocketListener(sock)]


async def serve_http(
    listeners: Sequence[trio.SocketListener],
    handler: Handler,
    limits: HttpLimits = HttpLimits(),
    *,
    screen: Screen | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``listeners`` until cancelled (``screen``: see above)."""
    slots = trio.Semaphore(limits.max_connections)

    async def one(stream: trio.SocketStream) -> None:
        if slots.value == 0:
            await _refuse_busy(stream, limits)
            return
        async with slots:
            try:
                await HttpConnection(stream, handler, limits, screen).serve()
            except Exception:
                log.exception("HTTP connection failed")

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, one, nursery)
        task_status.started()


async def _accept_loop(
    listener: trio.SocketListener,
    one: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.warning("HTTP accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(one, stream)


async def _refuse_busy(stream: trio.SocketStream, limits: HttpLimits) -> None:
    # No answer: h11 answers only a request it has read, and reading one is
    # the cost this refusal avoids.
    log.warning("HTTP: %d connections already open; closing a new one", limits.max_connections)
    with trio.CancelScope(shield=True):
        await stream.aclose()


def unlink_socket(address: ListenAddress) -> None:
    """Remove a Unix socket ``address`` (after serving); nothing for TCP."""
    if address.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)


__all__ = [
    "Handler",
    "HttpConnection",
    "HttpLimits",
    "HttpRequest",
    "HttpResponse",
    "ListenAddress",
    "Router",
    "Screen",
    "open_http_listeners",
    "parse_listen_address",
    "serve_http",
    "text_response",
    "unlink_socket",
]
