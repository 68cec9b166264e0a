"""Real zones on the network their creator asked for, against the tests' own internet.

One private zoned, one internet (namespaces joined to the host: web servers
with a test CA, DNS for their names; tests/integration/networld.py), three
zones shared by every test, in this order:

- ``zn-quiet``: no network (no NIC at all);
- ``zn-web``: ``allowed.test:80,443``, ``rebind.test``, ``mixed.test``, and
  its port 8000 published on the host's loopback;
- ``zn-open``: ``open`` (the internet, never the host's networks), on the
  built-in root (busybox + Python); the others run the default image
  (Debian bookworm with python3).

Programs in the zones are ordinary ones (Python's urllib and ssl, busybox
wget); the policy is enforced on the host only. The module ends by
quarantining a fourth, networked zone (``zn-frozen``: its network cut, its
record kept), killing zoned with -9 and restarting it (the policies still
hold, the quarantined zone still cut), crashing a zone's QEMU, and
destroying everything: no link, table or helper may stay.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import domain_name, private_zoned, qemu_pid
from tests.integration.networld import HostInternet, internet_on_host
from tests.waiting import wait_until_async
from tests.zonectl_run import ZONECTL
from zoned import protocol as p
from zoned.client import Client
from zoned.errors import Conflict, InvalidRequest
from zoned.localdaemon import LocalDaemon, http_get, private_net_config

pytestmark = pytest.mark.integration

QUIET, WEB, OPEN, FROZEN = "zn-quiet", "zn-web", "zn-open", "zn-frozen"
WEB_POLICY = ["allowed.test:80,443", "rebind.test", "mixed.test"]
CALL_TIMEOUT_S = 180.0
CA_PATH = "/tmp/test-ca.pem"


@dataclass
class NetWorld:
    daemon: LocalDaemon
    internet: HostInternet
    publish_port: int
    frozen_port: int
    link_prefix: str = ""
    table: str = ""

    def __post_init__(self) -> None:
        config = private_net_config(self.daemon.root)
        self.link_prefix, self.table = str(config["net_link_prefix"]), str(config["net_table"])

    def links(self) -> list[str]:
        return self.internet.leftovers(self.link_prefix, self.table)

    def leftovers(self) -> list[str]:
        """Links, the table, helper processes of the daemon's zone networks."""
        found = self.links()
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"-mzoned.net.helper" in argv and str(self.daemon.root).encode() in b" ".join(
                    argv
                ):
                    found.append(f"helper process {proc.name}")
        return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetWorld]:
    with internet_on_host(tmp_path_factory.mktemp("internet")) as internet:
        root = Path(tempfile.mkdtemp(prefix="zoned-", dir="/tmp"))
        extra = "\n".join(
            [
                f'net_upstream_dns = ["{internet.dns}"]',
                # Generous: the host's CPUs are shared, zones run under TCG.
                "agent_silence_s = 120.0",
                "metrics_enabled = true",
                f'metrics_listen = "{root / "metrics.sock"}"',
                f'evidence_dir = "{root / "evidence"}"',
            ]
        )
        with private_zoned("zn-", root, extra_config=extra) as daemon:
            net = NetWorld(daemon, internet, free_port(), free_port())
            try:
                trio.run(create_zones, net)
                yield net
            finally:
                trio.run(destroy_zones, net)
            left = net.leftovers()
            assert left == [], f"zone networking left behind after destroy: {left}"
        # The daemon stopped with no zone: nothing of its networks stays.
        assert net.leftovers() == []


async def create_zones(net: NetWorld) -> None:
    async with Client(net.daemon.socket, client_name="it") as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            await client.create_zone(QUIET)
            publish = f"127.0.0.1:{net.publish_port}:8000"
            await client.create_zone(WEB, net=WEB_POLICY, publishes=[publish])
            # The built-in root (busybox's wget); the others run the default image.
            await client.create_zone(OPEN, net="open", image="builtin")
            ca = net.internet.ca.read_bytes()
            for zone in (WEB, OPEN):
                await client.put_file(zone, CA_PATH, ca)


