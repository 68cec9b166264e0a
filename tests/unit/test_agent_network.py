"""The agent's side of a zone's network: what it reads off the kernel command
line, and the workload's resolv.conf (never written through a link)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from zoned.agent.network import resolv_conf, set_up_network, write_resolv_conf, zone_network
from zoned.net.addressing import NetPools, kernel_ip_argument, zone_addressing
from zoned.net.addressing import resolv_conf as host_resolv_conf
from zoned.zones import net_kernel_args


def test_the_daemons_arguments_give_the_agent_its_resolver_and_ipv6() -> None:
    addr = zone_addressing(NetPools(), 7)
    net = zone_network("console=ttyS0 " + " ".join(net_kernel_args(addr, True)) + " zoned.zone=a")
    assert net is not None
    assert net.resolver == addr.host_v4
    assert net.ipv6 == (
        socket.inet_pton(socket.AF_INET6, addr.guest_v6),
        64,
        socket.inet_pton(socket.AF_INET6, addr.host_v6),
    )
    # The file the agent writes is the one the host side describes.
    assert resolv_conf(net.resolver) == host_resolv_conf(addr)
    without_v6 = zone_network(" ".join(net_kernel_args(addr, False)))
    assert without_v6 is not None and without_v6.ipv6 is None


@pytest.mark.parametrize(
    "cmdline",
    [
        "console=ttyS0 zoned.zone=a",  # no network at all
        "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",  # no resolver
        "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off:not-an-address",
        "ip=1.2.3.4::5.6.7.8:x::eth0:off:999.1.1.1",
    ],
)
def test_no_resolver_means_no_network_set_up(cmdline: str) -> None:
    assert zone_network(cmdline) is None


def test_a_bad_ipv6_argument_is_ignored() -> None:
    base = kernel_ip_argument(zone_addressing(NetPools(), 0))
    for bad in ("zoned.ip6=zz::1/64,fe80::1", "zoned.ip6=fd00::2/200,fd00::1", "zoned.ip6=fd::2"):
        net = zone_network(f"{base} {bad}")
        assert net is not None and net.ipv6 is None


def test_resolv_conf_replaces_a_link_and_never_writes_through_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    (root / "etc" / "resolv.conf").symlink_to(outside)
    write_resolv_conf(str(root), "100.87.0.1")
    written = root / "etc" / "resolv.conf"
    assert not written.is_symlink()
    assert written.read_text() == resolv_conf("100.87.0.1")
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    assert outside.read_text() == "keep\n"


def test_resolv_conf_refuses_an_etc_that_is_a_link(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "etc").symlink_to(elsewhere)
    with pytest.raises(OSError):
        write_resolv_conf(str(root), "100.87.0.1")
    assert os.listdir(elsewhere) == []


def test_resolv_conf_in_a_root_without_etc(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(kernel_ip_argument(zone_addressing(NetPools(), 2)) + "\n")
    set_up_network(str(tmp_path), str(cmdline))
    assert (tmp_path / "etc" / "resolv.conf").read_text().startswith("nameserver 100.87.0.9\n")
