"""Zone addressing and our nftables table (golden files); the table is checked by nft itself
in tests/integration/test_net_rules_apply.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.goldenfiles import assert_matches_golden
from zoned.errors import InvalidRequest
from zoned.net.addressing import (
    NetPools,
    interface_element,
    kernel_ip_argument,
    lowest_free_slot,
    resolv_conf,
    slot_count,
    validate_pools,
    zone_addressing,
)
from zoned.net.nftrules import ZoneFilter, render_delete, render_table
from zoned.net.policy import CompiledPolicy, parse_policy


def two_zones() -> list[ZoneFilter]:
    pools = NetPools()
    udp = CompiledPolicy(
        parse_policy(
            ["pypi.org:443", "udp://203.0.113.5:123", "udp://[2001:db8::/32]:53,1000-2000"]
        )
    )
    return [
        ZoneFilter(
            addressing=zone_addressing(pools, 1),
            proxy_port=15001,
            dns_port=15053,
            helper_uid=0x7A6E0001,
            ipv6=False,
        ),
        ZoneFilter(
            addressing=zone_addressing(pools, 0),
            proxy_port=15001,
            dns_port=15053,
            helper_uid=0x7A6E0000,
            udp_rules=udp.udp_rules(),
            publish_ports=[8000, 80, 80],
        ),
    ]


@pytest.mark.parametrize(("name", "zones"), [("net-empty", []), ("net-two-zones", two_zones())])
def test_golden_tables(name: str, zones: list[ZoneFilter]) -> None:
    rendered = render_table("zoned", "zoned-", zones)
    assert_matches_golden(rendered, f"{name}.nft")


def test_render_is_deterministic_and_ordered_by_slot() -> None:
    zones = two_zones()
    assert render_table("t", "o", zones) == render_table("t", "o", list(reversed(zones)))
    text = render_table("t", "o", zones)
    assert text.index("chain zn0_raw") < text.index("chain zn1_raw")
    assert render_delete("t") == "table inet t\ndelete table inet t\n"


def test_owner_is_quoted() -> None:
    assert 'comment "zoned a\\"b"' in render_table("t", 'a"b', [])


def test_addressing_by_slot() -> None:
    pools = NetPools()
    a = zone_addressing(pools, 0)
    assert (a.ifname, a.host_v4, a.guest_v4, a.host_v6, a.guest_v6, a.mac) == (
        "zn0",
        "100.87.0.1",
        "100.87.0.2",
        "fd7a:6f6e:6564::1",
        "fd7a:6f6e:6564::2",
        "02:7a:6e:00:00:00",
    )
    b = zone_addressing(pools, 0x1234)
    assert (b.ifname, b.host_v4, b.guest_v6, b.mac) == (
        "zn1234",
        "100.87.72.209",
        "fd7a:6f6e:6564:1234::2",
        "02:7a:6e:00:12:34",
    )
    assert slot_count(pools) == 16384
    with pytest.raises(InvalidRequest, match="outside the pool"):
        zone_addressing(pools, 16384)
    assert lowest_free_slot(pools, {0, 1, 3}) == 2
    with pytest.raises(InvalidRequest, match="pools are full"):
        lowest_free_slot(NetPools(pool_v4="100.87.0.0/30"), {0})
    with pytest.raises(InvalidRequest, match="at least one"):
        validate_pools(NetPools(pool_v4="100.87.0.0/31"))
    with pytest.raises(InvalidRequest, match="invalid zone network pool"):
        validate_pools(NetPools(pool_v4="100.87.0.1/16"))


def test_guest_side_interface() -> None:
    a = zone_addressing(NetPools(), 2)
    assert (
        kernel_ip_argument(a) == "ip=100.87.0.10::100.87.0.9:255.255.255.252::eth0:off:100.87.0.9"
    )
    assert resolv_conf(a).startswith("nameserver 100.87.0.9\n")
    element = interface_element(a, mmio=True)
    assert ET.tostring(element).decode() == (
        '<interface type="ethernet"><mac address="02:7a:6e:00:00:02" />'
        '<target dev="zn2" managed="no" /><model type="virtio" />'
        '<address type="virtio-mmio" /></interface>'
    )
    assert interface_element(a, mmio=False).find("address") is None
