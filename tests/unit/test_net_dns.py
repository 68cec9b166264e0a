"""The resolver's decisions on DNS messages, DNS pinning, counters and event rate limits."""

from __future__ import annotations

import ipaddress

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoned.net import dnsfilter
from zoned.net.accounting import EventLimiter, NetCounters, RefusedEvent, TokenBucket
from zoned.net.pins import PinTable
from zoned.net.policy import CompiledPolicy, parse_policy

POLICY = CompiledPolicy(parse_policy(["pypi.org:443", "*.pythonhosted.org", "10.1.2.0/24"]))


def query(name: str, rdtype: str = "A", *, edns: bool = True) -> dnsfilter.Query:
    message = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    return dnsfilter.parse_query(message.to_wire())


def upstream_answer(
    q: dnsfilter.Query, *records: tuple[str, str, str], ttl: int = 60
) -> dns.message.Message:
    sent = dnsfilter.upstream_query(q)
    answer = dns.message.make_response(sent)
    for owner, rdtype, value in records:
        answer.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, value))
    return dnsfilter.parse_upstream(sent, answer.to_wire(max_size=65535))


def ede(message: dns.message.Message) -> list[int]:
    return [int(o.code) for o in message.options if isinstance(o, dns.edns.EDEOption)]


def test_refused_names_get_nxdomain_with_prohibited() -> None:
    q = query("evil.org")
    decided = dnsfilter.decide(POLICY, q)
    assert not decided.forward and decided.local is not None
    assert decided.local.rcode() == dns.rcode.NXDOMAIN
    assert ede(decided.local) == [int(dns.edns.EDECode.PROHIBITED)]
    assert decided.local.id == q.message.id
    # Without EDNS in the query, none in the answer.
    assert dnsfilter.decide(POLICY, query("evil.org", edns=False)).local.edns == -1  # type: ignore[union-attr]


def test_allowed_names_forward_https_records_are_empty() -> None:
    assert dnsfilter.decide(POLICY, query("pypi.org")).forward
    assert dnsfilter.decide(POLICY, query("files.pythonhosted.org", "AAAA")).forward
    https = dnsfilter.decide(POLICY, query("pypi.org", "HTTPS"))
    assert (
        not https.forward and https.local is not None and https.local.rcode() == dns.rcode.NOERROR
    )
    assert not https.local.answer
    assert dnsfilter.decide(POLICY, query("pypi.org", "ANY")).local.rcode() == dns.rcode.NOTIMP  # type: ignore[union-attr]


def test_upstream_query_has_its_own_id_and_no_zone_options() -> None:
    message = dns.message.make_query(
        "pypi.org",
        "A",
        use_edns=0,
        options=[dns.edns.GenericOption(dns.edns.OptionType.make(65001), b"x")],
    )
    q = dnsfilter.parse_query(message.to_wire())
    sent = dnsfilter.upstream_query(q)
    assert list(sent.options) == [] and sent.question == q.message.question
    other = dns.message.make_response(dns.message.make_query("evil.org", "A"))
    with pytest.raises(dnsfilter.BadQuery, match="does not match"):
        dnsfilter.parse_upstream(sent, other.to_wire())


def test_answers_are_pinned_with_the_cname_chain() -> None:
    q = query("pypi.org")
    pins = PinTable(min_ttl_s=300)
    answer = upstream_answer(
        q,
        ("pypi.org.", "CNAME", "dualstack.python.map.fastly.net."),
        ("dualstack.python.map.fastly.net.", "A", "151.101.0.223"),
        ("unrelated.example.", "A", "203.0.113.66"),
        ttl=30,
    )
    answer.additional.append(dns.rrset.from_text("ns.example.", 60, "IN", "A", "203.0.113.67"))
    filtered = dnsfilter.filter_answer(POLICY, pins, q, answer)
    assert filtered.pinned == [(ipaddress.ip_address("151.101.0.223"), 30)]
    assert filtered.names == ["pypi.org", "dualstack.python.map.fastly.net"]
    texts = sorted(r.to_text() for r in filtered.response.answer)
    assert texts == [
        "dualstack.python.map.fastly.net. 30 IN A 151.101.0.223",
        "pypi.org. 30 IN CNAME dualstack.python.map.fastly.net.",
    ]
    assert filtered.response.additional == []


