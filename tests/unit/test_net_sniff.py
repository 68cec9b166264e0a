"""SNI and Host sniffing: real ClientHellos from Python's TLS stack, HTTP heads, and fuzzing."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoned.net.sniff import MAX_SNIFF_BYTES, Kind, sniff

FUZZ = settings(max_examples=400, deadline=None)


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight OpenSSL sends for ``server_hostname`` (TLS 1.3, real bytes)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello("files.pythonhosted.org")


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake re-framed into records of at most ``size`` bytes."""
    body = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    out = b""
    for i in range(0, len(body), size):
        part = body[i : i + size]
        out += bytes([0x16, 3, 1]) + len(part).to_bytes(2, "big") + part
    return out


def test_sni_of_a_real_client_hello() -> None:
    got = sniff(HELLO)
    assert got.kind is Kind.TLS and got.name == "files.pythonhosted.org"
    assert sniff(client_hello("PyPI.org")).name == "pypi.org"


def test_no_sni_and_address_literals() -> None:
    assert sniff(client_hello(None)) == sniff(client_hello(None))
    got = sniff(client_hello(None))
    assert got.kind is Kind.TLS and got.name is None and got.literal is None


def test_every_prefix_needs_more() -> None:
    for end in range(1, len(HELLO)):
        assert sniff(HELLO[:end]).kind is Kind.NEED_MORE, end


def test_hello_split_over_records() -> None:
    for size in (1, 7, 100, 512):
        framed = split_records(HELLO, size)
        assert sniff(framed).name == "files.pythonhosted.org", size
        assert sniff(framed[: len(framed) // 2]).kind is Kind.NEED_MORE


def test_hello_followed_by_other_records() -> None:
    assert sniff(HELLO + b"\x14\x03\x03\x00\x01\x01").name == "files.pythonhosted.org"


def test_malformed_hellos() -> None:
    # Not a ClientHello (a ServerHello type byte).
    bad = bytearray(HELLO)
    bad[5] = 2
    assert sniff(bytes(bad)).kind is Kind.MALFORMED
    # A record length of zero, and a wrong record version.
    assert sniff(b"\x16\x03\x01\x00\x00").kind is Kind.MALFORMED
    assert sniff(b"\x16\x04\x01\x00\x10" + b"\x00" * 16).kind is Kind.MALFORMED
    # A ClientHello bigger than we ever buffer.
    huge = b"\x01" + (MAX_SNIFF_BYTES).to_bytes(3, "big")
    assert sniff(b"\x16\x03\x01" + len(huge).to_bytes(2, "big") + huge).kind is Kind.MALFORMED
    # The handshake ends (another record type follows) before the hello does.
    short = b"\x16\x03\x01\x00\x04\x01\x00\x00\x50" + b"\x15\x03\x03\x00\x02\x02\x28"
    assert sniff(short).kind is Kind.MALFORMED


def _http(head: str) -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "kind", "name"),
    [
        ("GET / HTTP/1.1\nHost: pypi.org", Kind.HTTP, "pypi.org"),
        ("GET / HTTP/1.1\nhost: PyPI.org:8080\nAccept: */*", Kind.HTTP, "pypi.org"),
        ("POST /x HTTP/1.0\nContent-Length: 0", Kind.HTTP, None),
        (
            "GET http://deb.debian.org/debian HTTP/1.1\nHost: deb.debian.org",
            Kind.HTTP,
            "deb.debian.org",
        ),
        ("GET http://deb.debian.org/ HTTP/1.1", Kind.HTTP, "deb.debian.org"),
        ("CONNECT pypi.org:443 HTTP/1.1\nHost: pypi.org:443", Kind.HTTP, "pypi.org"),
        ("GET / HTTP/1.1\nHost: [2001:db8::1]:80", Kind.HTTP, None),
        ("GET / HTTP/1.1\nHost: a.org\nHost: b.org", Kind.MALFORMED, None),
        ("GET http://a.org/ HTTP/1.1\nHost: b.org", Kind.MALFORMED, None),
        ("GET http://u@a.org/ HTTP/1.1", Kind.MALFORMED, None),
        ("GET / HTTP/2\nHost: a.org", Kind.MALFORMED, None),
        ("GET / HTTP/1.1\nBad Header: x", Kind.MALFORMED, None),
        ("GET / HTTP/1.1\nHost: bad_name.org", Kind.MALFORMED, None),
    ],
)
def test_http_heads(head: str, kind: Kind, name: str | None) -> None:
    got = sniff(_http(head))
    assert (got.kind, got.name) == (kind, name)


def test_http_literal_and_partial() -> None:
    assert sniff(_http("GET / HTTP/1.1\nHost: 198.51.100.1")).literal == "198.51.100.1"
    assert sniff(b"GE").kind is Kind.NEED_MORE
    assert sniff(b"GET / HTTP/1.1\r\nHost: a").kind is Kind.NEED_MORE
    assert sniff(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 4000).kind is Kind.MALFORMED


@pytest.mark.parametrize(
    "data", [b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"HELO x\r\n", b"x"]
)
def test_other_protocols(data: bytes) -> None:
    assert sniff(data).kind is Kind.OTHER


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    sniff(data)
    sniff(b"\x16\x03\x01" + data)
    sniff(b"GET / HTTP/1.1\r\n" + data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)), max_size=8))
def test_mutated_hellos_never_raise_and_name_stays_a_name(mutations: list[tuple[int, int]]) -> None:
    data = bytearray(HELLO)
    for pos, value in mutations:
        data[pos] = value
    got = sniff(bytes(data))
    if got.name is not None:
        assert got.name == got.name.lower() and len(got.name) <= 253


@FUZZ
@given(st.integers(1, 600), st.integers(0, 2000))
def test_any_framing_and_cut_gives_the_name_or_needs_more(size: int, cut: int) -> None:
    framed = split_records(HELLO, size)
    got = sniff(framed[: cut or len(framed)])
    assert got.kind in (Kind.NEED_MORE, Kind.TLS)
    if got.kind is Kind.TLS:
        assert got.name == "files.pythonhosted.org"