async def destroy_zones(net: NetWorld) -> None:
    async with Client(net.daemon.socket, client_name="it") as client:
        for zone in await client.list_zones():
            with trio.fail_after(CALL_TIMEOUT_S):
                await client.destroy_zone(zone.name)


@contextlib.asynccontextmanager
async def connect(net: NetWorld) -> AsyncIterator[Client]:
    async with Client(net.daemon.socket, client_name="it") as client:
        yield client


@contextlib.asynccontextmanager
async def refusals(net: NetWorld, zone: str) -> AsyncIterator[list[p.Event]]:
    """The zone's network events while the block runs."""
    seen: list[p.Event] = []
    async with connect(net) as client, trio.open_nursery() as nursery:
        ready = trio.Event()

        async def collect() -> None:
            events = client.watch_events([zone], ["net_refused", "net_status"])
            async with contextlib.aclosing(events) as stream:
                ready.set()
                async for event in stream:
                    seen.append(event)

        nursery.start_soon(collect)
        await ready.wait()
        await client.host_info()  # the watch is registered once this answers
        yield seen
        nursery.cancel_scope.cancel()


async def wait_for_refusal(events: list[p.Event], kind: str, what: str) -> p.NetRefusal:
    def found() -> p.NetRefusal | None:
        for event in events:
            r = event.refused
            if r is not None and r.kind == kind and what in (r.destination, r.name):
                return r
        return None

    await wait_until_async(lambda: found() is not None, f"a {kind} refusal of {what}")
    refusal = found()
    assert refusal is not None
    return refusal


async def python(client: Client, zone: str, code: str, *args: str) -> dict[str, object]:
    """Run ``code`` with python3 in ``zone``; it prints one JSON object."""
    with trio.fail_after(CALL_TIMEOUT_S):
        result = await client.exec(zone, ["python3", "-c", code, *args])
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    answer = json.loads(result.stdout)
    assert isinstance(answer, dict)
    return answer


# Each attempt: "ok <what it got>" or the error's name and text.
TRY = """
import json, socket, ssl, sys, time, urllib.error, urllib.request
def attempt(fn):
    try:
        return "ok " + str(fn())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
def get(url, timeout=10):
    ctx = ssl.create_default_context(cafile="/tmp/test-ca.pem")
    return urllib.request.urlopen(url, timeout=timeout, context=ctx).read().decode().strip()
def get_once_up(url, tries=60):
    # A server just started in the zone: refused until it listens (bounded).
    for _ in range(tries - 1):
        try:
            return get(url)
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
            time.sleep(0.5)
    return get(url)
def resolve(name):
    return sorted({i[4][0] for i in socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)})
def read_all(conn):
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    if not data:
        raise ConnectionError("closed without a byte")
    return data.decode(errors="replace")
def request(name):
    return f"GET /talk HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n".encode()
def tls(address, name):
    ctx = ssl.create_default_context(cafile="/tmp/test-ca.pem")
    ctx.check_hostname = False
    with socket.create_connection((address, 443), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as conn:
            conn.sendall(request(name))
            return read_all(conn).splitlines()[-1]
def connect(address, port, name="allowed.test"):
    # Through the proxy a refused connection is accepted, then closed unanswered.
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(request(name))
        return read_all(conn).splitlines()[0]
def echo(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.create_server((host, 0), family=family)
    with socket.create_connection(server.getsockname()[:2], timeout=5) as client:
        conn, _ = server.accept()
        conn.sendall(b"pong")
        return client.recv(4).decode()
"""


def program(*lines: str) -> str:
    return TRY + "\nprint(json.dumps({" + ", ".join(lines) + "}))\n"


