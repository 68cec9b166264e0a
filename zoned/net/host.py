"""The privileged shell: links, sysctls, our nftables table, sockets, helpers, reclaim.

:class:`NetHost` is what the zone manager calls (one per daemon):
:meth:`~NetHost.create`, :meth:`~NetHost.update_policy`,
:meth:`~NetHost.update_publishes`, :meth:`~NetHost.remove`,
:meth:`~NetHost.adopt` (after a restart) and :meth:`~NetHost.reclaim`
(everything of ours no record claims), plus counters, status and an event
channel. Operations are serialized; each either completes or leaves things
as they were (a publish on a taken port fails before anything is touched).

Order matters for failing closed: a zone's rules are in the table before
its link exists and stay until after the link and the helper are gone, so
no packet from the zone ever meets the host without them. The daemon keeps
its own copy of every listening socket it hands a helper: when a helper
dies, the zone's connections wait in the backlog (nothing flows anywhere),
and the restarted helper takes the same sockets over.

Everything we create is findable after a ``kill -9``: links by name prefix
and their ``ifalias`` (``zoned:<owner>:<zone>``), the table by name, helper
processes by pid files (pid, start time and marker checked before a kill).
``netns`` runs all of it inside another network namespace (the tests' stand-in
host); production passes None.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import msgspec
import trio

from zoned.errors import ConfigError, Conflict, InternalError, InvalidRequest, NotFound
from zoned.net import nftrules, wire
from zoned.net.accounting import NetCounters, RefusedEvent
from zoned.net.addressing import NetPools, ZoneAddressing, validate_pools, zone_addressing
from zoned.net.helper import MARKER
from zoned.net.pins import PinTable
from zoned.net.policy import (
    CidrRule,
    NetPolicy,
    Publish,
    RefusedRange,
    ZoneNetSpec,
    validate_policy,
    validate_publishes,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
HELPER_RESTARTS = 5  # in a row without a Ready in between, then the zone is failed
PIN_SAVE_INTERVAL_S = 1.0
_PINS_DECODER = msgspec.msgpack.Decoder(list[wire.Pin])
APPLY_TIMEOUT_S = 10.0

NetStatus = Literal["up", "restarting", "failed"]


class NetError(InternalError):
    """A host networking command failed (the message has the command's error)."""


# ---------------------------------------------------------------------------
# Blocking primitives (run in threads)
# ---------------------------------------------------------------------------


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` with the calling thread in ``netns`` (a fresh thread; None: here).

    Sockets created there stay in that namespace; subprocesses started there
    run in it.
    """
    if netns is None:
        return fn()
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        raise NetError(f"{' '.join(argv[:4])}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def write_sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def read_sysctl(path: str) -> str:
    with open(f"/proc/sys/{path}") as f:
        return f.read().strip()


def check_forwarding(policy: NetPolicy) -> None:
    """UDP rules are forwarded by the kernel: refuse them where it does not forward."""
    versions = {
        ipaddress.ip_network(r.network).version
        for r in policy.rules
        if isinstance(r, CidrRule) and r.protocol == "udp"
    }
    if 4 in versions and read_sysctl("net/ipv4/ip_forward") != "1":
        raise InvalidRequest("UDP rules need IP forwarding on this host (net.ipv4.ip_forward=1)")
    if 6 in versions and read_sysctl("net/ipv6/conf/all/forwarding") != "1":
        raise InvalidRequest("IPv6 UDP rules need net.ipv6.conf.all.forwarding=1 on this host")


def _ip(*args: str) -> str:
    return run(["ip", *args])


def link_alias(owner: str, zone: str) -> str:
    return f"zoned:{owner}:{zone}"


def list_our_links(prefix: str, owner: str) -> dict[str, str]:
    """Links named ``<prefix>*`` whose alias says ``owner``: name -> zone."""
    found: dict[str, str] = {}
    for link in json.loads(_ip("-j", "link", "show") or "[]"):
        name = link.get("ifname", "")
        alias = link.get("ifalias", "")
        marker = f"zoned:{owner}:"
        if name.startswith(prefix) and alias.startswith(marker):
            found[name.split("@", 1)[0]] = alias[len(marker) :]
    return found


def link_exists(name: str) -> bool:
    # Not /sys/class/net: sysfs shows the namespace it was mounted in, not ours.
    proc = subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, check=False)
    return proc.returncode == 0


def harden_host_end(name: str, ipv6: bool) -> None:
    """The host end of a zone's link believes nothing the zone announces."""
    write_sysctl(f"net/ipv4/conf/{name}/accept_redirects", "0")
    write_sysctl(f"net/ipv4/conf/{name}/send_redirects", "0")
    write_sysctl(f"net/ipv4/conf/{name}/accept_source_route", "0")
    if ipv6:
        write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0")
        write_sysctl(f"net/ipv6/conf/{name}/autoconf", "0")
        write_sysctl(f"net/ipv6/conf/{name}/accept_redirects", "0")
        write_sysctl(f"net/ipv6/conf/{name}/accept_dad", "0")
    else:
        write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")


def address_host_end(addr: ZoneAddressing, ipv6: bool) -> None:
    name = addr.ifname
    _ip("addr", "add", f"{addr.host_v4}/{addr.prefix_v4}", "dev", name)
    if ipv6:
        _ip("-6", "addr", "add", f"{addr.host_v6}/{addr.prefix_v6}", "dev", name, "nodad")
    _ip("link", "set", name, "up")


def create_tap(addr: ZoneAddressing, *, alias: str, uid: int, gid: int, ipv6: bool) -> None:
    """A persistent tap for QEMU (libvirt ``type='ethernet' managed='no'`` opens it)."""
    _ip(
        "tuntap",
        "add",
        "dev",
        addr.ifname,
        "mode",
        "tap",
        "user",
        str(uid),
        "group",
        str(gid),
        "vnet_hdr",
    )
    try:
        _ip("link", "set", addr.ifname, "alias", alias)
        harden_host_end(addr.ifname, ipv6)
        address_host_end(addr, ipv6)
    except BaseException:
        delete_link(addr.ifname)
        raise


def create_veth_standin(addr: ZoneAddressing, *, alias: str, zone_netns: str, ipv6: bool) -> None:
    """A veth whose far end, in ``zone_netns``, plays the zone (tests and benchmarks)."""
    peer = "zg" + addr.ifname[-13:]
    _ip("link", "add", addr.ifname, "type", "veth", "peer", "name", peer, "netns", zone_netns)
    try:
        _ip("link", "set", addr.ifname, "alias", alias)
        harden_host_end(addr.ifname, ipv6)
        address_host_end(addr, ipv6)
        inside = ["ip", "-n", zone_netns]
        run([*inside, "link", "set", "lo", "up"])
        run([*inside, "link", "set", peer, "address", addr.mac])
        run([*inside, "addr", "add", f"{addr.guest_v4}/{addr.prefix_v4}", "dev", peer])
        if ipv6:
            run(
                [
                    *inside,
                    "-6",
                    "addr",
                    "add",
                    f"{addr.guest_v6}/{addr.prefix_v6}",
                    "dev",
                    peer,
                    "nodad",
                ]
            )
        run([*inside, "link", "set", peer, "up"])
        run([*inside, "route", "add", "default", "via", addr.host_v4])
        if ipv6:
            run([*inside, "-6", "route", "add", "default", "via", addr.host_v6])
    except BaseException:
        delete_link(addr.ifname)
        raise


def delete_link(name: str) -> None:
    if link_exists(name):
        try:
            _ip("link", "del", name)
        except NetError:
            if link_exists(name):
                raise


def nft_apply(script: str) -> None:
    run(["nft", "-f", "-"], stdin=script)


def udp_counters(table: str) -> dict[str, tuple[int, int]]:
    """Forwarded UDP bytes per link, (out, in), from our table's named counters."""
    proc = subprocess.run(
        ["nft", "-j", "list", "counters", "table", "inet", table],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        return {}  # no table yet
    found: dict[str, list[int]] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        counter = item.get("counter")
        if not counter:
            continue
        link, _, direction = counter["name"].rpartition("_udp_")
        pair = found.setdefault(link, [0, 0])
        pair[0 if direction == "out" else 1] += int(counter.get("bytes", 0))
    return {link: (pair[0], pair[1]) for link, pair in found.items()}


def save_pins(path: Path, pins: Sequence[wire.Pin]) -> None:
    """A zone's pins, atomically (root's runtime directory; expiries are CLOCK_MONOTONIC,
    which a restarted daemon shares until the host reboots)."""
    temporary = path.with_suffix(".pins.tmp")
    temporary.write_bytes(msgspec.msgpack.encode(list(pins)))
    os.replace(temporary, path)


def load_pins(path: Path) -> list[wire.Pin]:
    """What :func:`save_pins` wrote; nothing for a missing, oversized or corrupt file."""
    try:
        with open(path, "rb") as f:
            data = f.read(wire.MAX_MESSAGE * 16 + 1)
    except OSError:
        return []
    if len(data) > wire.MAX_MESSAGE * 16:
        return []
    try:
        return _PINS_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []


def table_owner(table: str) -> str | None:
    """The owner our table's comment names ("" for none); None when there is no such table.

    From the text listing: nft 1.0.6 leaves table comments out of its JSON.
    """
    proc = subprocess.run(
        ["nft", "list", "table", "inet", table],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines()[:3]:
        words = line.strip().split(" ", 1)
        if len(words) == 2 and words[0] == "comment":
            text = words[1]
            if text.startswith('"') and text.endswith('"'):
                text = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            return text.removeprefix("zoned ")
    return ""


def table_exists(table: str) -> bool:
    proc = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, check=False)
    return proc.returncode == 0


def host_networks() -> list[RefusedRange]:
    """The host's own addresses and the networks they are on (never a zone's target)."""
    ranges: dict[str, RefusedRange] = {}
    for link in json.loads(_ip("-j", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            local = info.get("local")
            if not local:
                continue
            net = ipaddress.ip_network(f"{local}/{info.get('prefixlen', 128)}", strict=False)
            host = ipaddress.ip_network(local)
            ranges.setdefault(str(net), RefusedRange(str(net), "host-network"))
            ranges.setdefault(str(host), RefusedRange(str(host), "host"))
    return list(ranges.values())


def bind_listener(
    family: int, kind: int, address: str, port: int, *, freebind: bool
) -> socket.socket:
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind:
            sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the link may still be down
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_publishes(publishes: Sequence[Publish]) -> list[socket.socket]:
    bound: list[socket.socket] = []
    try:
        for publish in publishes:
            family = socket.AF_INET6 if ":" in publish.host_address else socket.AF_INET
            try:
                bound.append(
                    bind_listener(
                        family,
                        socket.SOCK_STREAM,
                        publish.host_address,
                        publish.host_port,
                        freebind=False,
                    )
                )
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise Conflict(
                        f"cannot publish {publish}: the host port is already taken"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise InvalidRequest(
                        f"cannot publish {publish}: not an address of this host"
                    ) from None
                raise InvalidRequest(f"cannot publish {publish}: {exc.strerror}") from None
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def kill_recorded_helper(pidfile: Path, owner: str) -> bool:
    """Kill the helper a pid file names if it is still that very process; remove the file."""
    try:
        pid_text, start, _zone = pidfile.read_text().split()[:3]
        pid = int(pid_text)
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return False
    killed = False
    cmdline = _proc_cmdline(pid)
    if (
        _proc_start_time(pid) == start
        and f"-m{MARKER}" in "".join(cmdline[:3])
        and owner in cmdline
    ):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed = True
        # Its sockets close as it exits (a zombie holds none); a moment at most.
        for _ in range(500):
            state = _proc_state(pid)
            if state is None or state == "Z":
                break
            time.sleep(0.01)
    pidfile.unlink(missing_ok=True)
    return killed


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------


class NetHostConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    table: str = "zoned"
    owner: str = "zoned"  # in link aliases, the table comment and helper argv
    pools: NetPools = NetPools()
    runtime_dir: str = "/run/zoned/net"
    upstream_dns: list[str] = []  # empty: the host's /etc/resolv.conf nameservers
    proxy_port: int = 15001
    dns_port: int = 15053
    helper_uid_base: int = 0x7A6E0000  # helper of slot n runs as uid/gid base+n
    tap_uid: int = 0  # the tap's owner: the uid QEMU runs as
    tap_gid: int = 0
    limits: wire.Limits = wire.Limits()
    netns: str | None = None
    python: str = sys.executable


@dataclass(frozen=True)
class NetEvent:
    zone: str
    kind: Literal["refused", "helper_down", "helper_restored", "failed"]
    refused: RefusedEvent | None = None
    reason: str = ""


@dataclass
class _Helper:
    process: subprocess.Popen[bytes]
    control: trio.socket.SocketType
    pidfile: Path
    ready: trio.Event = field(default_factory=trio.Event)
    applied: dict[int, trio.Event] = field(default_factory=dict)
    closed: dict[int, int] = field(default_factory=dict)
    counters: NetCounters = field(default_factory=NetCounters)


@dataclass
class _ZoneNet:
    spec: ZoneNetSpec
    addressing: ZoneAddressing
    listeners: list[socket.socket]  # proxy v4/v6, dns udp v4/v6, dns tcp v4/v6
    publish_sockets: list[socket.socket]
    helper: _Helper | None = None
    status: NetStatus = "restarting"
    base: NetCounters = field(default_factory=NetCounters)
    # Forwarded UDP (out, in): folded in before each table rewrite, and live.
    udp_base: tuple[int, int] = (0, 0)
    udp_live: tuple[int, int] = (0, 0)
    # What the helper pinned, to seed its successor (bounded like its own table).
    pins: PinTable = field(default_factory=PinTable)
    pins_dirty: bool = False
    seq: int = 0
    restarts: int = 0
    supervisor: trio.CancelScope | None = None
    standin_netns: str | None = None


def _add_counters(a: NetCounters, b: NetCounters) -> NetCounters:
    fields = msgspec.structs.asdict(a)
    for key, value in msgspec.structs.asdict(b).items():
        if key != "connections_active":
            fields[key] += value
    fields["connections_active"] = b.connections_active
    return NetCounters(**fields)


def resolv_conf_nameservers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    servers = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    servers.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
    return servers


class NetHost:
    """Every zone network of one daemon (see the module docstring)."""

    def __init__(self, config: NetHostConfig) -> None:
        validate_pools(config.pools)
        self.config = config
        self.runtime = Path(config.runtime_dir)
        self._zones: dict[str, _ZoneNet] = {}
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._events_send, self.events = trio.open_memory_channel[NetEvent](1024)
        self._extra_refused: list[RefusedRange] = []

    # -- lifecycle of the manager --------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; helpers are stopped on the way out, links and rules stay.

        A table of our name that another owner made is :class:`ConfigError`
        before anything changes: two daemons configured with one table would
        replace each other's rules.
        """
        owner = await self._call(lambda: table_owner(self.config.table))
        if owner is not None and owner != self.config.owner:
            raise ConfigError(
                f"nftables table inet {self.config.table} belongs to another zoned"
                f" ({owner!r}); give each daemon its own net_table"
            )
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._extra_refused = await self._call(host_networks)
        pools = self.config.pools
        self._extra_refused += [
            RefusedRange(pools.pool_v4, "zone-pool"),
            RefusedRange(pools.pool_v6, "zone-pool"),
        ]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._keep_pins)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for net in self._zones.values():
                    await self._stop_helper(net)

    # -- pins across restarts of the daemon ------------------------------

    def _pins_path(self, addr: ZoneAddressing) -> Path:
        return self.runtime / f"{addr.ifname}.pins"

    async def _keep_pins(self) -> None:
        """Write each zone's new pins to its runtime file now and then, so that a
        restarted daemon (kill -9 included) seeds the zone's next helper with them."""
        while True:
            await trio.sleep(PIN_SAVE_INTERVAL_S)
            for net in list(self._zones.values()):
                if net.pins_dirty:
                    net.pins_dirty = False
                    entries = [
                        wire.Pin(str(addr), name, expiry)
                        for addr, name, expiry in net.pins.entries(time.monotonic())
                    ]
                    path = self._pins_path(net.addressing)
                    await trio.to_thread.run_sync(save_pins, path, entries)
                    if self._zones.get(net.spec.zone) is not net:
                        # Removed meanwhile (its teardown unlinked the file first):
                        # the next zone of its link must not be seeded with them.
                        path.unlink(missing_ok=True)

    def _load_pins(self, net: _ZoneNet) -> None:
        """An adopted zone's pins as the previous daemon last saved them (if any)."""
        now = time.monotonic()
        for pin in load_pins(self._pins_path(net.addressing)):
            with contextlib.suppress(ValueError):
                if pin.expires > now:
                    net.pins.record_until(pin.name, ipaddress.ip_address(pin.address), pin.expires)

    async def _call(self, fn: Callable[[], T]) -> T:
        netns = self.config.netns
        return await trio.to_thread.run_sync(in_netns, netns, fn)

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise InternalError("NetHost is not running")
        return self._nursery

    # -- queries ----------------------------------------------------------

    def spec(self, zone: str) -> ZoneNetSpec:
        return self._get(zone).spec

    def addressing(self, zone: str) -> ZoneAddressing:
        return self._get(zone).addressing

    def status(self, zone: str) -> NetStatus:
        return self._get(zone).status

    def counters(self, zone: str) -> NetCounters:
        net = self._get(zone)
        live = net.helper.counters if net.helper is not None else NetCounters()
        total = _add_counters(net.base, live)
        total.bytes_out += net.udp_base[0] + net.udp_live[0]
        total.bytes_in += net.udp_base[1] + net.udp_live[1]
        return total

    async def read_counters(self, zone: str) -> NetCounters:
        """The zone's counters as of now: the helper answers after everything it sent before.

        So once this returns, every event the zone caused so far is in :attr:`events`.
        """
        async with self._lock:
            net = self._get(zone)
            await self._send_and_wait(net, lambda seq: wire.GetCounters(seq=seq), [])
            udp = await self._call(lambda: udp_counters(self.config.table))
            net.udp_live = udp.get(net.addressing.ifname, (0, 0))
        return self.counters(zone)

    def zones(self) -> list[str]:
        return sorted(self._zones)

    def _get(self, zone: str) -> _ZoneNet:
        try:
            return self._zones[zone]
        except KeyError:
            raise NotFound(f"zone {zone!r} has no network") from None

    # -- operations -------------------------------------------------------

    async def create(
        self,
        spec: ZoneNetSpec,
        *,
        tap_uid: int | None = None,
        tap_gid: int | None = None,
        standin_netns: str | None = None,
    ) -> ZoneAddressing:
        """Rules, link, sockets and helper for a new zone; returns its addressing.

        ``tap_uid``/``tap_gid``: the tap's owner, the uid the zone's QEMU runs
        as (None: the config's). ``standin_netns``: make a veth into that
        namespace instead of a tap (a namespace plays the zone).
        """
        owner = (
            self.config.tap_uid if tap_uid is None else tap_uid,
            self.config.tap_gid if tap_gid is None else tap_gid,
        )
        async with self._lock:
            return await self._bring_up(
                spec, standin_netns=standin_netns, adopt=False, tap_owner=owner
            )

    async def adopt(self, spec: ZoneNetSpec) -> ZoneAddressing:
        """After a restart: keep the zone's link (its QEMU holds it), redo rules and helper."""
        async with self._lock:
            return await self._bring_up(
                spec,
                standin_netns=None,
                adopt=True,
                tap_owner=(self.config.tap_uid, self.config.tap_gid),
            )

    async def _bring_up(
        self,
        spec: ZoneNetSpec,
        *,
        standin_netns: str | None,
        adopt: bool,
        tap_owner: tuple[int, int],
    ) -> ZoneAddressing:
        self._require_nursery()
        if spec.zone in self._zones:
            raise Conflict(f"zone {spec.zone!r} already has a network")
        validate_policy(spec.policy)
        validate_publishes(spec.publishes)
        addr = zone_addressing(self.config.pools, spec.slot)
        for other in self._zones.values():
            if other.spec.slot == spec.slot:
                raise Conflict(f"network slot {spec.slot} is taken by zone {other.spec.zone!r}")
        await self._call(lambda: check_forwarding(spec.policy))
        publish_sockets = await self._call(lambda: bind_publishes(spec.publishes))
        net = _ZoneNet(
            spec,
            addr,
            [],
            publish_sockets,
            pins=PinTable(max_entries=self.config.limits.pin_entries),
            standin_netns=standin_netns,
        )
        if adopt:
            await trio.to_thread.run_sync(self._load_pins, net)
        self._zones[spec.zone] = net
        try:
            await self._apply_table()
            alias = link_alias(self.config.owner, spec.zone)
            cfg = self.config

            def make_link() -> None:
                if adopt:
                    # A helper of the previous daemon still holding the sockets
                    # (it was stopped, not killed): it goes first.
                    kill_recorded_helper(self.runtime / f"{addr.ifname}.pid", cfg.owner)
                    if link_exists(addr.ifname):
                        return
                if standin_netns is not None:
                    create_veth_standin(addr, alias=alias, zone_netns=standin_netns, ipv6=spec.ipv6)
                else:
                    uid, gid = tap_owner
                    create_tap(addr, alias=alias, uid=uid, gid=gid, ipv6=spec.ipv6)

            await self._call(make_link)
            net.listeners = await self._call(lambda: self._bind_zone_sockets(addr, spec.ipv6))
            await self._start_helper(net)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._tear_down(net)
            raise
        return addr

    def _bind_zone_sockets(self, addr: ZoneAddressing, ipv6: bool) -> list[socket.socket]:
        cfg = self.config
        families = [(socket.AF_INET, addr.host_v4)] + (
            [(socket.AF_INET6, addr.host_v6)] if ipv6 else []
        )
        bound: list[socket.socket] = []
        try:
            for kind, port in (
                (socket.SOCK_STREAM, cfg.proxy_port),
                (socket.SOCK_DGRAM, cfg.dns_port),
                (socket.SOCK_STREAM, cfg.dns_port),
            ):
                for family, address in families:
                    bound.append(bind_listener(family, kind, address, port, freebind=True))
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        return bound

    async def check_policy(self, policy: NetPolicy) -> None:
        """:class:`InvalidRequest` for a policy this host cannot enforce (before a create)."""
        validate_policy(policy)
        await self._call(lambda: check_forwarding(policy))

    async def update_policy(self, zone: str, policy: NetPolicy) -> int:
        """A running zone's new policy, in force for new connections when this returns.

        Returns how many open connections it closed.
        """
        validate_policy(policy)
        async with self._lock:
            net = self._get(zone)
            await self._call(lambda: check_forwarding(policy))
            old = net.spec
            net.spec = msgspec.structs.replace(old, policy=policy)
            try:
                await self._apply_table()
                closed = await self._send_and_wait(
                    net, lambda seq: wire.SetPolicy(seq=seq, policy=policy), []
                )
            except BaseException:
                net.spec = old
                with trio.CancelScope(shield=True):
                    await self._apply_table()
                raise
            return closed

    async def update_publishes(self, zone: str, publishes: list[Publish]) -> None:
        """A running zone's new publishes: kept ones keep their sockets, new ones bound first."""
        validate_publishes(publishes)
        async with self._lock:
            net = self._get(zone)
            held = {
                (p.host_address, p.host_port): s
                for p, s in zip(net.spec.publishes, net.publish_sockets, strict=True)
            }
            fresh = [p for p in publishes if (p.host_address, p.host_port) not in held]
            bound = iter(await self._call(lambda: bind_publishes(fresh)))
            sockets = [held.get((p.host_address, p.host_port)) or next(bound) for p in publishes]
            kept = {id(s) for s in sockets}
            for sock in held.values():
                if id(sock) not in kept:
                    sock.close()
            net.publish_sockets = sockets
            net.spec = msgspec.structs.replace(net.spec, publishes=publishes)
            await self._apply_table()
            fds = [s.fileno() for s in sockets]
            await self._send_and_wait(
                net,
                lambda seq: wire.SetPublishes(
                    seq=seq, publishes=publishes, publish_fds=list(range(len(fds)))
                ),
                fds,
            )

    async def cut(self, zone: str) -> int:
        """Nothing in or out of a running zone from now on (quarantine): no rule, no
        publish, every open connection closed (returns how many). Its DNS
        still gets answers, all refusals. ``update_policy`` opens it again.
        """
        closed = await self.update_policy(zone, NetPolicy())
        await self.update_publishes(zone, [])
        return closed

    async def remove(self, zone: str) -> None:
        """Helper, sockets, link, then the zone's rules. Idempotent for a zone we know."""
        async with self._lock:
            net = self._get(zone)
            with trio.CancelScope(shield=True):
                await self._tear_down(net)

    async def _tear_down(self, net: _ZoneNet) -> None:
        await self._stop_helper(net)
        for sock in net.listeners + net.publish_sockets:
            sock.close()
        net.listeners, net.publish_sockets = [], []
        await self._call(lambda: delete_link(net.addressing.ifname))
        self._pins_path(net.addressing).unlink(missing_ok=True)
        self._zones.pop(net.spec.zone, None)
        await self._apply_table()

    async def reclaim(self) -> list[str]:
        """Remove every link, helper and (when no zone is left) the table that no zone here claims.

        Call after :meth:`adopt` for every zone the daemon's records still hold.
        """
        removed: list[str] = []
        async with self._lock:
            known = {net.addressing.ifname for net in self._zones.values()}
            links = await self._call(
                lambda: list_our_links(self.config.pools.link_prefix, self.config.owner)
            )
            for name, zone in sorted(links.items()):
                if name not in known:
                    await self._call(lambda name=name: delete_link(name))  # type: ignore[misc]
                    removed.append(f"link {name} (zone {zone})")
            pid_dir = self.runtime
            kept = {self._pins_path(net.addressing) for net in self._zones.values()}
            for pins in sorted(pid_dir.glob("*.pins")) if pid_dir.is_dir() else []:
                if pins not in kept:
                    pins.unlink(missing_ok=True)
            live = {net.helper.pidfile for net in self._zones.values() if net.helper is not None}
            for pidfile in sorted(pid_dir.glob("*.pid")) if pid_dir.is_dir() else []:
                if pidfile in live:
                    continue
                owner = self.config.owner
                if await trio.to_thread.run_sync(kill_recorded_helper, pidfile, owner):
                    removed.append(f"helper {pidfile.stem}")
            if not self._zones and await self._call(lambda: table_exists(self.config.table)):
                removed.append(f"table inet {self.config.table}")
            await self._apply_table()  # with no zone left, it deletes the table
        return removed

    async def shutdown(self) -> None:
        """Remove every zone network (zoned stopping with its zones destroyed)."""
        for zone in list(self._zones):
            await self.remove(zone)
        await self.reclaim()

    # -- rules --------------------------------------------------------------

    def _filters(self) -> list[nftrules.ZoneFilter]:
        from zoned.net.policy import CompiledPolicy

        filters = []
        for net in self._zones.values():
            compiled = CompiledPolicy(net.spec.policy, self._extra_refused)
            filters.append(
                nftrules.ZoneFilter(
                    addressing=net.addressing,
                    proxy_port=self.config.proxy_port,
                    dns_port=self.config.dns_port,
                    helper_uid=self.config.helper_uid_base + net.spec.slot,
                    ipv6=net.spec.ipv6,
                    udp_rules=compiled.udp_rules(),
                    publish_ports=[p.zone_port for p in net.spec.publishes],
                )
            )
        return filters

    async def _apply_table(self) -> None:
        # No zone, no table: nothing of ours stays on the host.
        script = (
            nftrules.render_table(self.config.table, self.config.owner, self._filters())
            if self._zones
            else nftrules.render_delete(self.config.table)
        )
        table = self.config.table

        def fold_and_apply() -> dict[str, tuple[int, int]]:
            # The rewrite resets the counters: read them in the same thread first.
            before = udp_counters(table)
            nft_apply(script)
            return before

        before = await self._call(fold_and_apply)
        for net in self._zones.values():
            out, back = before.get(net.addressing.ifname, (0, 0))
            net.udp_base = (net.udp_base[0] + out, net.udp_base[1] + back)
            net.udp_live = (0, 0)

    # -- helpers ------------------------------------------------------------

    async def _start_helper(self, net: _ZoneNet) -> None:
        nursery = self._require_nursery()
        ready = trio.Event()
        scope = trio.CancelScope()
        net.supervisor = scope
        nursery.start_soon(self._supervise, net, scope, ready)
        with trio.fail_after(APPLY_TIMEOUT_S):
            await ready.wait()
        if net.status != "up":
            raise NetError(f"the network helper of zone {net.spec.zone!r} did not start")

    def _spawn(self, net: _ZoneNet) -> _Helper:
        cfg = self.config
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        uid = cfg.helper_uid_base + net.spec.slot
        argv = [
            cfg.python,
            "-m" + MARKER,
            "--control-fd",
            str(theirs.fileno()),
            "--uid",
            str(uid),
            "--gid",
            str(uid),
            "--owner",
            cfg.owner,
            "--zone",
            net.spec.zone,
            "--parent",
            str(os.getpid()),
        ]
        if cfg.netns is not None:
            argv = ["ip", "netns", "exec", cfg.netns, *argv]
        log_path = self.runtime / f"{net.addressing.ifname}.log"
        with open(log_path, "ab") as errors:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                pass_fds=[theirs.fileno()],
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "PYTHONPATH": os.pathsep.join(sys.path),
                },
            )
        theirs.close()
        pidfile = self.runtime / f"{net.addressing.ifname}.pid"
        start = _proc_start_time(process.pid) or "0"
        pidfile.write_text(f"{process.pid} {start} {net.spec.zone}\n")
        ours.setblocking(False)
        return _Helper(process, trio.socket.from_stdlib_socket(ours), pidfile)

    async def _send(self, helper: _Helper, message: wire.ToHelper, fds: Sequence[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await helper.control.sendmsg([wire.encode(message)], ancillary)

    async def _send_and_wait(
        self, net: _ZoneNet, make: Callable[[int], wire.ToHelper], fds: Sequence[int]
    ) -> int:
        helper = net.helper
        if helper is None or net.status != "up":
            # The restarted helper gets the current spec in its Setup.
            return 0
        net.seq += 1
        seq = net.seq
        done = trio.Event()
        helper.applied[seq] = done
        await self._send(helper, make(seq), fds)
        with trio.fail_after(APPLY_TIMEOUT_S):
            await done.wait()
        return helper.closed.pop(seq, 0)

    def _setup_message(self, net: _ZoneNet) -> tuple[wire.Setup, list[int], list[wire.SeedPins]]:
        listeners = net.listeners
        per_kind = len(listeners) // 3
        fds = [s.fileno() for s in listeners] + [s.fileno() for s in net.publish_sockets]
        upstream = self.config.upstream_dns or resolv_conf_nameservers()
        live = [
            wire.Pin(str(addr), name, expiry)
            for addr, name, expiry in net.pins.entries(time.monotonic())
        ]
        per = wire.PINS_PER_MESSAGE
        seeds = [wire.SeedPins(pins=live[i : i + per]) for i in range(0, len(live), per)]
        setup = wire.Setup(
            zone=net.spec.zone,
            addressing=net.addressing,
            policy=net.spec.policy,
            extra_refused=self._extra_refused,
            upstream_dns=upstream,
            limits=self.config.limits,
            proxy_fds=list(range(0, per_kind)),
            dns_udp_fds=list(range(per_kind, 2 * per_kind)),
            dns_tcp_fds=list(range(2 * per_kind, 3 * per_kind)),
            publishes=net.spec.publishes,
            publish_fds=list(range(3 * per_kind, 3 * per_kind + len(net.publish_sockets))),
            seed_messages=len(seeds),
        )
        return setup, fds, seeds

    async def _supervise(
        self, net: _ZoneNet, scope: trio.CancelScope, first_ready: trio.Event
    ) -> None:
        """Run the zone's helper; restart it when it dies, fail the zone when it keeps dying."""
        with scope:
            while True:
                # Spawned from this (the event loop's) thread, never a worker:
                # PR_SET_PDEATHSIG follows the thread that forked, and a
                # worker thread that retires would kill the helper.
                helper = self._spawn(net)
                net.helper = helper
                try:
                    setup, fds, seeds = self._setup_message(net)
                    await self._send(helper, setup, fds)
                    for seed in seeds:
                        await self._send(helper, seed, [])
                    reason = await self._read_helper(net, helper, first_ready)
                except OSError as exc:
                    reason = f"control socket: {exc}"
                finally:
                    with trio.CancelScope(shield=True):
                        await self._reap(helper)
                        net.base = _add_counters(net.base, helper.counters)
                        net.base.connections_active = 0
                        net.helper = None
                if net.status == "up":
                    net.restarts = 0
                net.restarts += 1
                net.status = "restarting"
                self._event(NetEvent(net.spec.zone, "helper_down", reason=reason))
                if net.restarts > HELPER_RESTARTS:
                    net.status = "failed"
                    self._event(NetEvent(net.spec.zone, "failed", reason=reason))
                    first_ready.set()
                    return
                await trio.sleep(min(0.1 * 2**net.restarts, 5.0))

    async def _read_helper(self, net: _ZoneNet, helper: _Helper, first_ready: trio.Event) -> str:
        while True:
            try:
                data = await helper.control.recv(wire.MAX_MESSAGE)
            except OSError as exc:
                return f"control socket: {exc}"
            if not data:
                code = helper.process.poll()
                return (
                    f"helper exited ({code})"
                    if code is not None
                    else "helper closed its control socket"
                )
            try:
                message = wire.decode_from_helper(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return f"helper sent garbage: {exc}"
            if isinstance(message, wire.Ready):
                was = net.status
                net.status = "up"
                if was == "restarting" and first_ready.is_set():
                    self._event(NetEvent(net.spec.zone, "helper_restored"))
                first_ready.set()
            elif isinstance(message, wire.Counters):
                helper.counters = message.counters
                if message.seq:
                    done = helper.applied.pop(message.seq, None)
                    if done is not None:
                        done.set()
            elif isinstance(message, wire.Pinned):
                for pin in message.pins:
                    with contextlib.suppress(ValueError):
                        addr = ipaddress.ip_address(pin.address)
                        net.pins.record_until(pin.name, addr, pin.expires)
                net.pins_dirty = True
            elif isinstance(message, wire.Refused):
                self._event(NetEvent(net.spec.zone, "refused", refused=message.event))
            elif isinstance(message, wire.Applied):
                done = helper.applied.pop(message.seq, None)
                if done is not None:
                    helper.closed[message.seq] = message.closed
                    done.set()

    async def _reap(self, helper: _Helper) -> None:
        if helper.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                helper.process.kill()
        await trio.to_thread.run_sync(helper.process.wait)
        helper.control.close()
        helper.pidfile.unlink(missing_ok=True)
        for done in helper.applied.values():
            done.set()

    async def _stop_helper(self, net: _ZoneNet) -> None:
        """Stop supervising and kill the helper; returns once it is reaped."""
        if net.supervisor is not None:
            net.supervisor.cancel()
            net.supervisor = None
        helper = net.helper
        if helper is not None:
            if helper.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    helper.process.kill()
            await trio.to_thread.run_sync(helper.process.wait)
            helper.pidfile.unlink(missing_ok=True)

    def _event(self, event: NetEvent) -> None:
        # Nobody reads: refused events are rate-limited already, lose the overflow.
        with contextlib.suppress(trio.WouldBlock):
            self._events_send.send_nowait(event)
