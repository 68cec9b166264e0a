"""The first bytes of a zone's TCP connection: TLS ClientHello SNI or HTTP Host.

Sans-IO and bounded: :func:`sniff` looks at the bytes the client sent so
far and says whether it needs more, or what the connection is and which
name it claims. It never holds state; the caller buffers at most
:data:`MAX_SNIFF_BYTES` and calls again as bytes arrive. Everything here is
hostile input: lengths are checked before they are used, and any
inconsistency is :attr:`Kind.MALFORMED`, never an exception.

- TLS: a handshake record (0x16) carrying a ClientHello, possibly split
  over several records; the ``server_name`` extension's host_name. An
  Encrypted Client Hello's outer SNI is what is checked (the resolver never
  hands out the HTTPS records that carry ECH configurations).
- HTTP/1.x: a request line with a known method, then headers up to the
  blank line; the Host header (the authority of an absolute-form target or
  of CONNECT wins, and a Host that disagrees with it is malformed).
- Anything else (SSH, a database protocol, ...) is :attr:`Kind.OTHER`:
  there is no name to check, the pinned destination is all the proxy has.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from zoned.errors import InvalidRequest
from zoned.net.policy import normalize_name

MAX_SNIFF_BYTES = 16 * 1024

_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_HOST_NAME = 0x00

HTTP_METHODS = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"PATCH",
    b"TRACE",
    b"CONNECT",
)
_LONGEST_METHOD = max(len(m) for m in HTTP_METHODS)


class Kind(enum.Enum):
    NEED_MORE = "need_more"
    TLS = "tls"
    HTTP = "http"
    OTHER = "other"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class Sniffed:
    kind: Kind
    # The normalized name the client claims (TLS SNI, HTTP Host), or None
    # when it sent none (or an IP literal: then ``literal`` holds it).
    name: str | None = None
    literal: str | None = None
    why: str = ""


NEED_MORE = Sniffed(Kind.NEED_MORE)
OTHER = Sniffed(Kind.OTHER)


def _malformed(why: str) -> Sniffed:
    return Sniffed(Kind.MALFORMED, why=why)


def sniff(data: bytes) -> Sniffed:
    """Classify the first bytes of a connection (see the module docstring)."""
    if not data:
        return NEED_MORE
    if data[0] == _TLS_HANDSHAKE:
        return _sniff_tls(data)
    if data[:1].isupper():
        return _sniff_http(data)
    return OTHER


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


def _handshake_bytes(data: bytes) -> tuple[bytes, bool] | Sniffed:
    """The handshake payload of the leading handshake records, and whether more may follow."""
    payload = bytearray()
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            return bytes(payload), True
        content_type = data[pos]
        if content_type != _TLS_HANDSHAKE:
            if pos == 0:
                return _malformed("not a TLS handshake record")
            return bytes(payload), False
        if data[pos + 1] != 0x03:
            return _malformed("not a TLS record version")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 256:
            return _malformed("TLS record length out of range")
        body = data[pos + 5 : pos + 5 + length]
        payload += body
        if len(body) < length:
            return bytes(payload), True
        pos += 5 + length
    return bytes(payload), True


def _sniff_tls(data: bytes) -> Sniffed:
    got = _handshake_bytes(data)
    if isinstance(got, Sniffed):
        return got
    handshake, more_possible = got
    if len(handshake) < 4:
        return NEED_MORE if more_possible else _malformed("short TLS handshake")
    if handshake[0] != _CLIENT_HELLO:
        return _malformed("first TLS handshake message is not a ClientHello")
    length = int.from_bytes(handshake[1:4], "big")
    if length + 4 > MAX_SNIFF_BYTES:
        return _malformed("ClientHello larger than the sniff limit")
    if len(handshake) < 4 + length:
        return NEED_MORE if more_possible else _malformed("truncated ClientHello")
    return _client_hello_sni(handshake[4 : 4 + length])


class _Reader:
    """Bounds-checked big-endian reads over one buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.uint(length_bytes))

    def done(self) -> bool:
        return self.pos == len(self.data)