async def test_a_zone_without_network_has_no_nic_and_reaches_nothing(world: NetWorld) -> None:
    code = program(
        '"links": sorted(n for _, n in socket.if_nameindex())',
        f'"out": attempt(lambda: connect("{world.internet.web_a}", 80))',
        '"dns": attempt(lambda: resolve("allowed.test"))',
    )
    async with connect(world) as client:
        quiet = await python(client, QUIET, code)
        info = await client.get_zone(QUIET)
        web = await python(client, WEB, code)
    assert quiet["links"] == ["lo"], quiet
    assert str(quiet["out"]).startswith("OSError"), quiet  # no route: there is no NIC
    assert not str(quiet["dns"]).startswith("ok"), quiet
    assert (info.net, info.net_address, info.publishes) == (None, "", [])
    assert web["links"] == ["eth0", "lo"], web


async def test_loopback_works_in_every_zone_networked_or_not(world: NetWorld) -> None:
    code = program('"v4": attempt(lambda: echo("127.0.0.1"))', '"v6": attempt(lambda: echo("::1"))')
    async with connect(world) as client:
        for zone in (QUIET, WEB):
            answer = await python(client, zone, code)
            assert (answer["v4"], answer["v6"]) == ("ok pong", "ok pong"), (zone, answer)


async def test_allowed_names_work_through_urllib_pip_like_fetches_and_wget(
    world: NetWorld,
) -> None:
    web_a = world.internet.web_a
    # pip's way: the index page, then the file it names, over HTTPS.
    code = program(
        '"https": attempt(lambda: get("https://allowed.test/simple/pkg/"))',
        '"wheel": attempt(lambda: len(get("https://allowed.test/bytes/300000")))',
        '"http": attempt(lambda: get("http://allowed.test/plain"))',
        '"resolv": open("/etc/resolv.conf").read()',
        '"v6": open("/proc/net/if_inet6").read()',
    )
    async with connect(world) as client:
        answer = await python(client, WEB, code)
        zone = await client.get_zone(WEB)
        wget = await client.exec(OPEN, ["wget", "-q", "-O", "-", "http://allowed.test/wget"])
    assert answer["https"] == f"ok {web_a} allowed.test /simple/pkg/", answer
    assert answer["wheel"] == "ok 300000", answer
    assert answer["http"] == f"ok {web_a} allowed.test /plain", answer
    resolver = zone.net_address.rsplit(".", 1)[0] + "." + str(int(zone.net_address[-1]) - 1)
    assert str(answer["resolv"]).startswith(f"nameserver {resolver}\n"), answer
    # The agent gave the zone its IPv6 address.
    assert ipaddress.ip_address(zone.net_address6).exploded.replace(":", "") in str(answer["v6"]), (
        answer
    )
    assert (wget.returncode, wget.stdout.decode()) == (0, f"{web_a} allowed.test /wget\n"), wget


async def refused_in_web(
    world: NetWorld, code: str, *expected: tuple[str, str]
) -> tuple[dict[str, object], list[p.NetRefusal]]:
    """Runs ``code`` (a program()) in the web zone; its answer and, waited for,
    the refusals it causes: one for each (kind, what) of ``expected``."""
    async with refusals(world, WEB) as events, connect(world) as client:
        answer = await python(client, WEB, code)
        found = [await wait_for_refusal(events, kind, what) for kind, what in expected]
    return answer, found


async def test_names_off_the_list_fail_and_show_as_refused_events(world: NetWorld) -> None:
    code = program(
        '"blocked": attempt(lambda: get("https://blocked.test/"))',
        '"port": attempt(lambda: connect("allowed.test", 8443))',
    )
    answer, (dns, port) = await refused_in_web(
        world, code, ("dns", "blocked.test"), ("connect", world.internet.web_a)
    )
    # The resolver says the name does not exist: the client fails at once.
    assert str(answer["blocked"]).startswith("URLError"), answer
    assert dns.rule == "name-not-allowed", dns
    assert not str(answer["port"]).startswith("ok"), answer
    assert (port.port, port.rule) == (8443, "port-not-allowed"), port


