"""The SDK's network options onto a template's allowance (pure).

A template (``[e2b.templates.NAME] net``) allows a sandbox at most a zoned
network policy (docs/networking.md): an allow-list, ``open``, or nothing
(the default). What the SDK sends only narrows it:

- ``allow_internet_access``: true, the template's policy; false, no
  network. Not sent and no ``network``: no network (zoned's default).
- ``network`` (``allowOut``/``denyOut``, E2B's semantics: allowed entries
  win over denied ones, no ``denyOut`` denies nothing): ``denyOut`` naming
  all traffic (``0.0.0.0/0`` or ``::/0``, or ``allow_internet_access``
  false) makes the policy exactly the ``allowOut`` entries; without a
  ``denyOut`` the policy is the template's. Every ``allowOut`` entry must
  lie inside the template's policy, else nothing is created: an entry never
  widens it (an entry without ports, as E2B writes them, gets the ports the
  template allows it). Other ``denyOut`` entries cannot be said in an allow-list and
  are refused. Without ``allowOut`` and ``denyOut``, ``allow_internet_access``
  alone decides. ``dnsServers`` change nothing (every DNS query of a zone
  goes to its own resolver on the host).

The refused ranges stay refused: a caller's CIDR entry that lies inside one
(which as a rule of its own would open it) is accepted only when a template
CIDR rule covering it lies inside that range too (the template opened it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from zoned.e2b.api import ApiError
from zoned.errors import InvalidRequest
from zoned.net.policy import (
    ALWAYS_REFUSED,
    MAX_RULES,
    CidrRule,
    NameRule,
    NetPolicy,
    PortRange,
    RefusedRange,
    Rule,
    is_special_use,
    parse_policy,
    parse_rule,
)

ALL_TRAFFIC: Final = frozenset({"0.0.0.0/0", "::/0"})
#: ``network`` keys the translation reads (or may ignore); the rest are refused.
_KNOWN: Final = frozenset({"allowOut", "denyOut", "dnsServers"})
#: Keys that say nothing about egress: accepted when absent, false or empty.
_INBOUND: Final = frozenset({"allowPublicTraffic", "httpsPorts"})
MAX_ENTRIES: Final = 256


class NetworkRequest(msgspec.Struct, frozen=True):
    """The SDK's ``network`` object, as far as zoned reads it."""

    allow_out: list[str] | None = msgspec.field(default=None, name="allowOut")
    deny_out: list[str] | None = msgspec.field(default=None, name="denyOut")


def template_policy(net: Sequence[str] | None) -> NetPolicy | None:
    """A template's ``net`` as a policy (None: no network); InvalidRequest if bad."""
    return None if net is None else parse_policy(net)


def _ports_within(inner: Sequence[PortRange], outer: Sequence[PortRange]) -> bool:
    if not outer:
        return True
    if not inner:
        return False
    return all(any(o.first <= r.first and r.last <= o.last for o in outer) for r in inner)


def _pattern_within(inner: str, outer: str) -> bool:
    if inner == outer:
        return True
    if not outer.startswith("*."):
        return False
    base = inner.removeprefix("*.")
    return base.endswith(outer[1:])


