"""A zone's network policy: the model, the parser, validation and matching.

Pure: no IO, no trio. The types are msgspec Structs so that the policy can
travel on the control socket and to the zone's helper unchanged.

Rules
-----
A policy is an allow-list. Each rule names a destination and optionally the
ports (and, for CIDR rules, the protocol) it allows:

- ``pypi.org``, ``pypi.org:443``, ``*.pythonhosted.org:80,443``: a **name
  rule**. ``*.x`` matches every name below ``x`` (any depth), not ``x``
  itself. Name rules are TCP only: the resolver answers the name, and the
  proxy lets a connection through only to an address it answered for that
  name, and only when a TLS SNI or HTTP Host the client sends names an
  allowed name pinned to that address.
- ``203.0.113.0/24``, ``198.51.100.7:5432``, ``[2001:db8::/32]:443``,
  ``udp://203.0.113.5:123``: a **CIDR rule** (a bare address is a /32 or
  /128). TCP by default; ``udp://`` allows UDP to those ports instead (UDP
  is forwarded by the kernel, not proxied). No SNI/Host check.
- ``open``: every destination outside the refused ranges, TCP on any port,
  and every name the resolver can answer outside the refused ranges.

No ports means every port. The **refused ranges** (:data:`ALWAYS_REFUSED`
plus what the host adds: its own addresses and networks, and the zone
pool) are refused even under ``open`` and even for an allowed name's DNS
answer (rebinding). A CIDR rule opens a refused range only where the rule's
network lies entirely inside every refused range that contains the
destination: ``10.1.2.0/24`` opens that /24, ``0.0.0.0/0`` opens nothing.

Publishes
---------
``127.0.0.1:8080:80`` publishes the zone's TCP port 80 on the host's
127.0.0.1:8080; ``8080:80`` means the same; ``[::1]:8080:80`` for IPv6.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

import msgspec

from zoned.errors import InvalidRequest

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Protocol = Literal["tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")

MAX_RULES = 256
MAX_PORT_RANGES = 32
MAX_PUBLISHES = 64
MAX_NAME_LENGTH = 253

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class PortRange(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    first: Port
    last: Port

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


class _RuleBase(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    tag_field="kind",
):
    """What every kind of rule is on the wire: an object tagged by its ``kind``
    (subclasses inherit this config and give their own tag)."""


class NameRule(_RuleBase, frozen=True, tag="name"):
    """TCP to the addresses the zone's resolver answered for a matching name."""

    # Lowercase A-labels without the trailing dot; "*." first for a wildcard.
    pattern: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH + 2)]
    ports: Annotated[list[PortRange], msgspec.Meta(max_length=MAX_PORT_RANGES)] = []

    def __str__(self) -> str:
        return self.pattern + _ports_suffix(self.ports)


class CidrRule(_RuleBase, frozen=True, tag="cidr"):
    """Connections to a network, TCP (proxied) or UDP (forwarded)."""

    network: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ports: Annotated[list[PortRange], msgspec.Meta(max_length=MAX_PORT_RANGES)] = []
    protocol: Protocol = "tcp"

    def __str__(self) -> str:
        net = ipaddress.ip_network(self.network)
        shown = f"[{net}]" if net.version == 6 and self.ports else str(net)
        scheme = "udp://" if self.protocol == "udp" else ""
        return scheme + shown + _ports_suffix(self.ports)


Rule = NameRule | CidrRule


class NetPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A zone's egress policy. The default (no rules, not open) reaches nothing."""

    open: bool = False
    rules: Annotated[list[Rule], msgspec.Meta(max_length=MAX_RULES)] = []

    def describe(self) -> list[str]:
        """The policy in the syntax :func:`parse_policy` reads."""
        return (["open"] if self.open else []) + [str(rule) for rule in self.rules]