async def test_another_sni_or_a_direct_address_is_refused(world: NetWorld) -> None:
    web_a, web_b = world.internet.web_a, world.internet.web_b
    code = program(
        '"pinned": attempt(lambda: resolve("allowed.test"))',
        f'"right": attempt(lambda: tls("{web_a}", "allowed.test"))',
        f'"other_sni": attempt(lambda: tls("{web_a}", "other.test"))',
        f'"direct": attempt(lambda: connect("{web_b}", 443))',
    )
    answer, (sni, direct) = await refused_in_web(
        world, code, ("sni", "other.test"), ("connect", web_b)
    )
    assert web_a in str(answer["pinned"]), answer
    assert answer["right"] == f"ok {web_a} allowed.test /talk", answer
    assert not str(answer["other_sni"]).startswith("ok"), answer
    assert not str(answer["direct"]).startswith("ok"), answer
    assert (sni.destination, sni.port) == (web_a, 443), sni
    assert direct.port == 443, direct


async def test_dns_answers_into_refused_ranges_are_not_passed_on(world: NetWorld) -> None:
    code = program(
        '"rebind": attempt(lambda: resolve("rebind.test"))',
        '"mixed": attempt(lambda: resolve("mixed.test"))',
    )
    answer, (rebinding,) = await refused_in_web(world, code, ("rebinding", "rebind.test"))
    assert str(answer["rebind"]).startswith("gaierror"), answer
    assert answer["mixed"] == f"ok {[world.internet.web_b]}", answer
    assert rebinding.rule == "rfc1918", rebinding


def host_addresses() -> list[str]:
    """The host's own global addresses (none of them a zone's target)."""
    found = []
    for link in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True).stdout):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global" and not link["ifname"].startswith("zt"):
                found.append(info["local"])
    return found


async def test_the_host_and_other_zones_are_unreachable(world: NetWorld) -> None:
    async with connect(world) as client:
        web, open_zone = await client.get_zone(WEB), await client.get_zone(OPEN)
        host_end = web.net_address.rsplit(".", 1)[0] + "." + str(int(web.net_address[-1]) - 1)
        targets = [host_end, *host_addresses()[:3], open_zone.net_address]
        lines = [f'"{t}": attempt(lambda: connect("{t}", 8000))' for t in targets]
        async with client.exec_process(OPEN, ["python3", "-m", "http.server", "8000"]) as server:
            loopback = await python(
                client,
                OPEN,
                program('"self": attempt(lambda: get_once_up("http://127.0.0.1:8000/")[:15])'),
            )
            async with refusals(world, WEB) as events:
                answer = await python(client, WEB, program(*lines))
                await wait_for_refusal(events, "connect", open_zone.net_address)
            back = await python(
                client, OPEN, program(f'"web": attempt(lambda: connect("{web.net_address}", 22))')
            )
            await server.signal(signal.SIGTERM)
    assert str(loopback["self"]).startswith("ok <!DOCTYPE"), loopback
    for target in targets:
        assert not str(answer[target]).startswith("ok"), (target, answer)
    assert not str(back["web"]).startswith("ok"), back


async def wait_until_published(url: str, what: str) -> None:
    """Until ``url`` on the host serves a zone's /etc (``http.server`` in the zone)."""

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    async def answered() -> bool:
        try:
            return "resolv.conf" in await trio.to_thread.run_sync(fetch)
        except OSError:
            return False  # the server in the zone is still starting

    await wait_until_async(answered, f"{what} on {url}")


async def test_a_published_port_answers_on_the_host(world: NetWorld) -> None:
    url = f"http://127.0.0.1:{world.publish_port}/"
    async with connect(world) as client:
        argv = ["python3", "-m", "http.server", "8000", "--directory", "/etc"]
        async with client.exec_process(WEB, argv) as server:
            await wait_until_published(url, "the zone's port 8000")
            await server.signal(signal.SIGTERM)
        assert (await client.get_zone(WEB)).publishes == [f"127.0.0.1:{world.publish_port}:8000"]