def _client_hello_sni(body: bytes) -> Sniffed:
    reader = _Reader(body)
    try:
        reader.take(2 + 32)  # legacy_version, random
        reader.vector(1)  # legacy_session_id
        suites = reader.vector(2)
        if not suites or len(suites) % 2:
            return _malformed("bad cipher_suites")
        reader.vector(1)  # legacy_compression_methods
        if reader.done():
            return Sniffed(Kind.TLS)  # no extensions at all: no SNI
        extensions = _Reader(reader.vector(2))
        if not reader.done():
            return _malformed("bytes after the ClientHello extensions")
        seen: set[int] = set()
        sni: Sniffed | None = None
        while not extensions.done():
            ext_type = extensions.uint(2)
            ext_data = extensions.vector(2)
            if ext_type in seen:
                return _malformed(f"duplicate TLS extension {ext_type}")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                sni = _server_name(ext_data)
        return sni if sni is not None else Sniffed(Kind.TLS)
    except ValueError:
        return _malformed("truncated ClientHello field")


def _server_name(ext: bytes) -> Sniffed:
    reader = _Reader(ext)
    names = _Reader(reader.vector(2))
    if not reader.done():
        return _malformed("bytes after the server_name list")
    host: str | None = None
    while not names.done():
        name_type = names.uint(1)
        name = names.vector(2)
        if name_type != _HOST_NAME:
            continue
        if host is not None:
            return _malformed("two host_name entries in server_name")
        try:
            host = name.decode("ascii")
        except UnicodeDecodeError:
            return _malformed("server_name is not ASCII")
    if host is None:
        return _malformed("server_name without host_name")
    return _named(Kind.TLS, host)


def _named(kind: Kind, host: str) -> Sniffed:
    literal = _ip_literal(host)
    if literal is not None:
        return Sniffed(kind, literal=literal)
    try:
        return Sniffed(kind, name=normalize_name(host))
    except InvalidRequest as exc:
        return _malformed(exc.message)


def _ip_literal(host: str) -> str | None:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# HTTP/1.x
# ---------------------------------------------------------------------------


def _sniff_http(data: bytes) -> Sniffed:
    space = data.find(b" ", 0, _LONGEST_METHOD + 1)
    if space < 0:
        if len(data) <= _LONGEST_METHOD and any(m.startswith(data) for m in HTTP_METHODS):
            return NEED_MORE
        return OTHER
    method = data[:space]
    if method not in HTTP_METHODS:
        return OTHER
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) >= MAX_SNIFF_BYTES:
            return _malformed("HTTP request head larger than the sniff limit")
        return NEED_MORE
    try:
        head = data[:end].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return _malformed("undecodable HTTP head")
    request_line, *header_lines = head.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _malformed("bad HTTP request line")
    target = parts[1]
    authority: str | None = None
    if method == b"CONNECT":
        authority = target
    elif "://" in target:
        authority = target.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        if "@" in authority:
            return _malformed("userinfo in the request target")
    hosts = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            return _malformed("bad HTTP header line")
        if name.lower() == "host":
            hosts.append(value.strip())
    if len(hosts) > 1:
        return _malformed("more than one Host header")
    host_value = _strip_port(hosts[0]) if hosts else None
    target_host = _strip_port(authority) if authority is not None else None
    if (
        target_host is not None
        and host_value is not None
        and (target_host.lower() != host_value.lower())
    ):
        return _malformed("Host header disagrees with the request target")
    host = target_host if target_host is not None else host_value
    if host is None or host == "":
        return Sniffed(Kind.HTTP)
    return _named(Kind.HTTP, host)


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        close = authority.find("]")
        return authority[: close + 1] if close >= 0 else authority
    host, _, _ = authority.partition(":")
    return host