def test_rebinding_answers_are_refused_or_stripped() -> None:
    q = query("files.pythonhosted.org")
    pins = PinTable()
    only_private = upstream_answer(q, ("files.pythonhosted.org.", "A", "192.168.1.1"))
    filtered = dnsfilter.filter_answer(POLICY, pins, q, only_private)
    assert filtered.response.rcode() == dns.rcode.NXDOMAIN
    assert ede(filtered.response) == [int(dns.edns.EDECode.BLOCKED)]
    assert filtered.refused == [(ipaddress.ip_address("192.168.1.1"), "rfc1918")]
    assert filtered.pinned == []
    mixed = upstream_answer(
        q,
        ("files.pythonhosted.org.", "A", "151.101.1.1"),
        ("files.pythonhosted.org.", "A", "127.0.0.1"),
        ("files.pythonhosted.org.", "A", "10.1.2.3"),  # named by the CIDR rule: passes
    )
    filtered = dnsfilter.filter_answer(POLICY, pins, q, mixed)
    assert sorted(str(a) for a, _ in filtered.pinned) == ["10.1.2.3", "151.101.1.1"]
    assert filtered.refused == [(ipaddress.ip_address("127.0.0.1"), "loopback")]
    q6 = query("files.pythonhosted.org", "AAAA")
    mapped = upstream_answer(q6, ("files.pythonhosted.org.", "AAAA", "::ffff:10.0.0.1"))
    assert dnsfilter.filter_answer(POLICY, pins, q6, mapped).response.rcode() == dns.rcode.NXDOMAIN


def test_upstream_errors_become_servfail() -> None:
    q = query("pypi.org")
    answer = upstream_answer(q)
    answer.set_rcode(dns.rcode.REFUSED)
    assert (
        dnsfilter.filter_answer(POLICY, PinTable(), q, answer).response.rcode()
        == dns.rcode.SERVFAIL
    )


def test_big_answers_are_truncated_for_udp() -> None:
    q = query("pypi.org", "TXT")
    answer = upstream_answer(
        q, *[("pypi.org.", "TXT", '"' + "x" * 200 + f'{i}"') for i in range(20)]
    )
    response = dnsfilter.filter_answer(POLICY, PinTable(), q, answer).response
    wire = dnsfilter.to_wire(response, q.max_udp)
    assert len(wire) <= q.max_udp
    assert dns.message.from_wire(wire).flags & dns.flags.TC


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"", "unparsable"),
        (b"\x00" * 11, "unparsable"),
        (dns.message.make_response(dns.message.make_query("a.org", "A")).to_wire(), "a response"),
        (b"x" * 5000, "too long"),
    ],
)
def test_garbage_queries_are_dropped(wire: bytes, why: str) -> None:
    with pytest.raises(dnsfilter.BadQuery, match=why):
        dnsfilter.parse_query(wire)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_datagrams_never_raise_anything_else(wire: bytes) -> None:
    try:
        q = dnsfilter.parse_query(wire)
    except dnsfilter.BadQuery:
        return
    dnsfilter.decide(POLICY, q)


def test_pins_expire_and_are_bounded() -> None:
    pins = PinTable(max_entries=3, min_ttl_s=10, max_ttl_s=100)
    a, b, c, d = (ipaddress.ip_address(f"203.0.113.{i}") for i in range(1, 5))
    pins.record(["x.org"], [(a, 1)], now=0)  # pinned 10 s (the floor)
    pins.record(["y.org", "cdn.net"], [(b, 1000)], now=0)  # 100 s (the ceiling)
    assert pins.names_for(b, 50) == {"y.org", "cdn.net"}
    assert pins.pinned("x.org", a, 9.9) and not pins.pinned("x.org", a, 10)
    assert pins.client_ttl(1000) == 100 and pins.client_ttl(5) == 5
    pins.record(["z.org"], [(c, 50), (d, 50)], now=5)  # over the bound: the earliest expiry goes
    assert len(pins) == 3 and pins.evicted == 2
    assert pins.names_for(a, 6) == set()
    pins.expire(200)
    assert len(pins) == 0


def test_pins_export_and_seed_a_successor() -> None:
    old = PinTable(max_entries=10)
    addr = ipaddress.ip_address("203.0.113.9")
    old.record(["pypi.org", "cdn.net"], [(addr, 60)], now=100)
    successor = PinTable(max_entries=1)
    for a, name, expiry in sorted(old.entries(now=150), key=lambda e: e[1]):
        assert expiry == 400  # min_ttl_s (300) after 100
        successor.record_until(name, a, expiry)
    assert len(successor) == 1  # bounded too
    assert successor.names_for(addr, 399) == {"pypi.org"}
    assert old.entries(now=400) == []


def test_token_bucket_and_event_limiter() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    counters = NetCounters()
    limiter = EventLimiter(rate=1, burst=2, now=0)
    event = RefusedEvent(time=0, kind="dns", destination="evil.org", rule="name-not-allowed")
    admitted = [limiter.admit(event, 0, counters) for _ in range(5)]
    assert [e is not None for e in admitted] == [True, True, False, False, False]
    assert counters.events_suppressed == 3
    later = limiter.admit(event, 10, counters)
    assert later is not None and later.suppressed_before == 3