HOLD = """
import socket, sys
c = socket.create_connection(("allowed.test", 80), timeout=30)
c.sendall(b"GET /hold HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n")
c.recv(4096)
print("up", flush=True)
try:
    print("closed" if c.recv(1) == b"" else "data", flush=True)
except OSError as exc:
    print("closed", exc, flush=True)
"""


async def test_a_policy_change_takes_effect_at_once(world: NetWorld) -> None:
    code = program(
        '"allowed": attempt(lambda: get("https://allowed.test/"))',
        '"blocked": attempt(lambda: get("https://blocked.test/"))',
    )
    async with connect(world) as client:
        async with client.exec_process(WEB, ["python3", "-c", HOLD]) as holder:
            lines = aiter(holder)
            first = await anext(lines)
            assert first.data.strip() == b"up", first
            zone, closed = await client.set_zone_net(WEB, "blocked.test:443")
            assert (zone.net, closed) == (["blocked.test:443"], 1)
            second = await anext(lines)
            assert second.data.startswith(b"closed"), second
        changed = await python(client, WEB, code)
        with pytest.raises(InvalidRequest, match="invalid"):
            await client.set_zone_net(WEB, "blocked.test:70000")
        zone, _ = await client.set_zone_net(WEB, WEB_POLICY)
        restored = await python(client, WEB, code)
    assert changed["blocked"] == f"ok {world.internet.web_b} blocked.test /", changed
    assert not str(changed["allowed"]).startswith("ok"), changed
    assert zone.net == WEB_POLICY
    assert str(restored["allowed"]).startswith("ok"), restored
    assert not str(restored["blocked"]).startswith("ok"), restored


