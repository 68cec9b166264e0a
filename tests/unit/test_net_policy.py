"""Zone network policy: parsing, validation errors, matching, refused ranges, publishes."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoned.errors import InvalidRequest
from zoned.net.policy import (
    ALWAYS_REFUSED,
    CidrRule,
    CompiledPolicy,
    NameRule,
    NetPolicy,
    PortRange,
    Publish,
    RefusedRange,
    name_matches,
    normalize_name,
    parse_policy,
    parse_publish,
    parse_rule,
    split_net_option,
    validate_policy,
    validate_publishes,
)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("pypi.org", NameRule(pattern="pypi.org")),
        ("PyPI.org.", NameRule(pattern="pypi.org")),
        ("pypi.org:443", NameRule(pattern="pypi.org", ports=[PortRange(443, 443)])),
        (
            "*.pythonhosted.org:80,443",
            NameRule(pattern="*.pythonhosted.org", ports=[PortRange(80, 80), PortRange(443, 443)]),
        ),
        ("bücher.example", NameRule(pattern="xn--bcher-kva.example")),
        ("203.0.113.0/24", CidrRule(network="203.0.113.0/24")),
        ("198.51.100.7:5432", CidrRule(network="198.51.100.7/32", ports=[PortRange(5432, 5432)])),
        ("[2001:db8::/32]:443", CidrRule(network="2001:db8::/32", ports=[PortRange(443, 443)])),
        ("2001:db8::1", CidrRule(network="2001:db8::1/128")),
        (
            "udp://203.0.113.5:123",
            CidrRule(network="203.0.113.5/32", ports=[PortRange(123, 123)], protocol="udp"),
        ),
        (
            "tcp://203.0.113.5:8000-8100",
            CidrRule(network="203.0.113.5/32", ports=[PortRange(8000, 8100)]),
        ),
    ],
)
def test_rules_parse(text: str, rule: NameRule | CidrRule) -> None:
    assert parse_rule(text) == rule
    # What describe() prints parses back to the same rule.
    assert parse_rule(str(rule)) == rule


#: (text, what its error says) of malformed rules and publishes.
MALFORMED: dict[Callable[[str], object], list[tuple[str, str]]] = {
    parse_rule: [
        ("", "empty"),
        ("sctp://203.0.113.5:1", "unknown protocol 'sctp'"),
        ("udp://pypi.org:53", "UDP is only for CIDR rules"),
        ("pypi.org:0", "ports are 1-65535"),
        ("pypi.org:70000", "ports are 1-65535"),
        ("pypi.org:443-80", "low-high"),
        ("pypi.org:https", "invalid ports"),
        ("foo.*.org", "'*' may only be the whole first label"),
        ("*", "invalid name"),
        ("-bad.org", "must be 1-63"),
        ("a" * 64 + ".org", "invalid name"),
        ("203.0.113.1/24", "has host bits set"),
        ("[2001:db8::/32", "unclosed"),
        ("[2001:db8::/32]x", "unexpected"),
        ("under_score.org", "must be 1-63"),
    ],
    parse_publish: [
        ("80", "expected"),
        ("a:b:c:d", "expected"),
        ("x.y:80:80", "not an IP address"),
        ("127.0.0.1:0:80", "not 1-65535"),
        ("127.0.0.1:80:http", "must be numbers"),
        ("[::1:80:80", "expected"),
    ],
}


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [(parse, text, message) for parse, cases in MALFORMED.items() for text, message in cases],
)
def test_malformed_rules_and_publishes_are_clear_errors(
    parse: Callable[[str], object], text: str, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        parse(text)


def test_policy_parse_and_wire_round_trip() -> None:
    policy = parse_policy(["open pypi.org:443", "udp://203.0.113.5:123"])
    assert policy.open
    assert policy.describe() == ["open", "pypi.org:443", "udp://203.0.113.5/32:123"]
    assert parse_policy(policy.describe()) == policy
    wire = msgspec.msgpack.encode(policy)
    assert msgspec.msgpack.decode(wire, type=NetPolicy) == policy
    assert parse_policy([]) == NetPolicy()
    assert parse_policy(["none"]) == NetPolicy()


def test_policies_off_the_wire_are_validated() -> None:
    with pytest.raises(InvalidRequest, match="not in normal form"):
        validate_policy(NetPolicy(rules=[NameRule(pattern="PyPI.org")]))
    with pytest.raises(InvalidRequest, match="not in normal form"):
        validate_policy(NetPolicy(rules=[CidrRule(network="2001:DB8::/32")]))
    with pytest.raises(InvalidRequest, match="invalid port range"):
        validate_policy(NetPolicy(rules=[NameRule(pattern="a.org", ports=[PortRange(9, 8)])]))
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(
            msgspec.msgpack.encode(
                {"rules": [{"kind": "cidr", "network": "1.2.3.0/24", "protocol": "icmp"}]}
            ),
            type=NetPolicy,
        )
    with pytest.raises(InvalidRequest, match="too many"):
        validate_policy(NetPolicy(rules=[NameRule(pattern=f"a{i}.org") for i in range(257)]))


def test_wildcards_match_below_not_the_apex() -> None:
    assert name_matches("*.pythonhosted.org", "files.pythonhosted.org")
    assert name_matches("*.pythonhosted.org", "a.b.pythonhosted.org")
    assert not name_matches("*.pythonhosted.org", "pythonhosted.org")
    assert not name_matches("*.pythonhosted.org", "evilpythonhosted.org")
    assert name_matches("pypi.org", "pypi.org")
    assert not name_matches("pypi.org", "www.pypi.org")


def test_name_rules_by_port() -> None:
    policy = CompiledPolicy(parse_policy(["pypi.org:443", "*.cdn.test"]))
    assert policy.name_rule_for("pypi.org", 443).allowed
    assert policy.name_rule_for("pypi.org", 80).rule == "port-not-allowed"
    assert policy.name_rule_for("x.cdn.test", 22).allowed
    assert policy.name_rule_for("evil.org", 443).rule == "name-not-allowed"
    assert policy.name_allowed("pypi.org").allowed
    assert not policy.name_allowed("evil.org").allowed


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "rfc1918"),
        ("172.31.255.255", "rfc1918"),
        ("192.168.0.1", "rfc1918"),
        ("100.64.0.1", "cgnat"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.251", "multicast"),
        ("255.255.255.255", "reserved"),
        ("0.0.0.0", "this-network"),
        ("::1", "loopback"),
        ("fd00::1", "ula"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "ipv4-mapped"),
        ("64:ff9b::a00:1", "rfc1918"),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_refused_ranges(address: str, why: str | None) -> None:
    assert CompiledPolicy(NetPolicy()).refused_range(ip(address)) == why


def test_open_is_the_internet_but_never_the_host() -> None:
    host = [
        RefusedRange("192.0.2.0/24", "host-network"),
        RefusedRange("100.87.0.0/16", "zone-pool"),
    ]
    policy = CompiledPolicy(parse_policy(["open"]), host)
    assert policy.address_decision(ip("8.8.8.8"), 443, "tcp") == policy.address_decision(
        ip("1.1.1.1"), 22, "tcp"
    )
    assert policy.address_decision(ip("8.8.8.8"), 443, "tcp").allowed  # type: ignore[union-attr]
    for refused in ("192.0.2.7", "100.87.0.6", "10.0.0.1", "169.254.169.254"):
        decision = policy.address_decision(ip(refused), 443, "tcp")
        assert decision is not None and not decision.allowed, refused
    # open is TCP: UDP needs a CIDR rule.
    assert policy.address_decision(ip("8.8.8.8"), 443, "udp") is None


def test_cidr_rules_open_refused_ranges_only_from_inside() -> None:
    policy = CompiledPolicy(
        parse_policy(["10.1.2.0/24:5432", "0.0.0.0/0", "169.254.169.254", "udp://10.9.0.0/16:53"]),
        [RefusedRange("10.1.0.0/16", "zone-pool")],
    )
    assert policy.address_decision(ip("203.0.113.1"), 80, "tcp").allowed  # type: ignore[union-attr]
    # 0.0.0.0/0 names no refused range.
    assert policy.address_decision(ip("10.3.0.1"), 80, "tcp").rule == "rfc1918"  # type: ignore[union-attr]
    assert policy.address_decision(ip("169.254.169.254"), 80, "tcp").allowed  # type: ignore[union-attr]
    # 10.1.2.0/24 lies in rfc1918 and in the zone pool: opens it, port 5432 only.
    assert policy.address_decision(ip("10.1.2.9"), 5432, "tcp").allowed  # type: ignore[union-attr]
    assert not policy.address_decision(ip("10.1.2.9"), 22, "tcp").allowed  # type: ignore[union-attr]
    assert policy.address_decision(ip("10.9.1.1"), 53, "udp").allowed  # type: ignore[union-attr]
    assert policy.answer_allowed(ip("10.1.2.9")).allowed
    assert not policy.answer_allowed(ip("10.1.3.9")).allowed
    assert [str(r) for r in policy.udp_rules()] == ["udp://10.9.0.0/16:53"]


def test_open_does_not_answer_the_hosts_own_names() -> None:
    policy = CompiledPolicy(parse_policy(["open", "printer.lan"]))
    assert policy.name_allowed("pypi.org").allowed
    for name in ("1.0.0.10.in-addr.arpa", "nas.local", "localhost", "db.corp", "x.internal"):
        assert policy.name_allowed(name).rule == "special-use-name", name
    assert policy.name_allowed("printer.lan").allowed  # named by a rule


def test_without_rules_nothing_is_reached() -> None:
    policy = CompiledPolicy(NetPolicy())
    assert policy.address_decision(ip("8.8.8.8"), 443, "tcp") is None
    assert not policy.name_allowed("pypi.org").allowed


@pytest.mark.parametrize(
    ("text", "publish"),
    [
        ("8080:80", Publish(host_port=8080, zone_port=80)),
        ("127.0.0.1:8080:80", Publish(host_port=8080, zone_port=80)),
        ("0.0.0.0:8080:80", Publish(host_port=8080, zone_port=80, host_address="0.0.0.0")),
        ("[::1]:8443:443", Publish(host_port=8443, zone_port=443, host_address="::1")),
    ],
)
def test_publishes_parse(text: str, publish: Publish) -> None:
    assert parse_publish(text) == publish
    assert parse_publish(str(publish)) == publish


def test_overlapping_publishes_are_refused() -> None:
    a = parse_publish("127.0.0.1:8080:80")
    assert validate_publishes(
        [a, parse_publish("127.0.0.2:8080:80"), parse_publish("[::1]:8080:80")]
    )
    with pytest.raises(InvalidRequest, match="overlap"):
        validate_publishes([a, parse_publish("127.0.0.1:8080:81")])
    with pytest.raises(InvalidRequest, match="overlap"):
        validate_publishes([a, parse_publish("0.0.0.0:8080:81")])
    with pytest.raises(InvalidRequest, match="multicast"):
        validate_publishes([Publish(host_port=1, zone_port=1, host_address="224.0.0.1")])


def test_always_refused_networks_are_valid() -> None:
    for refused in ALWAYS_REFUSED:
        ipaddress.ip_network(refused.network)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_parses_or_is_invalid_request(text: str) -> None:
    try:
        rule = parse_rule(text)
    except InvalidRequest:
        return
    assert parse_rule(str(rule)) == rule


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(
        r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,4}\Z"
    )
)
def test_normal_names_are_fixed_points(name: str) -> None:
    assert normalize_name(name) == name
    assert normalize_name(name.upper() + ".") == name


@pytest.mark.parametrize(
    ("typed", "rules"),
    [
        (
            "pypi.org,*.pythonhosted.org,10.0.0.0/8:443/tcp",
            ["pypi.org", "*.pythonhosted.org", "tcp://10.0.0.0/8:443"],
        ),
        ("pypi.org:80,443,files.test", ["pypi.org:80,443", "files.test"]),
        ("203.0.113.5:123/udp", ["udp://203.0.113.5:123"]),
        ("10.0.0.0/8/udp", ["udp://10.0.0.0/8"]),
        ("[2001:db8::/32]:443,8443/tcp", ["tcp://[2001:db8::/32]:443,8443"]),
        ("open", ["open"]),
        ("none", ["none"]),
    ],
)
def test_the_net_option_splits_rules_at_commas_and_keeps_ports_together(
    typed: str, rules: list[str]
) -> None:
    assert split_net_option(typed) == rules
    parse_policy(rules)  # every piece is a rule the parser reads


@pytest.mark.parametrize("typed", ["pypi.org,,x.org", ",pypi.org", "pypi.org,"])
def test_the_net_option_refuses_empty_rules(typed: str) -> None:
    with pytest.raises(InvalidRequest, match="empty rule"):
        split_net_option(typed)
