"""Our nftables table, rendered from typed values: a pure function, golden-tested.

One table per daemon (``inet <table>``) holds every rule zoned has; it is
replaced whole, in one ``nft -f`` transaction (create, delete, define), so a
reader never sees half a ruleset and a change takes effect at once. Rules
are keyed by the zones' link names, so re-rendering after a restart finds
the same chains. Nothing else on the host is touched: other tables keep
their own verdicts (an ``accept`` here does not override a ``drop`` there;
a ``drop`` here is final).

Per zone (chains ``<link>_*``):

- ``raw``: source addresses other than the zone's own are dropped (spoofing);
  IPv6 dropped when the zone has none.
- ``nat`` (prerouting): DNS (UDP and TCP port 53, to any address) goes to
  the zone's resolver, every other TCP connection to the zone's proxy, by
  DNAT to the host end of the link (so the proxy reads the original
  destination with ``SO_ORIGINAL_DST``).
- ``in`` (input): only those two redirected flows, replies to the host's
  own connections (publishes), and IPv6 neighbour discovery. Router
  advertisements, pings, UDP to anything else: dropped and counted.
- ``fwd`` (forward): only UDP the policy names by CIDR and port; replies
  back in; everything else dropped. Masqueraded on the way out. The bytes
  go to the named counters ``<link>_udp_out`` / ``<link>_udp_in`` (the
  table is rewritten on every change: the host shell reads them first).
- ``out`` (output): to the zone only the helper's own publish connections,
  replies, and neighbour discovery.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import msgspec

from zoned.net.addressing import ZoneAddressing
from zoned.net.policy import CidrRule, PortRange

ND_TYPES = "{ nd-neighbor-solicit, nd-neighbor-advert }"


class ZoneFilter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    addressing: ZoneAddressing
    proxy_port: int
    dns_port: int
    helper_uid: int
    ipv6: bool = True
    udp_rules: list[CidrRule] = []
    publish_ports: list[int] = []


def _ports(ports: Sequence[PortRange]) -> str:
    items = [str(p.first) if p.first == p.last else f"{p.first}-{p.last}" for p in ports]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _zone_chains(zone: ZoneFilter) -> list[str]:
    a = zone.addressing
    link = a.ifname
    h4, g4, h6, g6 = a.host_v4, a.guest_v4, a.host_v6, a.guest_v6
    lines = [f"\tchain {link}_raw {{"]
    lines.append(f"\t\tip saddr != {g4} counter drop")
    if zone.ipv6:
        lines.append(f"\t\tip6 saddr != {{ {g6}, fe80::/10 }} counter drop")
    else:
        lines.append("\t\tmeta nfproto ipv6 counter drop")
    lines.append("\t}")

    lines.append(f"\tchain {link}_nat {{")
    lines.append(
        "\t\tmeta nfproto ipv4 meta l4proto { tcp, udp } th dport 53"
        f" dnat ip to {h4}:{zone.dns_port}"
    )
    lines.append(f"\t\tmeta nfproto ipv4 meta l4proto tcp dnat ip to {h4}:{zone.proxy_port}")
    if zone.ipv6:
        lines.append(
            "\t\tmeta nfproto ipv6 meta l4proto { tcp, udp } th dport 53"
            f" dnat ip6 to [{h6}]:{zone.dns_port}"
        )
        lines.append(f"\t\tmeta nfproto ipv6 meta l4proto tcp dnat ip6 to [{h6}]:{zone.proxy_port}")
    lines.append("\t}")

    lines.append(f"\tchain {link}_in {{")
    lines.append(f"\t\ticmpv6 type {ND_TYPES} accept")
    lines.append("\t\tct state established,related accept")
    ports = f"{{ {zone.dns_port}, {zone.proxy_port} }}"
    lines.append(f"\t\tct status dnat ip daddr {h4} meta l4proto tcp th dport {ports} accept")
    lines.append(f"\t\tct status dnat ip daddr {h4} udp dport {zone.dns_port} accept")
    if zone.ipv6:
        lines.append(f"\t\tct status dnat ip6 daddr {h6} meta l4proto tcp th dport {ports} accept")
        lines.append(f"\t\tct status dnat ip6 daddr {h6} udp dport {zone.dns_port} accept")
    lines.append("\t\tcounter drop")
    lines.append("\t}")

    lines.append(f"\tchain {link}_fwd {{")
    for rule in zone.udp_rules:
        net = ipaddress.ip_network(rule.network)
        if net.version == 6 and not zone.ipv6:
            continue
        family = "ip" if net.version == 4 else "ip6"
        port_match = f" udp dport {_ports(rule.ports)}" if rule.ports else " meta l4proto udp"
        lines.append(f'\t\t{family} daddr {net}{port_match} counter name "{link}_udp_out" accept')
    lines.append("\t\tcounter drop")
    lines.append("\t}")

    lines.append(f"\tchain {link}_back {{")
    lines.append(f'\t\tct state established,related counter name "{link}_udp_in" accept')
    lines.append("\t\tcounter drop")
    lines.append("\t}")

    lines.append(f"\tchain {link}_out {{")
    lines.append(f"\t\ticmpv6 type {ND_TYPES} accept")
    lines.append("\t\tct state established,related accept")
    if zone.publish_ports:
        published = "{ " + ", ".join(str(p) for p in sorted(set(zone.publish_ports))) + " }"
        lines.append(
            f"\t\tmeta skuid {zone.helper_uid} ip saddr {h4} ip daddr {g4}"
            f" tcp dport {published} accept"
        )
    lines.append("\t\tcounter drop")
    lines.append("\t}")
    return lines


def _dispatch(
    name: str, hook: str, priority: str, key: str, suffix: str, zones: Sequence[ZoneFilter]
) -> list[str]:
    lines = [f"\tchain {name} {{", f"\t\ttype {hook} priority {priority}; policy accept;"]
    if zones:
        entries = ", ".join(
            f"{_quote(z.addressing.ifname)} : jump {z.addressing.ifname}_{suffix}" for z in zones
        )
        lines.append(f"\t\t{key} vmap {{ {entries} }}")
    lines.append("\t}")
    return lines


def render_table(table: str, owner: str, zones: Sequence[ZoneFilter]) -> str:
    """The whole ``nft -f`` script that (re)defines our table atomically."""
    ordered = sorted(zones, key=lambda z: z.addressing.slot)
    out = [
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        f"\tcomment {_quote('zoned ' + owner)}",
    ]
    for zone in ordered:
        link = zone.addressing.ifname
        out += [f"\tcounter {link}_udp_out {{ }}", f"\tcounter {link}_udp_in {{ }}"]
    for zone in ordered:
        out += _zone_chains(zone)
    out += _dispatch("raw", "filter hook prerouting", "raw", "iifname", "raw", ordered)
    out += _dispatch("nat", "nat hook prerouting", "dstnat", "iifname", "nat", ordered)
    out += _dispatch("input", "filter hook input", "filter", "iifname", "in", ordered)
    out += _dispatch("forward_out", "filter hook forward", "filter", "iifname", "fwd", ordered)
    out += _dispatch(
        "forward_back", "filter hook forward", "filter + 1", "oifname", "back", ordered
    )
    out += _dispatch("output", "filter hook output", "filter", "oifname", "out", ordered)
    masquerade = [z for z in ordered if z.udp_rules]
    out += [
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
    ]
    if masquerade:
        links = ", ".join(_quote(z.addressing.ifname) for z in masquerade)
        out.append(f"\t\tiifname {{ {links} }} meta l4proto udp masquerade")
    out += ["\t}", "}", ""]
    return "\n".join(out)


def render_delete(table: str) -> str:
    """Remove our table whether or not it exists (one transaction)."""
    return f"table inet {table}\ndelete table inet {table}\n"