def zonectl(world: NetWorld, *args: str) -> str:
    env = {**os.environ, "ZONED_SOCKET": str(world.daemon.socket)}
    proc = subprocess.run(
        [*ZONECTL, *args], capture_output=True, text=True, env=env, timeout=CALL_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_counters_in_metrics_show_and_top(world: NetWorld) -> None:
    async with connect(world) as client:
        metrics = await client.zone_metrics(WEB)
        quiet = await client.zone_metrics(QUIET)
    net = metrics.net
    assert net is not None and net.status == "up"
    assert net.connections_allowed >= 4 and net.connections_refused >= 2, net
    assert net.dns_answered >= 3 and net.dns_refused >= 1, net
    assert net.bytes_in > 300000 and net.bytes_out > 0, net
    assert quiet.net is None
    # The same figures on the metrics endpoint (the helper's last report).
    status, body = await trio.to_thread.run_sync(http_get, world.daemon.root / "metrics.sock")
    assert status == 200, body
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = sample.labels.get("result", "")
            found.setdefault(sample.name, {})[f"{sample.labels.get('zone')}/{key}"] = sample.value
    assert found["zoned_zone_network_receive_bytes_total"][f"{WEB}/"] >= net.bytes_in, found
    assert found["zoned_zone_network_transmit_bytes_total"][f"{WEB}/"] >= net.bytes_out, found
    connections = found["zoned_zone_network_connections_total"]
    assert connections[f"{WEB}/allowed"] >= net.connections_allowed, connections
    assert found["zoned_zone_dns_queries_total"][f"{WEB}/refused"] >= net.dns_refused, found
    # libvirt's view of the zone's NIC; a zone without network has neither.
    assert found["zoned_zone_interface_receive_bytes_total"][f"{WEB}/"] > 0, found
    for name in (
        "zoned_zone_network_receive_bytes_total",
        "zoned_zone_interface_receive_bytes_total",
    ):
        assert f"{QUIET}/" not in found[name], found[name]
    show = await trio.to_thread.run_sync(zonectl, world, "show", WEB)
    assert "allowed:       allowed.test:80,443, rebind.test, mixed.test" in show, show
    assert "connections:" in show and "refused" in show, show
    top = await trio.to_thread.run_sync(zonectl, world, "top", "--once", "--interval", "0.1")
    assert "NET OUT" in top and "CONN OK/NO" in top, top


FETCH = """
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        print(urllib.request.urlopen(url, timeout=10).read().decode().strip())
    except Exception as exc:
        print("refused", type(exc).__name__)
"""


async def test_zonectl_run_net_and_net_set(world: NetWorld) -> None:
    web_a = world.internet.web_a
    urls = ["http://allowed.test/run", "http://blocked.test/run"]
    # run: a zone of its own with the network asked for, gone afterwards.
    ran = await trio.to_thread.run_sync(
        lambda: zonectl(
            world, "run", "--net", "allowed.test:80", "--", "python3", "-c", FETCH, *urls
        )
    )
    assert ran.splitlines() == [f"{web_a} allowed.test /run", "refused URLError"], ran
    # net set and net show on a running zone, as a user types them.
    shown = await trio.to_thread.run_sync(
        lambda: zonectl(world, "net", "set", WEB, ",".join([*WEB_POLICY, "blocked.test:80"]))
    )
    assert "blocked.test:80" in shown, shown
    async with connect(world) as client:
        answer = await client.exec(WEB, ["python3", "-c", FETCH, *urls])
        zone, _ = await client.set_zone_net(WEB, WEB_POLICY)
    assert answer.stdout.decode().splitlines() == [
        f"{web_a} allowed.test /run",
        f"{world.internet.web_b} blocked.test /run",
    ], answer
    assert zone.net == WEB_POLICY
    show = await trio.to_thread.run_sync(lambda: zonectl(world, "net", "show", WEB))
    assert "connections:" in show and "blocked.test" not in show, show
    assert {z.name for z in await list_zones(world)} == {QUIET, WEB, OPEN}


async def list_zones(world: NetWorld) -> list[p.ZoneInfo]:
    async with connect(world) as client:
        return await client.list_zones()


async def test_a_killed_helper_is_restored_and_never_fails_open(world: NetWorld) -> None:
    code = program(
        '"allowed": attempt(lambda: get("https://allowed.test/restored"))',
        '"blocked": attempt(lambda: get("https://blocked.test/"))',
    )
    async with connect(world) as client:
        zone = await client.get_zone(WEB)
        addresses = {z.net_address: z.name for z in await client.list_zones() if z.net_address}
        pidfiles = list((world.daemon.root / "run" / "net").glob("*.pid"))
        pids = {
            path: int(path.read_text().split()[0])
            for path in pidfiles
            if path.read_text().split()[2] == WEB
        }
        assert len(pids) == 1, (pidfiles, addresses)
        async with refusals(world, WEB) as events:
            os.kill(next(iter(pids.values())), signal.SIGKILL)

            def states() -> list[str]:
                return [e.state for e in events if e.kind == "net_status"]

            await wait_until_async(lambda: states()[:2] == ["restarting", "up"], "restored")
            answer = await python(client, WEB, code)
        after = await client.get_zone(WEB)
    assert (zone.net_status, after.net_status) == ("up", "up")
    assert answer["allowed"] == f"ok {world.internet.web_a} allowed.test /restored", answer
    assert not str(answer["blocked"]).startswith("ok"), answer


def refused_on_host(port: int) -> bool:
    """Nothing listens on the host's loopback at ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_quarantine_cuts_a_networked_zones_network_and_keeps_its_record(
    world: NetWorld,
) -> None:
    publish = f"127.0.0.1:{world.frozen_port}:8000"
    url = f"http://127.0.0.1:{world.frozen_port}/"
    async with connect(world) as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            await client.create_zone(FROZEN, memory_mib=128, net=WEB_POLICY, publishes=[publish])
        server = ["python3", "-m", "http.server", "8000", "--directory", "/etc"]
        async with (
            client.exec_process(FROZEN, server),
            client.exec_process(FROZEN, ["python3", "-c", HOLD]) as holder,
        ):
            first = await anext(aiter(holder))
            assert first.data.strip() == b"up", first
            await wait_until_published(url, f"{FROZEN}'s port 8000")
            before = await client.zone_metrics(FROZEN)
            with trio.fail_after(CALL_TIMEOUT_S):
                reply = await client.quarantine_zone(FROZEN)
        after = await client.zone_metrics(FROZEN)
        zone = await client.get_zone(FROZEN)
        with pytest.raises(Conflict, match="quarantined"):
            await client.set_zone_net(FROZEN, "open")
    assert before.net is not None and before.net.connections_active >= 1, before.net
    assert reply.zone.state == "quarantined"
    # Cut: the published port is gone from the host, the held connection closed...
    assert await trio.to_thread.run_sync(refused_on_host, world.frozen_port)
    assert after.net is not None and after.net.connections_active == 0, after.net
    assert after.net.connections_allowed >= before.net.connections_allowed
    # ...and the record, in the daemon and in the evidence, keeps what it had.
    assert (zone.state, zone.net, zone.publishes) == ("quarantined", WEB_POLICY, [publish])
    kept = json.loads((Path(reply.bundle.path) / "zone.json").read_text())
    assert kept["network"]["policy"]["rules"], kept["network"]


async def test_kill_9_of_zoned_then_restart_keeps_the_policies(world: NetWorld) -> None:
    web_a = world.internet.web_a
    code = program(
        # First, before any lookup: an address the zone cached before the restart
        # (its pin was kept: the restarted daemon seeded the new helper with it).
        f'"cached": attempt(lambda: tls("{web_a}", "allowed.test"))',
        '"allowed": attempt(lambda: get("https://allowed.test/after"))',
        '"blocked": attempt(lambda: get("https://blocked.test/"))',
        f'"direct": attempt(lambda: connect("{world.internet.web_b}", 443))',
    )
    pins = list((world.daemon.root / "run" / "net").glob("*.pins"))
    assert pins, "no zone's pins were saved"
    world.daemon.kill9()
    # Its helpers died with it; the rules stay: closed, never open.
    world.daemon.start()
    async with connect(world) as client:

        async def ready() -> bool:
            return (await client.get_zone(WEB)).state == "ready"

        await wait_until_async(ready, f"{WEB} re-adopted")
        zone = await client.get_zone(WEB)
        async with refusals(world, WEB) as events:
            answer = await python(client, WEB, code)
            await wait_for_refusal(events, "dns", "blocked.test")
        frozen = await client.get_zone(FROZEN)
        with pytest.raises(Conflict, match="quarantined"):
            await client.set_zone_net(FROZEN, "open")
    assert (zone.net, zone.net_status) == (WEB_POLICY, "up")
    # The quarantined zone was re-adopted cut: still frozen, its port still closed.
    assert (frozen.state, frozen.net) == ("quarantined", WEB_POLICY), frozen
    assert await trio.to_thread.run_sync(refused_on_host, world.frozen_port)
    assert answer["cached"] == f"ok {web_a} allowed.test /talk", answer
    assert answer["allowed"] == f"ok {world.internet.web_a} allowed.test /after", answer
    assert not str(answer["blocked"]).startswith("ok"), answer
    assert not str(answer["direct"]).startswith("ok"), answer


async def test_a_crashed_zone_leaves_no_network_behind(world: NetWorld) -> None:
    async with connect(world) as client:
        zone = await client.get_zone(OPEN)
        before = world.links()
        pid = qemu_pid(domain_name(OPEN))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

        async def failed() -> bool:
            return (await client.get_zone(OPEN)).state == "failed"

        await wait_until_async(failed, f"{OPEN} failed after its QEMU was killed")
        # The failure is announced first; its tap, rules and helper go next.
        await wait_until_async(
            lambda: len(world.links()) == len(before) - 1, f"{OPEN}'s network removed"
        )
    assert zone.net == ["open"]