class Publish(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A zone's TCP port, listened for on a host address."""

    host_port: Port
    zone_port: Port
    host_address: Annotated[str, msgspec.Meta(max_length=64)] = "127.0.0.1"

    def __str__(self) -> str:
        addr = ipaddress.ip_address(self.host_address)
        shown = f"[{addr}]" if addr.version == 6 else str(addr)
        return f"{shown}:{self.host_port}:{self.zone_port}"


class ZoneNetSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A zone's network as its record keeps it: slot, policy, publishes."""

    zone: str
    slot: int
    policy: NetPolicy
    publishes: list[Publish] = []
    ipv6: bool = True


def _ports_suffix(ports: Sequence[PortRange]) -> str:
    return ":" + ",".join(str(p) for p in ports) if ports else ""


# ---------------------------------------------------------------------------
# Refused ranges
# ---------------------------------------------------------------------------


class RefusedRange(msgspec.Struct, frozen=True):
    network: str
    why: str


def _ranges(*pairs: tuple[str, str]) -> tuple[RefusedRange, ...]:
    return tuple(RefusedRange(net, why) for net, why in pairs)


# Refused unless a CIDR rule names them (see the module docstring). The host
# adds its own addresses, its connected networks and the zone pool.
ALWAYS_REFUSED: tuple[RefusedRange, ...] = _ranges(
    ("0.0.0.0/8", "this-network"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "rfc1918"),
    ("172.16.0.0/12", "rfc1918"),
    ("192.168.0.0/16", "rfc1918"),
    ("100.64.0.0/10", "cgnat"),
    ("169.254.0.0/16", "link-local"),
    ("192.0.0.0/24", "ietf-protocol"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "ipv4-mapped"),
    ("64:ff9b:1::/48", "nat64-local"),
    ("100::/64", "discard"),
    ("2002::/16", "6to4"),
    ("fc00::/7", "ula"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)

# Well-known NAT64 (64:ff9b::/96) and 6to4 carry an IPv4 address: it is
# checked as that IPv4 address too, so they cannot tunnel into 10/8.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped or NAT64 IPv6 address stands for."""
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


# ---------------------------------------------------------------------------
# Parsing (the CLI syntax) and validation (any policy, e.g. off the wire)
# ---------------------------------------------------------------------------

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PORTS = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")


def normalize_name(name: str) -> str:
    """A DNS name as lowercase A-labels without the trailing dot, or InvalidRequest."""
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise InvalidRequest("empty name")
    try:
        ascii_name = text.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise InvalidRequest(f"invalid name {name!r}: {exc}") from None
    if len(ascii_name) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"name {name!r} is longer than {MAX_NAME_LENGTH} characters")
    for label in ascii_name.split("."):
        if not _LABEL.match(label):
            raise InvalidRequest(
                f"invalid name {name!r}: label {label!r} must be 1-63 of a-z, 0-9, '-'"
                " and not start or end with '-'"
            )
    return ascii_name


def _name_pattern(text: str) -> str:
    if text.startswith("*."):
        return "*." + normalize_name(text[2:])
    if "*" in text:
        raise InvalidRequest(f"invalid name {text!r}: '*' may only be the whole first label")
    return normalize_name(text)


def _parse_ports(text: str, rule: str) -> list[PortRange]:
    if not _PORTS.match(text):
        raise InvalidRequest(
            f"invalid ports {text!r} in {rule!r}: expected e.g. 443, 80,443 or 8000-8100"
        )
    ranges = []
    for part in text.split(","):
        first_text, _, last_text = part.partition("-")
        first, last = int(first_text), int(last_text or first_text)
        if not (1 <= first <= last <= 65535):
            raise InvalidRequest(
                f"invalid port range {part!r} in {rule!r}: ports are 1-65535, low-high"
            )
        ranges.append(PortRange(first, last))
    if len(ranges) > MAX_PORT_RANGES:
        raise InvalidRequest(f"too many port ranges in {rule!r} (at most {MAX_PORT_RANGES})")
    return ranges


def _network(text: str, rule: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"invalid network in {rule!r}: {exc}") from None


def _looks_like_address(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def parse_rule(text: str) -> Rule:
    """One rule in the CLI syntax (see the module docstring)."""
    rule = text.strip()
    if not rule:
        raise InvalidRequest("empty network rule")
    body = rule
    protocol: Protocol = "tcp"
    scheme, sep, rest = rule.partition("://")
    if sep:
        if scheme not in PROTOCOLS:
            raise InvalidRequest(
                f"unknown protocol {scheme!r} in {rule!r} (known: {', '.join(PROTOCOLS)})"
            )
        protocol = "udp" if scheme == "udp" else "tcp"
        body = rest
    ports: list[PortRange] = []
    if body.startswith("["):
        inner, bracket, after = body[1:].partition("]")
        if not bracket:
            raise InvalidRequest(f"unclosed '[' in {rule!r}")
        dest = inner
        if after:
            if not after.startswith(":"):
                raise InvalidRequest(f"unexpected {after!r} after ']' in {rule!r}")
            ports = _parse_ports(after[1:], rule)
    elif body.count(":") > 1:
        dest = body  # a bare IPv6 address or network, no ports
    else:
        dest, colon, port_text = body.partition(":")
        if colon:
            ports = _parse_ports(port_text, rule)
    if "/" in dest or _looks_like_address(dest):  # no name has a "/"
        net = _network(dest, rule)
        return validate_rule(CidrRule(network=str(net), ports=ports, protocol=protocol))
    if protocol == "udp":
        raise InvalidRequest(
            f"{rule!r}: UDP is only for CIDR rules (names are TCP through the proxy)"
        )
    return validate_rule(NameRule(pattern=_name_pattern(dest), ports=ports))


def validate_rule(rule: Rule) -> Rule:
    """Check a rule that did not come through the parser (e.g. off the wire)."""
    for ports in rule.ports:
        if ports.first > ports.last:
            raise InvalidRequest(f"invalid port range {ports.first}-{ports.last} in {rule}")
    if isinstance(rule, NameRule):
        if _name_pattern(rule.pattern) != rule.pattern:
            raise InvalidRequest(f"name rule {rule.pattern!r} is not in normal form")
        return rule
    try:
        net = ipaddress.ip_network(rule.network, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"invalid network {rule.network!r}: {exc}") from None
    if str(net) != rule.network:
        raise InvalidRequest(f"network {rule.network!r} is not in normal form ({net})")
    return rule


_PORT_ITEM = re.compile(r"^[0-9]+(-[0-9]+)?\Z")
_PROTOCOL_SUFFIX = re.compile(r"/(tcp|udp)\Z")


def split_net_option(text: str) -> list[str]:
    """``--net`` as typed: rules separated by commas, into one rule per item.

    A comma also separates ports (``pypi.org:80,443``), so an item that is
    only a port or a port range continues the rule before it. A rule may end
    in ``/tcp`` or ``/udp`` (``10.0.0.0/8:443/tcp``, ``203.0.113.5:123/udp``),
    the same as the ``tcp://``/``udp://`` prefix. ``none`` and ``open`` are
    items like the rules. What comes out is what :func:`parse_rule` reads.
    """
    items: list[str] = []
    for piece in text.split(","):
        word = piece.strip()
        if not word:
            raise InvalidRequest(f"empty rule in --net {text!r} (two commas, or one at an end)")
        bare = _PROTOCOL_SUFFIX.sub("", word)
        if items and _PORT_ITEM.match(bare) and ":" in items[-1].split("]")[-1]:
            # More ports of the rule before (its protocol suffix goes to the end).
            previous = items[-1]
            suffix = _PROTOCOL_SUFFIX.search(previous)
            head = _PROTOCOL_SUFFIX.sub("", previous)
            items[-1] = f"{head},{word if suffix is None else bare + suffix.group(0)}"
            continue
        items.append(word)
    rules = []
    for item in items:
        suffix = _PROTOCOL_SUFFIX.search(item)
        if suffix is not None and "://" not in item:
            item = f"{suffix.group(1)}://{item[: suffix.start()]}"
        rules.append(item)
    return rules


def parse_policy(items: Iterable[str]) -> NetPolicy:
    """``--net`` arguments: ``open`` and/or rules; each item may hold several, comma-free."""
    is_open = False
    rules: list[Rule] = []
    for item in items:
        for word in item.split():
            if word == "open":
                is_open = True
            elif word == "none":
                continue
            else:
                rules.append(parse_rule(word))
    return validate_policy(NetPolicy(open=is_open, rules=rules))


def validate_policy(policy: NetPolicy) -> NetPolicy:
    if len(policy.rules) > MAX_RULES:
        raise InvalidRequest(f"too many network rules ({len(policy.rules)}, at most {MAX_RULES})")
    for rule in policy.rules:
        validate_rule(rule)
    return policy


def parse_publish(text: str) -> Publish:
    """``[ADDRESS:]HOST_PORT:ZONE_PORT``, ADDRESS in brackets when IPv6."""
    spec = text.strip()
    address = "127.0.0.1"
    rest = spec
    if spec.startswith("["):
        inner, bracket, after = spec[1:].partition("]")
        if not bracket or not after.startswith(":"):
            raise InvalidRequest(
                f"invalid publish {text!r}: expected [ADDRESS]:HOST_PORT:ZONE_PORT"
            )
        address, rest = inner, after[1:]
    else:
        parts = spec.split(":")
        if len(parts) == 3:
            address, rest = parts[0], f"{parts[1]}:{parts[2]}"
        elif len(parts) != 2:
            raise InvalidRequest(
                f"invalid publish {text!r}: expected [ADDRESS:]HOST_PORT:ZONE_PORT"
            )
    host_text, colon, zone_text = rest.partition(":")
    if not colon or not host_text.isdigit() or not zone_text.isdigit():
        raise InvalidRequest(f"invalid publish {text!r}: ports must be numbers")
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidRequest(
            f"invalid publish {text!r}: {address!r} is not an IP address"
        ) from None
    host_port, zone_port = int(host_text), int(zone_text)
    for port in (host_port, zone_port):
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"invalid publish {text!r}: port {port} is not 1-65535")
    return Publish(host_port=host_port, zone_port=zone_port, host_address=str(addr))


def validate_publishes(publishes: Sequence[Publish]) -> list[Publish]:
    """Reject too many publishes, bad addresses, and two on one host socket.

    A wildcard address (0.0.0.0, ::) overlaps every address of its family on
    the same port.
    """
    if len(publishes) > MAX_PUBLISHES:
        raise InvalidRequest(f"too many publishes ({len(publishes)}, at most {MAX_PUBLISHES})")
    checked: list[tuple[IPAddress, Publish]] = []
    for publish in publishes:
        try:
            addr = ipaddress.ip_address(publish.host_address)
        except ValueError:
            raise InvalidRequest(f"invalid publish address {publish.host_address!r}") from None
        if str(addr) != publish.host_address:
            raise InvalidRequest(f"publish address {publish.host_address!r} is not in normal form")
        if addr.is_multicast:
            raise InvalidRequest(f"cannot publish on multicast address {addr}")
        for other_addr, other in checked:
            if other_addr.version != addr.version or other.host_port != publish.host_port:
                continue
            if other_addr == addr or other_addr.is_unspecified or addr.is_unspecified:
                raise InvalidRequest(f"publishes {other} and {publish} overlap on the host")
        checked.append((addr, publish))
    return list(publishes)


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


class Decision(msgspec.Struct, frozen=True):
    allowed: bool
    # The rule that allowed it, or why it was refused (a refused range's
    # reason, "no-rule", "not-resolved", "sni-mismatch", ...).
    rule: str


# Names whose answers describe the host's own networks rather than the
# internet (reverse lookups, local and split-horizon names): ``open`` does
# not answer them; a name rule must name them.
SPECIAL_USE_SUFFIXES = (
    "arpa",
    "local",
    "localhost",
    "localdomain",
    "internal",
    "lan",
    "home",
    "corp",
)


def is_special_use(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in SPECIAL_USE_SUFFIXES


def name_matches(pattern: str, name: str) -> bool:
    """``name`` (normalized) against an exact or ``*.`` pattern."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def _ports_allow(ports: Sequence[PortRange], port: int) -> bool:
    return not ports or any(port in r for r in ports)


class CompiledPolicy:
    """A policy with its networks parsed, and the refused ranges it is checked against."""

    def __init__(self, policy: NetPolicy, extra_refused: Sequence[RefusedRange] = ()) -> None:
        self.policy = validate_policy(policy)
        self.refused = [
            (ipaddress.ip_network(r.network), r.why) for r in (*ALWAYS_REFUSED, *extra_refused)
        ]
        self.cidr_rules = [
            (ipaddress.ip_network(rule.network), rule)
            for rule in self.policy.rules
            if isinstance(rule, CidrRule)
        ]
        self.name_rules = [rule for rule in self.policy.rules if isinstance(rule, NameRule)]

    def refused_range(self, addr: IPAddress) -> str | None:
        """Why ``addr`` is in a refused range, or None (embedded IPv4 checked too)."""
        for net, why in self.refused:
            if addr.version == net.version and addr in net:
                return why
        inner = embedded_ipv4(addr)
        if inner is not None:
            return self.refused_range(inner)
        return None

    def _opens(self, rule_net: IPNetwork, addr: IPAddress) -> bool:
        """Whether a CIDR rule containing ``addr`` may open the refused ranges around it."""
        containing = [net for net, _ in self.refused if net.version == addr.version and addr in net]
        return (
            all(
                rule_net.version == net.version and rule_net.subnet_of(net)  # type: ignore[arg-type]
                for net in containing
            )
            and embedded_ipv4(addr) is None
        )

    def address_decision(self, addr: IPAddress, port: int, protocol: Protocol) -> Decision | None:
        """A decision by CIDR rules, ``open`` and refused ranges alone.

        None means "no CIDR rule and not open, not refused": a name rule may
        still allow it (see :meth:`name_rule_for`).
        """
        refused = self.refused_range(addr)
        for net, rule in self.cidr_rules:
            if rule.protocol != protocol or addr.version != net.version or addr not in net:
                continue
            if not _ports_allow(rule.ports, port):
                continue
            if refused is None or self._opens(net, addr):
                return Decision(True, str(rule))
        if refused is not None:
            return Decision(False, refused)
        if self.policy.open and protocol == "tcp":
            return Decision(True, "open")
        return None

    def answer_allowed(self, addr: IPAddress) -> Decision:
        """Whether the resolver may hand ``addr`` to the zone (rebinding check)."""
        refused = self.refused_range(addr)
        if refused is None:
            return Decision(True, "public")
        for net, rule in self.cidr_rules:
            if addr.version == net.version and addr in net and self._opens(net, addr):
                return Decision(True, str(rule))
        return Decision(False, refused)

    def name_allowed(self, name: str) -> Decision:
        """Whether the resolver answers ``name`` (normalized) at all."""
        for rule in self.name_rules:
            if name_matches(rule.pattern, name):
                return Decision(True, str(rule))
        if self.policy.open:
            if is_special_use(name):
                return Decision(False, "special-use-name")
            return Decision(True, "open")
        return Decision(False, "name-not-allowed")

    def name_rule_for(self, name: str, port: int) -> Decision:
        """Whether a TCP connection to ``port`` is allowed for ``name``."""
        matched = False
        for rule in self.name_rules:
            if name_matches(rule.pattern, name):
                matched = True
                if _ports_allow(rule.ports, port):
                    return Decision(True, str(rule))
        if self.policy.open:
            return Decision(True, "open")
        return Decision(False, "port-not-allowed" if matched else "name-not-allowed")

    def udp_rules(self) -> list[CidrRule]:
        return [rule for _, rule in self.cidr_rules if rule.protocol == "udp"]
