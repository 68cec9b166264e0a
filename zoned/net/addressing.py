"""A zone's network identity, derived from its slot: names, addresses, MAC.

Pure. Slot ``n`` of a daemon owns the ``n``-th /30 of the IPv4 pool (host
end ``.1``, guest ``.2``) and the ``n``-th /64 of the IPv6 pool (host
``::1``, guest ``::2``), the link ``<link_prefix><n in hex>``, and a locally
administered MAC. The daemon allocates slots (lowest free) and keeps a
zone's slot in its record, so that re-adoption after a restart finds the
same names again.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from typing import Annotated

import msgspec

from zoned.errors import InvalidRequest

IFNAMSIZ = 15  # usable characters of a Linux interface name
LINK_PREFIX_PATTERN = r"^[a-z][a-z0-9]{1,8}\Z"


class NetPools(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where a daemon's zone addresses and link names come from (config)."""

    pool_v4: str = "100.87.0.0/16"
    pool_v6: str = "fd7a:6f6e:6564::/48"
    link_prefix: Annotated[str, msgspec.Meta(pattern=LINK_PREFIX_PATTERN)] = "zn"


class ZoneAddressing(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    slot: int
    ifname: str
    mac: str
    host_v4: str
    guest_v4: str
    prefix_v4: int = 30
    host_v6: str
    guest_v6: str
    prefix_v6: int = 64

    @property
    def netmask_v4(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix_v4}").netmask)


def slot_count(pools: NetPools) -> int:
    """How many zones the pools hold (the smaller of the two, and the link names)."""
    v4 = ipaddress.IPv4Network(pools.pool_v4)
    v6 = ipaddress.IPv6Network(pools.pool_v6)
    by_v4 = 2 ** (30 - v4.prefixlen) if v4.prefixlen <= 30 else 0
    by_v6 = 2 ** min(64 - v6.prefixlen, 24) if v6.prefixlen <= 64 else 0
    hex_digits = IFNAMSIZ - len(pools.link_prefix)
    by_name: int = 16**hex_digits
    return min(by_v4, by_v6, by_name)


def validate_pools(pools: NetPools) -> NetPools:
    try:
        v4 = ipaddress.IPv4Network(pools.pool_v4)
        v6 = ipaddress.IPv6Network(pools.pool_v6)
    except ValueError as exc:
        raise InvalidRequest(f"invalid zone network pool: {exc}") from None
    if v4.prefixlen > 30 or v6.prefixlen > 64:
        raise InvalidRequest("zone network pools must hold at least one /30 and one /64")
    return pools


def zone_addressing(pools: NetPools, slot: int) -> ZoneAddressing:
    if not 0 <= slot < slot_count(pools):
        raise InvalidRequest(f"network slot {slot} is outside the pool ({slot_count(pools)} slots)")
    v4 = ipaddress.IPv4Network(pools.pool_v4)
    v6 = ipaddress.IPv6Network(pools.pool_v6)
    base4 = int(v4.network_address) + 4 * slot
    base6 = int(v6.network_address) + (slot << 64)
    return ZoneAddressing(
        slot=slot,
        ifname=f"{pools.link_prefix}{slot:x}",
        # 0x02: locally administered, unicast; then "zn" and the slot.
        mac=f"02:7a:6e:{(slot >> 16) & 0xFF:02x}:{(slot >> 8) & 0xFF:02x}:{slot & 0xFF:02x}",
        host_v4=str(ipaddress.IPv4Address(base4 + 1)),
        guest_v4=str(ipaddress.IPv4Address(base4 + 2)),
        host_v6=str(ipaddress.IPv6Address(base6 + 1)),
        guest_v6=str(ipaddress.IPv6Address(base6 + 2)),
    )


def lowest_free_slot(pools: NetPools, used: set[int]) -> int:
    for slot in range(slot_count(pools)):
        if slot not in used:
            return slot
    raise InvalidRequest("no free zone network slot: the pools are full")


def kernel_ip_argument(addr: ZoneAddressing, device: str = "eth0") -> str:
    """The guest kernel's ``ip=`` argument (IPv4 up before init; DNS = the host end).

    Format ``ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>``.
    IPv6 the agent configures (the kernel's ``ip=`` is IPv4 only).
    """
    return f"ip={addr.guest_v4}::{addr.host_v4}:{addr.netmask_v4}::{device}:off:{addr.host_v4}"


def resolv_conf(addr: ZoneAddressing) -> str:
    """What the agent writes to the workload root's /etc/resolv.conf."""
    return f"nameserver {addr.host_v4}\noptions edns0 timeout:2 attempts:2\n"


def interface_element(addr: ZoneAddressing, *, mmio: bool) -> ET.Element:
    """The libvirt ``<interface type='ethernet'>`` for a tap zoned made (``managed='no'``)."""
    interface = ET.Element("interface", type="ethernet")
    ET.SubElement(interface, "mac", address=addr.mac)
    ET.SubElement(interface, "target", dev=addr.ifname, managed="no")
    ET.SubElement(interface, "model", type="virtio")
    if mmio:
        ET.SubElement(interface, "address", type="virtio-mmio")
    return interface
