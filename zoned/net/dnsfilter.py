"""The zone resolver's decisions, on DNS messages (dnspython), without IO.

Pure given ``now``: :func:`parse_query` validates what the zone sent,
:func:`decide` says whether to answer it locally or forward it,
:func:`upstream_query` makes the query sent upstream (our own id, no
options of the zone's), and :func:`filter_answer` turns the upstream answer
into the zone's: only the question's name and its CNAME chain, addresses
outside refused ranges (rebinding) or inside an explicit CIDR rule, TTLs cut
to the pin lifetime, no additional section, and the addresses to pin.

Answers to refused names are NXDOMAIN with an Extended DNS Error (18,
"Prohibited"; 15, "Blocked", for rebinding) so that clients fail at once
rather than retry. HTTPS/SVCB queries get an empty answer: their address
hints and ECH configurations would bypass the pinning; clients fall back to
A/AAAA.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from zoned.errors import InvalidRequest
from zoned.net.pins import PinTable
from zoned.net.policy import CompiledPolicy, IPAddress, normalize_name

MAX_QUERY_BYTES = 4096
MAX_ANSWER_BYTES = 65535
MAX_ADDRESSES_PER_ANSWER = 32
MAX_CNAME_CHAIN = 8
UDP_PAYLOAD = 1232  # what we advertise upstream and honour at most towards the zone

FORWARDED_TYPES = frozenset(
    {
        dns.rdatatype.A,
        dns.rdatatype.AAAA,
        dns.rdatatype.CNAME,
        dns.rdatatype.TXT,
        dns.rdatatype.MX,
        dns.rdatatype.SRV,
        dns.rdatatype.NS,
        dns.rdatatype.SOA,
        dns.rdatatype.CAA,
        dns.rdatatype.PTR,
    }
)
EMPTY_TYPES = frozenset({dns.rdatatype.HTTPS, dns.rdatatype.SVCB})


class BadQuery(Exception):
    """A message from the zone that gets no answer at all (garbage, not a query)."""


@dataclass(frozen=True)
class Query:
    message: dns.message.Message
    name: str  # normalized, no trailing dot
    qname: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    max_udp: int


@dataclass
class Filtered:
    """What :func:`filter_answer` made of an upstream answer."""

    response: dns.message.Message
    pinned: list[tuple[IPAddress, int]] = field(default_factory=list)
    refused: list[tuple[IPAddress, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def parse_query(wire: bytes) -> Query:
    if len(wire) > MAX_QUERY_BYTES:
        raise BadQuery("query too long")
    try:
        message = dns.message.from_wire(wire, ignore_trailing=False)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError) as exc:
        raise BadQuery(f"unparsable query: {type(exc).__name__}") from None
    if message.flags & dns.flags.QR:
        raise BadQuery("a response, not a query")
    if message.opcode() != dns.opcode.QUERY or len(message.question) != 1:
        raise BadQuery("not a standard query with one question")
    question = message.question[0]
    if question.rdclass != dns.rdataclass.IN:
        raise BadQuery("not class IN")
    try:
        name = normalize_name(question.name.to_text(omit_final_dot=True))
    except InvalidRequest as exc:
        raise BadQuery(exc.message) from None
    payload = message.payload if message.edns >= 0 else 512
    return Query(message, name, question.name, question.rdtype, max(512, min(payload, UDP_PAYLOAD)))


def _response(
    query: Query, rcode: dns.rcode.Rcode, ede: tuple[dns.edns.EDECode, str] | None = None
) -> dns.message.Message:
    response = dns.message.make_response(query.message)
    response.flags |= dns.flags.RA
    response.set_rcode(rcode)
    if query.message.edns >= 0:
        options: list[dns.edns.Option] = [dns.edns.EDEOption(ede[0], ede[1])] if ede else []
        response.use_edns(0, payload=UDP_PAYLOAD, options=options)
    return response


def to_wire(response: dns.message.Message, max_size: int) -> bytes:
    """The response, truncated (TC, no records) if it does not fit ``max_size``."""
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def refused_name(query: Query, why: str) -> dns.message.Message:
    return _response(query, dns.rcode.NXDOMAIN, (dns.edns.EDECode.PROHIBITED, why))


@dataclass(frozen=True)
class Decided:
    forward: bool
    local: dns.message.Message | None = None
    rule: str = ""


def decide(policy: CompiledPolicy, query: Query) -> Decided:
    """Answer locally (refused, empty, not implemented) or forward upstream."""
    allowed = policy.name_allowed(query.name)
    if not allowed.allowed:
        return Decided(False, refused_name(query, f"zoned policy: {allowed.rule}"), allowed.rule)
    if query.rdtype in EMPTY_TYPES:
        return Decided(False, _response(query, dns.rcode.NOERROR), allowed.rule)
    if query.rdtype not in FORWARDED_TYPES:
        return Decided(False, _response(query, dns.rcode.NOTIMP), allowed.rule)
    return Decided(True, rule=allowed.rule)


def upstream_query(query: Query) -> dns.message.Message:
    """The query zoned sends upstream for the zone: fresh id, RD, EDNS without options."""
    message = dns.message.make_query(
        query.qname, query.rdtype, use_edns=0, payload=UDP_PAYLOAD, want_dnssec=False
    )
    message.id = secrets.randbelow(65536)
    return message


def parse_upstream(sent: dns.message.Message, wire: bytes) -> dns.message.Message:
    """The upstream answer, checked against what we asked (id and question)."""
    if len(wire) > MAX_ANSWER_BYTES:
        raise BadQuery("upstream answer too long")
    try:
        answer = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError) as exc:
        raise BadQuery(f"unparsable upstream answer: {type(exc).__name__}") from None
    if not sent.is_response(answer):
        raise BadQuery("upstream answer does not match the query")
    return answer


def filter_answer(
    policy: CompiledPolicy, pins: PinTable, query: Query, answer: dns.message.Message
) -> Filtered:
    """The zone's answer from the upstream one (see the module docstring); pins recorded."""
    rcode = answer.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return Filtered(_response(query, dns.rcode.SERVFAIL))
    # Follow the CNAME chain from the question's name; nothing else is kept.
    chain = [query.qname]
    kept: list[dns.rrset.RRset] = []
    for _ in range(MAX_CNAME_CHAIN):
        cname = answer.get_rrset(answer.answer, chain[-1], dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None or query.rdtype == dns.rdatatype.CNAME:
            break
        kept.append(cname)
        target = next(iter(cname)).target
        if target in chain:
            break
        chain.append(target)
    owner = chain[-1]
    response = _response(query, dns.rcode.Rcode(rcode))
    result = Filtered(response)
    final = answer.get_rrset(answer.answer, owner, dns.rdataclass.IN, query.rdtype)
    if final is not None and query.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        good: list[dns.rdata.Rdata] = []
        for rdata in final:
            addr = ipaddress.ip_address(rdata.address)
            verdict = policy.answer_allowed(addr)
            if verdict.allowed and len(good) < MAX_ADDRESSES_PER_ANSWER:
                good.append(rdata)
                result.pinned.append((addr, final.ttl))
            elif not verdict.allowed:
                result.refused.append((addr, verdict.rule))
        if result.refused and not good:
            blocked = _response(
                query,
                dns.rcode.NXDOMAIN,
                (dns.edns.EDECode.BLOCKED, "zoned policy: answer in a refused range"),
            )
            return Filtered(blocked, refused=result.refused)
        if good:
            ttl = pins.client_ttl(final.ttl)
            rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, query.rdtype)
            for rdata in good:
                rrset.add(rdata, ttl)
            kept.append(rrset)
    elif final is not None:
        kept.append(final)
    for rrset in kept:
        rrset.update_ttl(pins.client_ttl(rrset.ttl))
        response.answer.append(rrset)
    for rrset in answer.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            response.authority.append(rrset)
    result.names = [n.to_text(omit_final_dot=True).lower() for n in chain]
    return result
