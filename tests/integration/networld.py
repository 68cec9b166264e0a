"""A small internet inside network namespaces, for the zone network tests.

Namespaces (all named ``<tag>*``, created and removed here, nothing outside
them is touched or reached):

- ``<tag>h`` plays the host: zoned's :class:`NetHost` runs its links, rules
  and helpers there (``netns=``), routed to the internet over a transit veth
  (198.18.0.1/30, 2001:db8:ff::1/64).
- ``<tag>i`` is the internet: web servers (HTTP 80, HTTPS 443 with a test CA)
  on 198.51.100.10, .20, 2001:db8:1::10, a DNS server on 198.51.100.53 with
  the records below, a UDP echo on 198.51.100.53:9000.
- ``<tag>a``, ``<tag>b`` play zones: the far ends of the stand-in veths.

:func:`internet_on_host` builds the same internet for real zones, whose
taps and helpers must live in the host's own namespace (QEMU runs there):
only the internet namespace is made, joined to the host by a veth, with
routes in the host for this checkout's own server addresses (in
198.18.0.0/15 and 2001:db8::/32, which the host does not use), checked to
go there before anything is sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from zoned.net.addressing import NetPools
from zoned.net.host import NetHost, NetHostConfig
from zoned.net.wire import Limits

REPO = Path(__file__).resolve().parents[2]
WEB_A = "198.51.100.10"
WEB_B = "198.51.100.20"
WEB_A6 = "2001:db8:1::10"
DNS = "198.51.100.53"
UDP_ECHO_PORT = 9000


def records(web_a: str, web_b: str, web_a6: str) -> dict[str, list[list[str]]]:
    return {
        "allowed.test": [["A", web_a], ["AAAA", web_a6]],
        "other.test": [["A", web_a]],  # same server, a name no policy allows
        "blocked.test": [["A", web_b]],
        "files.cdn.test": [["A", web_b]],
        "alias.test": [["CNAME", "allowed.test."]],
        "rebind.test": [["A", "192.168.7.7"]],
        "mixed.test": [["A", web_b], ["A", "10.1.2.3"]],
        "meta.test": [["A", "169.254.169.254"]],
    }


RECORDS = records(WEB_A, WEB_B, WEB_A6)


def sh(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def require_tools() -> None:
    missing = [tool for tool in ("ip", "nft", "curl", "openssl") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run tools/host-setup (installs nftables, iproute2)"
        )
    if os.geteuid() != 0:
        pytest.fail("the network tests need root (namespaces, nftables)")


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "web.key", "web.csr", "web.pem")
    )
    sh(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
            "-days",
            "2",
            "-subj",
            "/CN=zoned test CA",
        ]
    )
    sh(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            "/CN=web",
        ]
    )
    ext = directory / "ext.cnf"
    ext.write_text(
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in [*RECORDS, "*.cdn.test"]) + "\n"
    )
    sh(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            "2",
            "-extfile",
            str(ext),
        ]
    )
    return ca, cert, key


@dataclass
class World:
    tag: str
    directory: Path
    ca: Path
    servers: subprocess.Popen[bytes]
    echo: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"{self.tag}h"

    @property
    def internet(self) -> str:
        return f"{self.tag}i"

    @property
    def zones(self) -> list[str]:
        return [f"{self.tag}a", f"{self.tag}b"]

    @property
    def namespaces(self) -> list[str]:
        return [self.host, self.internet, *self.zones]

    def config(self, **overrides: object) -> NetHostConfig:
        values: dict[str, object] = {
            "table": "zonedtest",
            "owner": f"test-{self.tag}",
            "pools": NetPools(link_prefix="zt"),
            "runtime_dir": str(self.directory / "run"),
            "upstream_dns": [DNS],
            "helper_uid_base": 3_000_000_000,
            "limits": Limits(connect_rate=500, dns_rate=500, event_rate=100),
            "netns": self.host,
            "python": sys.executable,
        }
        values.update(overrides)
        return NetHostConfig(**values)  # type: ignore[arg-type]

    def in_zone(
        self, zone_ns: str, argv: Sequence[str], *, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        return sh(["ip", "netns", "exec", zone_ns, *argv], check=False, timeout=timeout)

    def curl(self, zone_ns: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.in_zone(
            zone_ns,
            [
                "curl",
                "-sS",
                "--max-time",
                "8",
                "--retry",
                "0",
                "--cacert",
                str(self.ca),
                *extra,
                url,
            ],
            timeout=20,
        )

    def write_resolv_conf(self, zone_ns: str, nameserver: str) -> None:
        directory = Path("/etc/netns") / zone_ns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(
            f"nameserver {nameserver}\noptions timeout:2 attempts:1\n"
        )

    def leftovers(self) -> list[str]:
        """Links and the table of ours still in the stand-in host."""
        found = []
        links = json.loads(sh(["ip", "-n", self.host, "-j", "link", "show"]).stdout or "[]")
        found += [f"link {link['ifname']}" for link in links if link["ifname"].startswith("zt")]
        tables = sh(["ip", "netns", "exec", self.host, "nft", "list", "tables"]).stdout
        found += [f"nft {line.strip()}" for line in tables.splitlines() if "zonedtest" in line]
        run = self.directory / "run"
        found += [f"pidfile {p.name}" for p in run.glob("*.pid")] if run.is_dir() else []
        return found


def _serve(
    tmp: Path, internet: str, web_a: str, web_b: str, web_a6: str, dns: str
) -> tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """The internet's addresses, certificates and servers (web, DNS, a UDP echo)."""
    for address in (web_a, web_b, dns):
        sh(["ip", "-n", internet, "addr", "add", f"{address}/32", "dev", "lo"])
    sh(["ip", "-n", internet, "-6", "addr", "add", f"{web_a6}/128", "dev", "lo", "nodad"])
    ca, cert, key = _make_certs(tmp)
    config = tmp / "world.json"
    config.write_text(
        json.dumps(
            {
                "cert": str(cert),
                "key": str(key),
                "web": [web_a, web_b, web_a6],
                "dns": dns,
                "records": records(web_a, web_b, web_a6),
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    servers = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            internet,
            sys.executable,
            "-m",
            "tests.integration.networld_servers",
            str(config),
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert servers.stdout is not None
    if servers.stdout.readline().strip() != b"serving":
        servers.kill()
        servers.wait()
        raise AssertionError("the world's servers did not start")
    echo = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            internet,
            sys.executable,
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.bind(('{dns}',{UDP_ECHO_PORT}))\n"
            "while True:\n d,a=s.recvfrom(2048); s.sendto(d,a)",
        ],
    )
    return ca, servers, echo


@dataclass
class HostInternet:
    """The tests' internet joined to the host's own namespace (for real zones)."""

    tag: str
    namespace: str
    link: str
    ca: Path
    web_a: str
    web_b: str
    web_a6: str
    dns: str

    def leftovers(self, link_prefix: str, table: str) -> list[str]:
        """A daemon's links and table still on the host."""
        links = json.loads(sh(["ip", "-j", "link", "show"]).stdout or "[]")
        found = [
            f"link {link['ifname']}" for link in links if link["ifname"].startswith(link_prefix)
        ]
        if sh(["nft", "list", "table", "inet", table], check=False).returncode == 0:
            found.append(f"nft table inet {table}")
        return found


def _host_slot() -> int:
    checkout = str(REPO.resolve())
    return int(hashlib.sha256(checkout.encode()).hexdigest()[:8], 16) % 250 + 1


@contextlib.contextmanager
def internet_on_host(tmp: Path) -> Iterator[HostInternet]:
    """The internet in a namespace of its own, routed from the host's namespace.

    The addresses are this checkout's (two checkouts never share one); a run
    left behind by a crash is removed first. Nothing is sent until the host's
    routes to every server are known to go into the namespace.
    """
    require_tools()
    k = _host_slot()
    tag = f"zni{k:02x}"
    namespace, link, peer = f"{tag}i", f"{tag}h", f"{tag}w"
    web_a, web_b, dns = f"198.18.{k}.10", f"198.18.{k}.20", f"198.18.{k}.53"
    web_a6 = f"2001:db8:{k:x}::10"
    transit = (f"198.19.{k}.1", f"198.19.{k}.2")
    transit6 = (f"2001:db8:ff{k:02x}::1", f"2001:db8:ff{k:02x}::2")

    def remove() -> None:
        sh(["ip", "link", "del", link], check=False)
        sh(["ip", "netns", "del", namespace], check=False)

    remove()
    servers = echo = None
    try:
        _netns_add(namespace)
        sh(["ip", "link", "add", link, "type", "veth", "peer", "name", peer, "netns", namespace])
        sh(["ip", "addr", "add", f"{transit[0]}/30", "dev", link])
        sh(["ip", "-6", "addr", "add", f"{transit6[0]}/64", "dev", link, "nodad"])
        sh(["ip", "link", "set", link, "up"])
        sh(["ip", "route", "add", f"198.18.{k}.0/24", "via", transit[1], "dev", link])
        sh(["ip", "-6", "route", "add", f"2001:db8:{k:x}::/48", "via", transit6[1], "dev", link])
        inside = ["ip", "-n", namespace]
        sh([*inside, "addr", "add", f"{transit[1]}/30", "dev", peer])
        sh([*inside, "-6", "addr", "add", f"{transit6[1]}/64", "dev", peer, "nodad"])
        sh([*inside, "link", "set", peer, "up"])
        sh([*inside, "route", "add", "default", "via", transit[0]])
        sh([*inside, "-6", "route", "add", "default", "via", transit6[0]])
        for address in (web_a, web_b, dns, web_a6):
            route = json.loads(sh(["ip", "-j", "route", "get", address]).stdout)
            if route[0].get("dev") != link:
                raise AssertionError(f"the host routes {address} to {route}, not into {namespace}")
        ca, servers, echo = _serve(tmp, namespace, web_a, web_b, web_a6, dns)
        yield HostInternet(tag, namespace, link, ca, web_a, web_b, web_a6, dns)
    finally:
        for proc in (servers, echo):
            if proc is not None:
                proc.kill()
                proc.wait()
        remove()


def _netns_add(name: str) -> None:
    sh(["ip", "netns", "add", name])
    sh(["ip", "-n", name, "link", "set", "lo", "up"])


def _remove_world(tag: str) -> None:
    for ns in sh(["ip", "netns", "list"]).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(tag) and len(name) == len(tag) + 1:
            sh(["ip", "netns", "del", name], check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


@contextlib.contextmanager
def network_world(tmp: Path) -> Iterator[World]:
    require_tools()
    tag = f"znt{os.getpid() % 100000}"
    _remove_world(tag)
    host, internet = f"{tag}h", f"{tag}i"
    servers = echo = None
    try:
        for ns in (host, internet, f"{tag}a", f"{tag}b"):
            _netns_add(ns)
        sh(
            [
                "ip",
                "-n",
                host,
                "link",
                "add",
                "up0",
                "type",
                "veth",
                "peer",
                "name",
                "up1",
                "netns",
                internet,
            ]
        )
        sh(["ip", "-n", host, "addr", "add", "198.18.0.1/30", "dev", "up0"])
        sh(["ip", "-n", host, "-6", "addr", "add", "2001:db8:ff::1/64", "dev", "up0", "nodad"])
        sh(["ip", "-n", host, "link", "set", "up0", "up"])
        sh(["ip", "-n", host, "route", "add", "default", "via", "198.18.0.2"])
        sh(["ip", "-n", host, "-6", "route", "add", "default", "via", "2001:db8:ff::2"])
        sh(["ip", "-n", internet, "addr", "add", "198.18.0.2/30", "dev", "up1"])
        sh(["ip", "-n", internet, "-6", "addr", "add", "2001:db8:ff::2/64", "dev", "up1", "nodad"])
        sh(["ip", "-n", internet, "link", "set", "up1", "up"])
        # No route back to the zone pool: proxied traffic comes from the host's
        # own address, forwarded UDP is masqueraded to it.
        ca, servers, echo = _serve(tmp, internet, WEB_A, WEB_B, WEB_A6, DNS)
        world = World(tag, tmp, ca, servers, echo)
        yield world
    finally:
        for proc in (servers, echo):
            if proc is not None:
                proc.kill()
                proc.wait()
        _remove_world(tag)
    left = [ns for ns in sh(["ip", "netns", "list"]).stdout.split() if ns.startswith(tag)]
    if left:
        raise AssertionError(f"namespaces left behind: {left}")


@contextlib.asynccontextmanager
async def running_nethost(world: World, **overrides: object) -> AsyncIterator[NetHost]:
    """A NetHost in the stand-in host; everything it made must be gone when it ends."""
    nethost = NetHost(world.config(**overrides))
    async with trio.open_nursery() as nursery:
        await nursery.start(nethost.run)
        try:
            yield nethost
        finally:
            with trio.CancelScope(shield=True):
                await nethost.shutdown()
            nursery.cancel_scope.cancel()
    left = world.leftovers()
    if left:
        raise AssertionError(f"zone networking left behind: {left}")


def wait_tcp(namespace_cmd: Sequence[str], host: str, port: int, *, timeout: float = 10) -> None:
    """Wait (bounded) until something accepts on host:port, seen from ``namespace_cmd``."""
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
    while time.monotonic() < deadline:
        if sh([*namespace_cmd, sys.executable, "-c", probe], check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {host}:{port}")
