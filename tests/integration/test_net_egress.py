"""Zone networks against a test internet in namespaces: allow-lists, pinning, SNI, rebinding,
isolation, runtime policy changes, publishes, failing closed, and leaving nothing behind.

The zones here are namespaces at the far end of a veth that plays the tap
(rules keyed by the link name behave the same); tests/integration/
test_net_qemu.py runs a real guest kernel on a real tap.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import trio

from tests.integration.networld import (
    DNS,
    UDP_ECHO_PORT,
    WEB_A,
    WEB_A6,
    WEB_B,
    World,
    network_world,
    running_nethost,
    sh,
    wait_tcp,
)
from zoned.errors import Conflict, InvalidRequest, NotFound
from zoned.net.host import NetEvent, NetHost
from zoned.net.policy import ZoneNetSpec, parse_policy, parse_publish

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with network_world(tmp_path_factory.mktemp("networld")) as w:
        yield w


def spec(zone: str, slot: int, *rules: str, publishes: tuple[str, ...] = ()) -> ZoneNetSpec:
    return ZoneNetSpec(
        zone=zone,
        slot=slot,
        policy=parse_policy(list(rules)),
        publishes=[parse_publish(p) for p in publishes],
    )


async def create(
    world: World, nethost: NetHost, zone_index: int, *rules: str, **kw: tuple[str, ...]
) -> str:
    ns = world.zones[zone_index]
    addr = await nethost.create(spec(f"z{zone_index}", zone_index, *rules, **kw), standin_netns=ns)
    world.write_resolv_conf(ns, addr.host_v4)
    return ns


def drain(nethost: NetHost) -> list[NetEvent]:
    events = []
    while True:
        try:
            events.append(nethost.events.receive_nowait())
        except trio.WouldBlock:
            return events


def refused(events: list[NetEvent]) -> list[tuple[str, str, str]]:
    return [
        (e.refused.kind, e.refused.destination, e.refused.rule)
        for e in events
        if e.refused is not None
    ]


async def run_in(world: World, zone: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: world.in_zone(zone, argv))


async def curl(world: World, zone: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: world.curl(zone, url, *extra))


async def settle(nethost: NetHost) -> None:
    """Fresh counters from every zone's helper, and every event they sent before them."""
    for zone in nethost.zones():
        await nethost.read_counters(zone)


