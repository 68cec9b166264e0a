"""Zone networks through the whole daemon, on libvirt's test driver: what a
create, a policy change and a destroy do to the host's links, rules and
helpers, and every refusal changing nothing.

The links, nftables table and helper processes here are real (in the host's
namespace, under the test daemon's own prefix and table); only QEMU is the
test driver's. tests/integration/test_zone_net.py sends real traffic from
real zones.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.exposition import series
from tests.service.conftest import fake_zone_images, service_config
from tests.service.test_hostile_agent import fake_agent, sends
from tests.service.test_observability import http
from zoned.client import Client
from zoned.daemon import Daemon
from zoned.errors import Conflict, InvalidRequest, NotFound
from zoned.localdaemon import private_net_config


def links(daemon: Daemon) -> dict[str, Any]:
    """The daemon's zone links on the host, by name, with their details."""
    found = json.loads(
        subprocess.run(
            ["ip", "-d", "-j", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    prefix = daemon.config.net_link_prefix
    return {link["ifname"]: link for link in found if link["ifname"].startswith(prefix)}


GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def table_exists(daemon: Daemon) -> bool:
    return (
        subprocess.run(
            ["nft", "list", "table", "inet", daemon.config.net_table], capture_output=True
        ).returncode
        == 0
    )


def helper_pidfiles(daemon: Daemon) -> list[Path]:
    return sorted((Path(daemon.config.runtime_dir) / "net").glob("*.pid"))


def assert_nothing_left(daemon: Daemon) -> None:
    assert links(daemon) == {}
    assert not table_exists(daemon)
    assert helper_pidfiles(daemon) == []


async def test_bad_networks_are_refused_and_change_nothing(daemon: Daemon) -> None:
    async with Client(daemon.config.socket_path, client_name="test") as client:
        for options, match in (
            ({"net": "pypi.org:99999"}, "invalid port"),
            ({"net": ["ftp://pypi.org"]}, "unknown protocol"),
            ({"net": "udp://pypi.org:53"}, "only for CIDR rules"),
            ({"net": "10.0.0.0/33"}, "invalid network"),
            ({"publishes": ["127.0.0.1:8080:80", "8080:81"]}, "overlap"),
            ({"publishes": ["localhost:8080:80"]}, "not an IP address"),
        ):
            with pytest.raises(InvalidRequest, match=match):
                await client.create_zone("bad", **options)
        with pytest.raises(InvalidRequest, match="ip="):
            await client.create_zone("bad", kernel_args=["ip=10.0.0.2::10.0.0.1:255.0.0.0"])
        assert await client.list_zones() == []
        with pytest.raises(NotFound):
            await client.set_zone_net("nosuch", "open")
    assert_nothing_left(daemon)


async def test_a_networked_zone_from_create_to_destroy(daemon: Daemon) -> None:
    runtime = Path(daemon.config.runtime_dir) / "zones"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    taken_port = taken.getsockname()[1]
    async with trio.open_nursery() as agents:
        for name in ("web", "plain"):
            await agents.start(fake_agent, runtime / name / "agent.sock", sends(b""))
        async with Client(daemon.config.socket_path, client_name="test") as client:
            zone = await client.create_zone("web", net="allowed.test:443,*.cdn.test")
            assert zone.state == "ready"
            assert zone.net == ["allowed.test:443", "*.cdn.test"]
            assert zone.net_status == "up"
            assert zone.net_address.startswith(daemon.config.net_pool_v4.rsplit(".", 1)[0])
            assert zone.net_address6
            (name, link), *_ = links(daemon).items()
            info = link["linkinfo"]["info_data"]
            # The tap belongs to the zone's QEMU, nobody else's.
            assert (info["type"], info["user"], info["group"]) == (
                "tap",
                zone.qemu_uid,
                zone.qemu_gid,
            )
            assert table_exists(daemon)
            assert len(helper_pidfiles(daemon)) == 1
            metrics = await client.zone_metrics("web")
            assert metrics.net is not None and metrics.net.status == "up"

            # A zone without network has no NIC and cannot get one later.
            plain = await client.create_zone("plain")
            assert (plain.net, plain.net_status, plain.net_address) == (None, None, "")
            assert (await client.zone_metrics("plain")).net is None
            with pytest.raises(Conflict, match="without a network"):
                await client.set_zone_net("plain", "open")

            # Bad changes change nothing.
            with pytest.raises(InvalidRequest):
                await client.set_zone_net("web", "bad..name")
            with pytest.raises(Conflict, match="already taken"):
                await client.set_zone_net("web", publishes=[f"127.0.0.1:{taken_port}:80"])
            assert (await client.get_zone("web")).net == ["allowed.test:443", "*.cdn.test"]
            assert (await client.get_zone("web")).publishes == []

            # A good one is in force and recorded.
            changed, closed = await client.set_zone_net(
                "web", "open", publishes=[f"127.0.0.1:{taken_port + 1}:80"]
            )
            assert (changed.net, changed.publishes, closed) == (
                ["open"],
                [f"127.0.0.1:{taken_port + 1}:80"],
                0,
            )
            record = json.loads(Path(daemon.config.state_dir, "zones", "web.json").read_text())
            assert record["network"]["policy"] == {"open": True}
            with pytest.raises(OSError):
                socket.create_server(("127.0.0.1", taken_port + 1))  # the zone publishes it
            nothing, _ = await client.set_zone_net("web", "none", publishes=[])
            assert (nothing.net, nothing.publishes) == ([], [])

            for name in ("web", "plain"):
                await client.destroy_zone(name)
        agents.cancel_scope.cancel()
    taken.close()
    assert_nothing_left(daemon)


def bindable(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


async def test_quarantine_cuts_a_networked_zone_and_its_record_keeps_the_network(
    observed: Daemon,
) -> None:
    daemon = observed
    runtime = Path(daemon.config.runtime_dir) / "zones"
    port = free_port()
    publish = f"127.0.0.1:{port}:80"
    async with trio.open_nursery() as agents:
        await agents.start(fake_agent, runtime / "web" / "agent.sock", sends(b""))
        async with Client(daemon.config.socket_path, client_name="test") as client:
            await client.create_zone("web", net="allowed.test:443", publishes=[publish])
            assert not bindable(port)  # the zone publishes it
            status, body = await http(daemon, GET_METRICS)
            assert status == 200
            found = series(body)
            for name in (
                "zoned_zone_network_transmit_bytes_total",
                "zoned_zone_network_receive_bytes_total",
            ):
                assert [labels["zone"] for labels, _ in found[name]] == ["web"], found[name]

            reply = await client.quarantine_zone("web")
            assert reply.zone.state == "quarantined"
            # Cut: no publish (its host port is free again), no rule...
            assert bindable(port)
            assert daemon.manager is not None
            nethost = daemon.manager.nethost
            spec = nethost.spec("web")
            assert (spec.policy.rules, spec.policy.open, spec.publishes) == ([], False, [])
            # ...while the record and the evidence keep what the zone was allowed.
            zone = await client.get_zone("web")
            assert (zone.net, zone.publishes) == (["allowed.test:443"], [publish])
            record = json.loads(Path(daemon.config.state_dir, "zones", "web.json").read_text())
            assert record["network"]["publishes"] == [
                {"host_address": "127.0.0.1", "host_port": port, "zone_port": 80}
            ], record["network"]
            kept = json.loads((Path(reply.bundle.path) / "zone.json").read_text())
            assert kept["network"]["policy"] == record["network"]["policy"], kept
            # It stays cut: nobody opens a quarantined zone's network again.
            with pytest.raises(Conflict, match="quarantined"):
                await client.set_zone_net("web", "open")
            assert nethost.spec("web").policy.rules == []
            metrics = await client.zone_metrics("web")
            assert metrics.net is not None and metrics.net.connections_active == 0

            await client.destroy_zone("web")
        agents.cancel_scope.cancel()
    assert_nothing_left(daemon)


async def test_a_create_refused_for_want_of_a_network_slot_holds_nothing(
    short_tmp: Path,
) -> None:
    # One slot: the private /24 cut to a /30.
    pool_v4 = str(private_net_config(short_tmp)["net_pool_v4"]).replace("/24", "/30")
    config = service_config(short_tmp, net_pool_v4=pool_v4)
    runtime = Path(config.runtime_dir) / "zones"
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(Daemon(config, zone_images=fake_zone_images).run)
        async with trio.open_nursery() as agents:
            for name in ("web", "late"):
                await agents.start(fake_agent, runtime / name / "agent.sock", sends(b""))
            async with Client(config.socket_path, client_name="test") as client:
                await client.create_zone("web", net="open")
                with pytest.raises(InvalidRequest, match="no free zone network slot"):
                    await client.create_zone("late", net="open")
                # Its placement, QEMU uid and image went with it: the name is free.
                late = await client.create_zone("late")
                assert late.state == "ready"
                for name in ("web", "late"):
                    await client.destroy_zone(name)
            agents.cancel_scope.cancel()
        assert_nothing_left(daemon)
        nursery.cancel_scope.cancel()