def _refused_around(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network, refused: Sequence[RefusedRange]
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The refused ranges a CIDR rule for ``net`` would open (those it lies inside)."""
    around = []
    for entry in refused:
        other = ipaddress.ip_network(entry.network)
        if other.version == net.version and net.subnet_of(other):  # type: ignore[arg-type]
            around.append(other)
    return around


def _narrowed(rule: Rule, template: NetPolicy, refused: Sequence[RefusedRange]) -> list[Rule] | str:
    """``rule`` cut to what ``template`` allows, or why it cannot be.

    An entry without ports under template rules with ports gets their ports
    (E2B's entries name no ports); an entry with ports must lie inside them.
    """
    found: list[Rule] = []
    if isinstance(rule, NameRule):
        for t in template.rules:
            if isinstance(t, NameRule) and _pattern_within(rule.pattern, t.pattern):
                if not rule.ports:
                    found.append(NameRule(pattern=rule.pattern, ports=t.ports))
                elif _ports_within(rule.ports, t.ports):
                    found.append(rule)
        if not found and template.open and not is_special_use(rule.pattern.removeprefix("*.")):
            found.append(rule)
        return found or "the template does not allow that name on those ports"
    net = ipaddress.ip_network(rule.network)
    around = _refused_around(net, refused)
    for t in template.rules:
        if not isinstance(t, CidrRule) or t.protocol != rule.protocol:
            continue
        outer = ipaddress.ip_network(t.network)
        if outer.version != net.version or not net.subnet_of(outer):  # type: ignore[arg-type]
            continue
        if not all(outer.subnet_of(r) for r in around):  # type: ignore[arg-type]
            continue
        if not rule.ports:
            found.append(CidrRule(network=rule.network, ports=t.ports, protocol=rule.protocol))
        elif _ports_within(rule.ports, t.ports):
            found.append(rule)
    if found:
        return found
    if around:
        return f"it lies in the refused range {around[0]}, which the template does not open"
    if template.open and rule.protocol == "tcp":
        return [rule]
    return "the template does not allow that network, protocol or port"


def _entry_rule(entry: object) -> Rule:
    if not isinstance(entry, str):
        raise ApiError(400, f"network.allowOut: {entry!r} is not a string")
    try:
        return parse_rule(entry)
    except InvalidRequest as exc:
        raise ApiError(400, f"network.allowOut entry {entry[:260]!r}: {exc.message}") from None


def _refuse_unsupported(network: dict[str, Any]) -> None:
    for key, value in network.items():
        if key in _KNOWN or value is None:
            continue
        if key in _INBOUND and not value:
            continue
        raise ApiError(400, f"network.{key[:64]} is not supported by zoned's E2B endpoint")


def sandbox_policy(
    template_name: str,
    template: NetPolicy | None,
    allow_internet_access: bool | None,
    network: dict[str, Any] | None,
    extra_refused: Sequence[RefusedRange] = (),
) -> NetPolicy | None:
    """The policy a new sandbox gets (None: no network), or ApiError(400) and nothing made.

    ``extra_refused``: the host's own refused ranges (its addresses and
    networks, the zone pool) beside :data:`ALWAYS_REFUSED`.
    """
    refused = (*ALWAYS_REFUSED, *extra_refused)
    egress = network is not None and any(
        network.get(key) is not None for key in ("allowOut", "denyOut")
    )
    if network is not None:
        _refuse_unsupported(network)
    if network is None or not egress:
        if not allow_internet_access:
            return None
        if template is None:
            raise ApiError(
                400,
                f"template {template_name!r} allows no network: internet access is refused"
                " (the host's [e2b.templates] net setting)",
            )
        return template
    try:
        request = msgspec.convert(network, NetworkRequest)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid network: {exc}") from None
    allow, deny = request.allow_out or [], request.deny_out or []
    if len(allow) > MAX_ENTRIES or len(deny) > MAX_ENTRIES:
        raise ApiError(400, f"at most {MAX_ENTRIES} network.allowOut and denyOut entries")
    rules = [_entry_rule(entry) for entry in allow]
    deny_all = allow_internet_access is False or any(entry in ALL_TRAFFIC for entry in deny)
    if deny and not deny_all:
        raise ApiError(
            400,
            "network.denyOut: only all traffic (0.0.0.0/0) can be denied: zoned's policy is an"
            " allow-list; name what the sandbox may reach in allowOut",
        )
    if not rules and deny_all:
        return None
    if template is None:
        raise ApiError(
            400,
            f"template {template_name!r} allows no network: network.allowOut is refused"
            " (the host's [e2b.templates] net setting)",
        )
    narrowed: list[Rule] = []
    for entry, rule in zip(allow, rules, strict=True):
        cut = _narrowed(rule, template, refused)
        if isinstance(cut, str):
            raise ApiError(
                400,
                f"network.allowOut entry {entry[:260]!r} is outside what template"
                f" {template_name!r} allows ({', '.join(template.describe()) or 'nothing'}):"
                f" {cut}",
            )
        narrowed += [r for r in cut if r not in narrowed]
    if not deny_all:
        return template
    if len(narrowed) > MAX_RULES:
        raise ApiError(400, f"network.allowOut makes more than {MAX_RULES} rules")
    return NetPolicy(rules=narrowed)