@contextlib.asynccontextmanager
async def http_server(namespace: str, port: int, reach: str, bind: str = "") -> AsyncIterator[None]:
    """Python's http.server in ``namespace`` on ``port`` (on every address unless
    ``bind``), entered once it accepts on ``reach``; killed on leaving."""
    argv = ["ip", "netns", "exec", namespace, sys.executable, "-m", "http.server", str(port)]
    server = subprocess.Popen(
        argv + (["--bind", bind] if bind else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await trio.to_thread.run_sync(
            lambda: wait_tcp(["ip", "netns", "exec", namespace], reach, port)
        )
        yield
    finally:
        server.kill()
        server.wait()


URLLIB = (
    "import ssl, sys, urllib.request\n"
    "ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
    "print(urllib.request.urlopen(sys.argv[1], timeout=8, context=ctx).read().decode(), end='')\n"
)


async def test_allowed_names_work_through_curl_and_urllib(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "allowed.test:80,443", "*.cdn.test:443")
        got = await curl(world, zone, "https://allowed.test/path", "-4")
        assert got.returncode == 0, got.stderr
        assert got.stdout == f"{WEB_A} allowed.test /path\n"
        got = await curl(world, zone, "http://allowed.test/plain", "-4")
        assert got.stdout == f"{WEB_A} allowed.test /plain\n", got.stderr
        got = await curl(world, zone, "https://allowed.test/v6", "-6")
        assert got.stdout == f"{WEB_A6} allowed.test /v6\n", got.stderr
        got = await run_in(
            world, zone, [sys.executable, "-c", URLLIB, "https://files.cdn.test/x", str(world.ca)]
        )
        assert got.stdout == f"{WEB_B} files.cdn.test /x\n", got.stderr
        # A CNAME to an allowed name pins the name asked for and the chain.
        got = await curl(world, zone, "https://alias.test/")
        assert got.returncode != 0  # alias.test itself is not allowed: refused at DNS
        await settle(nethost)
        counters = nethost.counters("z0")
        assert counters.connections_allowed == 4
        assert counters.dns_answered >= 3
        assert counters.bytes_in > 0 and counters.bytes_out > 0


SERVER_FIRST = """
import socket
with socket.create_connection(("allowed.test", 2222), timeout=5) as s:
    banner = s.recv(100)
    s.sendall(b"SSH-2.0-zone\\r\\n")
    print(banner.decode().strip(), s.recv(100).decode().strip())
"""


async def test_server_first_protocols_pass_on_the_pin(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "allowed.test:2222")
        got = await run_in(world, zone, [sys.executable, "-c", SERVER_FIRST])
        assert got.stdout.strip() == "SSH-2.0-world SSH-2.0-zone", got.stderr


async def test_names_off_the_list_fail_and_show_as_events(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "allowed.test:443")
        got = await curl(world, zone, "https://blocked.test/")
        assert got.returncode == 6, got.stderr  # could not resolve host
        # The address learned elsewhere: refused, not pinned for this zone.
        got = await curl(world, zone, f"https://{WEB_B}/")
        assert got.returncode != 0
        # An allowed name on a port the rule does not name.
        got = await curl(world, zone, "http://allowed.test/", "-4")
        assert got.returncode != 0
        await settle(nethost)
        events = refused(drain(nethost))
        assert ("dns", "blocked.test", "name-not-allowed") in events
        assert ("connect", WEB_B, "not-resolved") in events
        assert ("connect", WEB_A, "port-not-allowed") in events
        assert nethost.counters("z0").dns_refused >= 1


async def test_other_sni_or_host_to_an_allowed_address_is_refused(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "allowed.test:80,443")
        assert (await curl(world, zone, "https://allowed.test/")).returncode == 0
        # other.test is served by the same address, which is pinned for allowed.test.
        got = await curl(world, zone, "https://other.test/", "--resolve", f"other.test:443:{WEB_A}")
        assert got.returncode != 0
        got = await curl(world, zone, "http://allowed.test/", "-4", "-H", "Host: other.test")
        assert got.returncode != 0
        # No SNI at all (clients send none for an address in the URL): refused too.
        got = await curl(world, zone, f"https://{WEB_A}/", "-k")
        assert got.returncode != 0
        await settle(nethost)
        events = refused(drain(nethost))
        assert ("sni", WEB_A, "sni-not-allowed") in events
        assert ("sni", WEB_A, "host-not-allowed") in events
        assert ("sni", WEB_A, "no-name") in events


async def test_dns_answers_into_refused_ranges_are_not_passed_on(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "rebind.test", "mixed.test", "meta.test")
        lookup = (
            "import socket, sys\n"
            "try:\n"
            "    found = socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)\n"
            "    print(sorted({a[4][0] for a in found}))\n"
            "except socket.gaierror as e:\n"
            "    print('error', e.errno)\n"
        )
        got = await run_in(world, zone, [sys.executable, "-c", lookup, "rebind.test"])
        assert got.stdout.startswith("error"), got.stdout
        got = await run_in(world, zone, [sys.executable, "-c", lookup, "meta.test"])
        assert got.stdout.startswith("error"), got.stdout
        got = await run_in(world, zone, [sys.executable, "-c", lookup, "mixed.test"])
        assert got.stdout.strip() == f"['{WEB_B}']", got.stdout
        await settle(nethost)
        events = refused(drain(nethost))
        assert ("rebinding", "192.168.7.7", "rfc1918") in events
        assert ("rebinding", "169.254.169.254", "link-local") in events


async def test_host_and_other_zones_are_unreachable(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone_a = await create(world, nethost, 0, "open")
        zone_b = await create(world, nethost, 1, "open")
        b = nethost.addressing("z1")
        a = nethost.addressing("z0")
        # Something listening in zone b and on the host, on every address.
        async with (
            http_server(zone_b, 8000, b.guest_v4),
            http_server(world.host, 8001, "198.18.0.1"),
        ):
            # open reaches the internet...
            assert (await curl(world, zone_a, "https://other.test/")).returncode == 0
            # ...but not the other zone, the host's addresses or its own gateway.
            for url in (
                f"http://{b.guest_v4}:8000/",
                "http://198.18.0.1:8001/",
                f"http://{a.host_v4}:8001/",
                f"http://[{a.host_v6}]:8001/",
                "http://127.0.0.1:8001/",
            ):
                got = await curl(world, zone_a, url, "--max-time", "3")
                assert got.returncode != 0, url
            # UDP to the host is dropped (only DNS is redirected).
            udp = (
                "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "s.settimeout(1); "
                f"s.sendto(b'x', ('{a.host_v4}', 15001)); s.recv(10)"
            )
            got = await run_in(world, zone_a, [sys.executable, "-c", udp])
            assert "timed out" in got.stderr
            await settle(nethost)
            events = refused(drain(nethost))
            assert ("connect", b.guest_v4, "cgnat") in events
            assert ("connect", "198.18.0.1", "host-network") in events


async def test_policy_changes_take_effect_at_once(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "allowed.test:443")
        assert (await curl(world, zone, "https://allowed.test/")).returncode == 0
        assert (await curl(world, zone, "https://blocked.test/")).returncode != 0
        await nethost.update_policy("z0", parse_policy(["blocked.test:443"]))
        assert (await curl(world, zone, "https://blocked.test/")).returncode == 0
        assert (await curl(world, zone, "https://allowed.test/")).returncode != 0
        # An open connection the new policy refuses is closed.
        slow = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                zone,
                "curl",
                "-sS",
                "--cacert",
                str(world.ca),
                "--limit-rate",
                "100K",
                "-o",
                "/dev/null",
                "https://blocked.test/bytes/100000000",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with trio.fail_after(20):  # the download under way, the earlier ones gone
                while True:
                    now = await nethost.read_counters("z0")
                    if now.bytes_in >= 200_000 and now.connections_active == 1:
                        break
                    await trio.sleep(0.1)
            closed = await nethost.update_policy("z0", parse_policy(["allowed.test:443"]))
            assert closed == 1
            _, err = await trio.to_thread.run_sync(lambda: slow.communicate(timeout=15))
            assert slow.returncode != 0, err
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
        with pytest.raises(NotFound):
            await nethost.update_policy("nope", parse_policy([]))


async def test_udp_only_where_a_cidr_rule_allows_it(world: World) -> None:
    async with running_nethost(world) as nethost:
        await create(world, nethost, 0, "allowed.test:443")
        udp_rule = parse_policy([f"udp://{DNS}:{UDP_ECHO_PORT}"])
        with pytest.raises(InvalidRequest, match="ip_forward=1"):
            await nethost.update_policy("z0", udp_rule)
        assert nethost.spec("z0").policy == parse_policy(["allowed.test:443"])
    sh(["ip", "netns", "exec", world.host, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    try:
        async with running_nethost(world) as nethost:
            zone = await create(world, nethost, 0, "allowed.test:443")
            probe = (
                "import socket, sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "s.settimeout(2); "
                f"s.sendto(b'ping', ('{DNS}', {UDP_ECHO_PORT}))\n"
                "try:\n    print(s.recv(10).decode())\nexcept OSError as e:\n    print('no answer')"
            )
            assert (
                await run_in(world, zone, [sys.executable, "-c", probe])
            ).stdout.strip() == "no answer"
            await nethost.update_policy("z0", parse_policy([f"udp://{DNS}:{UDP_ECHO_PORT}"]))
            before = await nethost.read_counters("z0")
            assert (
                await run_in(world, zone, [sys.executable, "-c", probe])
            ).stdout.strip() == "ping"
            after = await nethost.read_counters("z0")
            # 4 bytes of payload each way, counted with their IP and UDP headers.
            assert after.bytes_out - before.bytes_out == 32
            assert after.bytes_in - before.bytes_in == 32
            # A rewrite of the table (another policy change) keeps the count.
            both = parse_policy([f"udp://{DNS}:{UDP_ECHO_PORT}", "open"])
            await nethost.update_policy("z0", both)
            assert (await nethost.read_counters("z0")).bytes_out == after.bytes_out
            # QUIC (UDP 443) to an allowed name is not forwarded.
            quic = probe.replace(str(UDP_ECHO_PORT), "443").replace(DNS, WEB_A)
            assert (
                await run_in(world, zone, [sys.executable, "-c", quic])
            ).stdout.strip() == "no answer"
    finally:
        sh(["ip", "netns", "exec", world.host, "sysctl", "-qw", "net.ipv4.ip_forward=0"])


def host_http_status(world: World, port: int) -> subprocess.CompletedProcess[str]:
    """GET / on the stand-in host's loopback; stdout is the HTTP status."""
    url = f"http://127.0.0.1:{port}/"
    argv = ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", url]
    return sh(["ip", "netns", "exec", world.host, *argv], check=False)


async def test_published_port_answers_on_host_loopback(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, publishes=("127.0.0.1:18080:8000",))
        addr = nethost.addressing("z0")
        async with http_server(zone, 8000, addr.guest_v4, bind=addr.guest_v4):
            host = ["ip", "netns", "exec", world.host]
            got = host_http_status(world, 18080)
            assert got.stdout == "200", got.stderr
            # The same host port again: a clear conflict, nothing changed.
            with pytest.raises(Conflict, match="already taken"):
                await nethost.create(
                    spec("z1", 1, publishes=("127.0.0.1:18080:80",)), standin_netns=world.zones[1]
                )
            assert nethost.zones() == ["z0"]
            # Move it to another port at runtime.
            await nethost.update_publishes("z0", [parse_publish("127.0.0.1:18081:8000")])
            got = host_http_status(world, 18081)
            assert got.stdout == "200", got.stderr
            got = sh(
                [*host, "curl", "-sS", "--max-time", "3", "http://127.0.0.1:18080/"], check=False
            )
            assert got.returncode == 7  # nothing listens there any more


async def test_helper_death_fails_closed_and_is_restored(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "allowed.test:443")
        assert (await curl(world, zone, "https://allowed.test/")).returncode == 0
        pidfile = next(Path(world.config().runtime_dir).glob("*.pid"))
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGSTOP)  # hung: nothing may flow while it is
        try:
            got = await curl(world, zone, "https://allowed.test/", "--max-time", "2")
            assert got.returncode != 0
        finally:
            os.kill(pid, signal.SIGKILL)
        with trio.fail_after(20):
            while True:
                kinds = [e.kind for e in drain(nethost)]
                if "helper_restored" in kinds:
                    break
                await trio.sleep(0.2)
        assert nethost.status("z0") == "up"
        # The new helper knows what the old one pinned: no lookup needed.
        got = await curl(
            world, zone, "https://allowed.test/", "--resolve", f"allowed.test:443:{WEB_A}"
        )
        assert got.returncode == 0, got.stderr
        assert (await curl(world, zone, "https://allowed.test/")).returncode == 0


GARBAGE = """
import os, random, socket
random.seed(14)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(300):
    u.sendto(os.urandom(random.randint(0, 1500)), ("198.51.100.53", 53))
heads = (
    b"\\x16\\x03\\x01\\xff\\xff",
    b"GET / HTTP/1.1\\r\\nHost: a\\x00b\\r\\n\\r\\n",
    b"\\x16\\x03",
)
for head in heads:
    for port in (443, 80, 53):
        try:
            with socket.create_connection(("198.51.100.10", port), timeout=2) as s:
                s.sendall(head + os.urandom(3000))
                s.settimeout(2)
                s.recv(100)
        except OSError:
            pass
print("sent")
"""


async def test_garbage_and_spoofed_sources_hurt_nobody(world: World) -> None:
    async with running_nethost(world) as nethost:
        zone = await create(world, nethost, 0, "allowed.test:80,443")
        assert (await curl(world, zone, "https://allowed.test/")).returncode == 0
        got = await run_in(world, zone, [sys.executable, "-c", GARBAGE])
        assert got.stdout.strip() == "sent", got.stderr
        # A second address in the zone: its packets are dropped as spoofed.
        peer = "zg" + nethost.addressing("z0").ifname
        sh(["ip", "-n", zone, "addr", "add", "100.87.9.9/32", "dev", peer])
        spoof = (
            "import socket; s = socket.socket(); s.settimeout(3); s.bind(('100.87.9.9', 0))\n"
            f"s.connect(('{WEB_A}', 443)); print('connected')"
        )
        got = await run_in(world, zone, [sys.executable, "-c", spoof])
        assert "connected" not in got.stdout and "timed out" in got.stderr, got
        assert nethost.status("z0") == "up"
        # The new helper knows what the old one pinned: no lookup needed.
        got = await curl(
            world, zone, "https://allowed.test/", "--resolve", f"allowed.test:443:{WEB_A}"
        )
        assert got.returncode == 0, got.stderr
        assert (await curl(world, zone, "https://allowed.test/")).returncode == 0
        await settle(nethost)
        assert nethost.counters("z0").dns_dropped > 0
        assert "helper_down" not in [e.kind for e in drain(nethost)]  # settled above
        raw = sh(
            [
                "ip",
                "netns",
                "exec",
                world.host,
                "nft",
                "list",
                "chain",
                "inet",
                "zonedtest",
                "zt0_raw",
            ]
        )
        assert "counter packets 0 " not in raw.stdout.splitlines()[2], raw.stdout


FLOOD = """
import socket, sys, time
host, count = sys.argv[1], int(sys.argv[2])
host = socket.getaddrinfo(host, 443, socket.AF_INET)[0][4][0]
held = []
for _ in range(count):
    try:
        held.append(socket.create_connection((host, 443), timeout=3))
    except OSError:
        pass
q = bytes.fromhex("abcd01000001000000000000") + b"\\x07allowed\\x04test\\x00\\x00\\x01\\x00\\x01"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3000):
    u.sendto(q, ("100.87.0.1", 53))
print(len(held))
"""


async def test_a_flooding_zone_hurts_only_itself(world: World) -> None:
    from zoned.net.wire import Limits

    limits = Limits(max_connections=32, connect_rate=1000, dns_rate=20, event_rate=5)
    async with running_nethost(world, limits=limits) as nethost:
        zone_a = await create(world, nethost, 0, "allowed.test:443")
        zone_b = await create(world, nethost, 1, "allowed.test:443")
        flood = subprocess.Popen(
            ["ip", "netns", "exec", zone_a, sys.executable, "-c", FLOOD, "allowed.test", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            got = await curl(world, zone_b, "https://allowed.test/")
            assert got.returncode == 0, got.stderr
            await trio.to_thread.run_sync(lambda: flood.communicate(timeout=60))
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        for _ in range(3):
            got = await curl(world, zone_b, "https://allowed.test/")
            assert got.returncode == 0, got.stderr
        await settle(nethost)
        a, b = nethost.counters("z0"), nethost.counters("z1")
        assert a.connections_refused > 0 and a.dns_dropped > 0, a
        assert a.events_suppressed > 0, a
        assert b.connections_refused == 0 and b.dns_dropped == 0, b
        assert "connection-limit" in {rule for _, _, rule in refused(drain(nethost))}


async def test_a_zone_tap_for_qemu_and_its_removal(world: World) -> None:
    import json

    async with running_nethost(world, tap_uid=3_100_000_123, tap_gid=3_100_000_124) as nethost:
        addr = await nethost.create(spec("tapzone", 5, "allowed.test:443"))
        host = ["ip", "-n", world.host]
        (link,) = json.loads(sh([*host, "-j", "-d", "addr", "show", "dev", addr.ifname]).stdout)
        info = link["linkinfo"]["info_data"]
        assert (link["linkinfo"]["info_kind"], info["type"]) == ("tun", "tap")
        assert (info["user"], info["group"], info["vnet_hdr"]) == (
            3_100_000_123,
            3_100_000_124,
            True,
        )
        assert link["ifalias"] == f"zoned:{world.config().owner}:tapzone"
        assert {
            (a["local"], a["prefixlen"]) for a in link["addr_info"] if a["scope"] == "global"
        } == {
            (addr.host_v4, 30),
            (addr.host_v6, 64),
        }
        sysctl = ["ip", "netns", "exec", world.host, "sysctl", "-n"]
        assert sh([*sysctl, f"net.ipv6.conf.{addr.ifname}.accept_ra"]).stdout.strip() == "0"
        assert sh([*sysctl, f"net.ipv4.conf.{addr.ifname}.accept_redirects"]).stdout.strip() == "0"
        await nethost.remove("tapzone")
        assert sh([*host, "link", "show", "dev", addr.ifname], check=False).returncode != 0
        with pytest.raises(NotFound):
            await nethost.remove("tapzone")


OWNER = """
import sys, trio
from zoned.net.host import NetHost, NetHostConfig
from zoned.net.policy import ZoneNetSpec
import msgspec
config = msgspec.json.decode(sys.argv[1].encode(), type=NetHostConfig)
spec = msgspec.json.decode(sys.argv[2].encode(), type=ZoneNetSpec)
async def main():
    host = NetHost(config)
    async with trio.open_nursery() as n:
        await n.start(host.run)
        await host.create(spec, standin_netns=sys.argv[3])
        print("ready", flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


async def start_owner(world: World, zone_spec: ZoneNetSpec) -> subprocess.Popen[bytes]:
    """Another process that owns a zone network (to be killed); returns once it is up."""
    # The owner runs in the stand-in host itself with netns=None, as zoned
    # runs on a host: its helpers are spawned without "ip netns exec".
    owner = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            world.host,
            sys.executable,
            "-c",
            OWNER,
            msgspec.json.encode(world.config(netns=None)).decode(),
            msgspec.json.encode(zone_spec).decode(),
            world.zones[0],
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert owner.stdout is not None
    line = await trio.to_thread.run_sync(owner.stdout.readline)
    if line.strip() != b"ready":
        owner.kill()
        owner.wait()
        raise AssertionError(f"the owner process did not come up: {line!r}")
    return owner


async def test_kill_9_of_the_owner_then_adopt_or_reclaim(world: World) -> None:
    config = world.config()
    zone_spec = spec("z0", 0, "allowed.test:443")
    owner = await start_owner(world, zone_spec)
    try:
        world.write_resolv_conf(world.zones[0], "100.87.0.1")
        assert (await curl(world, world.zones[0], "https://allowed.test/")).returncode == 0
        pid = int(next(Path(config.runtime_dir).glob("*.pid")).read_text().split()[0])
    finally:
        owner.kill()
        owner.wait()
    # The helper follows its owner (SIGKILL on parent death); link, rules and pid file stay.
    with trio.fail_after(10):
        while os.path.exists(f"/proc/{pid}"):
            await trio.sleep(0.05)
    assert any(item.startswith("link zt0") for item in world.leftovers())
    got = await curl(world, world.zones[0], "https://blocked.test/", "--max-time", "3")
    assert got.returncode != 0  # rules still there, no helper: closed, not open
    async with running_nethost(world) as nethost:
        # Adopt with the record's spec: enforced again.
        await nethost.adopt(zone_spec)
        assert (await curl(world, world.zones[0], "https://allowed.test/")).returncode == 0
        assert (await curl(world, world.zones[0], "https://blocked.test/")).returncode != 0
        assert await nethost.reclaim() == []
    # running_nethost checked that shutdown removed everything.


async def test_reclaim_without_a_record_removes_everything(world: World) -> None:
    config = world.config()
    owner = await start_owner(world, spec("z0", 0, "open"))
    try:
        pidfile = next(Path(config.runtime_dir).glob("*.pid"))
        # Keep the helper alive past its owner to check the pid-file kill:
        # stop the owner (SIGSTOP), so PDEATHSIG has not fired yet.
        os.kill(owner.pid, signal.SIGSTOP)
        async with running_nethost(world) as nethost:
            removed = await nethost.reclaim()
            assert sorted(r.split()[0] for r in removed) == ["helper", "link", "table"]
            assert not pidfile.exists()
    finally:
        owner.kill()
        owner.wait()
