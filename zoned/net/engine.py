"""One zone's resolver, transparent proxy and publish listeners, on trio.

The IO shell around the pure core (:mod:`policy`, :mod:`sniff`,
:mod:`dnsfilter`, :mod:`pins`, :mod:`accounting`). It runs inside the
zone's helper process (:mod:`zoned.net.helper`), on listening sockets the
daemon bound and handed over; it binds nothing and needs no privilege.

Connections (TCP the zone opens to anything, DNAT'ed here by our nftables
table): the original destination comes from ``SO_ORIGINAL_DST``; a CIDR rule
or ``open`` decides at once; otherwise the destination must be pinned (the
resolver answered it to this zone for a name a rule allows on that port).
The upstream connection starts at once and the server's bytes flow as soon
as it is up (server-first protocols work), but the client's bytes wait until
its first bytes are classified: a TLS ClientHello's SNI or an HTTP Host
must name an allowed name pinned to that destination, or the connection is
closed; other protocols have no name and pass on the pin alone.
A policy change re-checks every open connection and closes the ones it no
longer allows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import msgspec
import trio

from zoned.net import dnsfilter, sniff
from zoned.net.accounting import EventLimiter, NetCounters, RefusedEvent, RefusedKind, TokenBucket
from zoned.net.pins import PinTable
from zoned.net.policy import CompiledPolicy, IPAddress, NetPolicy, Publish
from zoned.net.wire import (
    PINS_PER_MESSAGE,
    Counters,
    FromHelper,
    Limits,
    Pin,
    Pinned,
    Refused,
    Setup,
)

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
RELAY_CHUNK = 256 * 1024  # the relay pipes' capacity (F_SETPIPE_SZ)
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
COUNTERS_INTERVAL_S = 1.0
MAX_TCP_DNS_CONNECTIONS = 16


def original_destination(sock: trio.socket.SocketType) -> tuple[IPAddress, int]:
    """Where the zone meant to connect before our DNAT (raises OSError if not DNAT'ed)."""
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return ipaddress.IPv4Address(raw[4:8]), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    return ipaddress.IPv6Address(raw[8:24]), port


def reset_on_close(sock: trio.socket.SocketType) -> None:
    """Make close() send a reset and drop what is still queued (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _upstream_address(text: str) -> tuple[str, int]:
    host, _, port = text.partition("#")
    return str(ipaddress.ip_address(host)), int(port or 53)


@dataclass(eq=False)
class _Connection:
    destination: IPAddress
    port: int
    scope: trio.CancelScope
    # Names the connection relies on (pinned and allowed); empty for CIDR/open.
    names: set[str] = field(default_factory=set)
    claimed: str | None = None  # the SNI/Host it sent, once sniffed
    by_name: bool = False
    # Closed by a policy change: reset, not a graceful close (a slow reader
    # would otherwise keep receiving what is still buffered for it).
    revoked: bool = False


class ZoneEngine:
    """The resolver and proxy of one zone (see the module docstring)."""

    def __init__(
        self,
        setup: Setup,
        *,
        proxy: list[trio.socket.SocketType],
        dns_udp: list[trio.socket.SocketType],
        dns_tcp: list[trio.socket.SocketType],
        publish: list[trio.socket.SocketType],
        emit: Callable[[FromHelper], None],
    ) -> None:
        self.zone = setup.zone
        self.addressing = setup.addressing
        self.limits: Limits = setup.limits
        self.extra_refused = setup.extra_refused
        self.policy = CompiledPolicy(setup.policy, self.extra_refused)
        self.upstream = [_upstream_address(u) for u in setup.upstream_dns]
        self.guests = {
            ipaddress.ip_address(setup.addressing.guest_v4),
            ipaddress.ip_address(setup.addressing.guest_v6),
        }
        self.proxy_listeners = proxy
        self.dns_udp = dns_udp
        self.dns_tcp = dns_tcp
        self.publishes = list(zip(setup.publishes, publish, strict=True))
        self.emit = emit
        now = time.monotonic()
        self.pins = PinTable(max_entries=self.limits.pin_entries)
        self.counters = NetCounters()
        self.events = EventLimiter(self.limits.event_rate, 20, now)
        self.connect_bucket = TokenBucket(
            self.limits.connect_rate, 2 * self.limits.connect_rate, now
        )
        self.dns_bucket = TokenBucket(self.limits.dns_rate, 2 * self.limits.dns_rate, now)
        self.dns_inflight = 0
        self._log_bucket = TokenBucket(0.1, 5, now)
        self.tcp_dns_connections = 0
        self.connections: set[_Connection] = set()
        self._publish_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # -- control --------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for listener in self.proxy_listeners:
                nursery.start_soon(self._accept_loop, listener, self._proxy_connection)
            for sock in self.dns_udp:
                nursery.start_soon(self._dns_udp_loop, sock)
            for listener in self.dns_tcp:
                nursery.start_soon(self._accept_loop, listener, self._dns_tcp_connection)
            nursery.start_soon(self._counters_loop)
            self._start_publishes()
            task_status.started()

    def seed_pins(self, pins: list[Pin]) -> None:
        """Pins the zone's previous helper recorded (the daemon kept them)."""
        for pin in pins:
            try:
                addr = ipaddress.ip_address(pin.address)
            except ValueError:
                continue
            self.pins.record_until(pin.name, addr, pin.expires)

    def set_policy(self, policy: NetPolicy) -> int:
        """Apply a new policy to new connections at once; close the open ones it refuses."""
        self.policy = CompiledPolicy(policy, self.extra_refused)
        now = time.monotonic()
        closed = 0
        for conn in list(self.connections):
            if not self._still_allowed(conn, now):
                conn.revoked = True
                conn.scope.cancel()
                closed += 1
        return closed

    def set_publishes(
        self, publishes: list[Publish], sockets: list[trio.socket.SocketType]
    ) -> None:
        # The old listeners are closed by their task as it ends (closing them
        # here would raise in the accept calls instead of cancelling them).
        if self._publish_scope is not None:
            self._publish_scope.cancel()
        self.publishes = list(zip(publishes, sockets, strict=True))
        self._start_publishes()

    def _start_publishes(self) -> None:
        if self._nursery is None or not self.publishes:
            return
        self._nursery.start_soon(self._run_publishes, self.publishes)

    async def _run_publishes(self, publishes: list[tuple[Publish, trio.socket.SocketType]]) -> None:
        try:
            with trio.CancelScope() as scope:
                self._publish_scope = scope
                async with trio.open_nursery() as nursery:
                    for publish, listener in publishes:
                        nursery.start_soon(
                            self._accept_loop, listener, self._publish_handler(publish)
                        )
        finally:
            for _, listener in publishes:
                listener.close()

    # -- shared ---------------------------------------------------------

    def refuse(
        self,
        kind: RefusedKind,
        destination: str,
        rule: str,
        *,
        port: int = 0,
        name: str = "",
        protocol: str = "tcp",
    ) -> None:
        now = time.time()
        event = RefusedEvent(
            time=now,
            kind=kind,
            destination=destination,
            port=port,
            protocol=protocol,
            name=name,
            rule=rule,
        )
        admitted = self.events.admit(event, time.monotonic(), self.counters)
        if admitted is not None:
            self.emit(Refused(event=admitted))

    def _log_failure(self, what: str) -> None:
        """Log an unexpected failure with its traceback, at most a few a minute.

        Its cause may be the zone's input: a zone that finds a way to make the
        handler fail must not fill the host's log.
        """
        if self._log_bucket.take(time.monotonic()):
            log.exception("zone %s: %s", self.zone, what)

    async def _counters_loop(self) -> None:
        last: bytes = b""
        while True:
            await trio.sleep(COUNTERS_INTERVAL_S)
            self.pins.expire(time.monotonic())
            snapshot = Counters(
                counters=msgspec.structs.replace(self.counters), pins=len(self.pins)
            )
            encoded = repr(snapshot).encode()
            if encoded != last:
                self.emit(snapshot)
                last = encoded

    async def _accept_loop(
        self,
        listener: trio.socket.SocketType,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        await trio.sleep(0.1)  # out of descriptors: let connections finish
                        continue
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue
                    raise
                nursery.start_soon(self._guarded, handler, trio.SocketStream(sock))

    async def _guarded(
        self, handler: Callable[[trio.SocketStream], Awaitable[None]], stream: trio.SocketStream
    ) -> None:
        """One connection's handler; its bug or its peer's garbage never ends the helper."""
        try:
            await handler(stream)
        except Exception:
            self._log_failure("connection handler failed")
            with contextlib.suppress(Exception):
                await stream.aclose()

    # -- the proxy ------------------------------------------------------

    def _still_allowed(self, conn: _Connection, now: float) -> bool:
        decision = self.policy.address_decision(conn.destination, conn.port, "tcp")
        if decision is not None:
            return decision.allowed
        if not conn.by_name:
            return False
        if conn.claimed is not None:
            return self.policy.name_rule_for(conn.claimed, conn.port).allowed
        return any(self.policy.name_rule_for(n, conn.port).allowed for n in conn.names)

    async def _proxy_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            sock = stream.socket
            try:
                peer = ipaddress.ip_address(sock.getpeername()[0])
                dest, port = original_destination(sock)
            except OSError:
                return  # not a DNAT'ed connection: nftables lets none through, drop it
            if peer not in self.guests:
                self.refuse("connect", str(dest), "spoofed-source", port=port)
                return
            now = time.monotonic()
            if len(self.connections) >= self.limits.max_connections or not self.connect_bucket.take(
                now
            ):
                self.counters.connections_refused += 1
                self.refuse("limit", str(dest), "connection-limit", port=port)
                return
            decision = self.policy.address_decision(dest, port, "tcp")
            names: set[str] = set()
            if decision is None:
                pinned = self.pins.names_for(dest, now)
                names = {n for n in pinned if self.policy.name_rule_for(n, port).allowed}
                if not names:
                    why = "not-resolved" if not pinned else "port-not-allowed"
                    self.counters.connections_refused += 1
                    self.refuse("connect", str(dest), why, port=port, name=",".join(sorted(pinned)))
                    return
            elif not decision.allowed:
                self.counters.connections_refused += 1
                self.refuse("connect", str(dest), decision.rule, port=port)
                return
            with trio.CancelScope() as scope:
                conn = _Connection(dest, port, scope, names, by_name=decision is None)
                self.connections.add(conn)
                self.counters.connections_active += 1
                try:
                    await self._relay_proxied(stream, conn)
                finally:
                    self.connections.discard(conn)
                    self.counters.connections_active -= 1
            if conn.revoked:
                reset_on_close(sock)

    async def _relay_proxied(self, client: trio.SocketStream, conn: _Connection) -> None:
        """Connect upstream at once; let the client's bytes through once its claim is checked."""
        upstream: list[trio.SocketStream] = []
        connected = trio.Event()

        async def connect_and_pump_down(nursery: trio.Nursery) -> None:
            try:
                with trio.fail_after(self.limits.connect_timeout_s):
                    stream = await trio.open_tcp_stream(str(conn.destination), conn.port)
            except (OSError, trio.TooSlowError):
                nursery.cancel_scope.cancel()
                return
            upstream.append(stream)
            connected.set()
            # Server-first protocols (SSH, SMTP) speak before the client does.
            await self._pump_or_cancel(stream.socket, client.socket, False, nursery)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connect_and_pump_down, nursery)
                first = await self._first_bytes(client, conn) if conn.by_name else bytearray()
                if first is None:
                    nursery.cancel_scope.cancel()
                    return
                self.counters.connections_allowed += 1
                await connected.wait()
                if first:
                    await upstream[0].send_all(bytes(first))
                    self.counters.bytes_out += len(first)
                await self._pump_or_cancel(client.socket, upstream[0].socket, True, nursery)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            for stream in upstream:
                if conn.revoked:
                    reset_on_close(stream.socket)
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _first_bytes(self, client: trio.SocketStream, conn: _Connection) -> bytearray | None:
        """The client's first bytes once they are classified and allowed; None: refused."""
        first = bytearray()
        chunk = await client.receive_some(sniff.MAX_SNIFF_BYTES)
        if not chunk:
            return None
        first += chunk
        verdict = sniff.sniff(bytes(first))
        with trio.move_on_after(self.limits.sniff_timeout_s):
            while verdict.kind is sniff.Kind.NEED_MORE and len(first) < sniff.MAX_SNIFF_BYTES:
                chunk = await client.receive_some(sniff.MAX_SNIFF_BYTES - len(first))
                if not chunk:
                    return None
                first += chunk
                verdict = sniff.sniff(bytes(first))
        if verdict.kind is sniff.Kind.NEED_MORE:
            self._refuse_claim(conn, "sniff-timeout", None)
            return None
        return first if self._claim_ok(conn, verdict) else None

    def _claim_ok(self, conn: _Connection, verdict: sniff.Sniffed) -> bool:
        if verdict.kind in (sniff.Kind.OTHER,):
            return True
        if verdict.kind is sniff.Kind.MALFORMED:
            self._refuse_claim(conn, "malformed-" + ("hello" if verdict.why else "head"), None)
            return False
        if verdict.name is None:
            self._refuse_claim(
                conn, "no-name" if verdict.literal is None else "address-literal", verdict.literal
            )
            return False
        name = verdict.name
        now = time.monotonic()
        if not self.policy.name_rule_for(name, conn.port).allowed:
            self._refuse_claim(
                conn,
                "sni-not-allowed" if verdict.kind is sniff.Kind.TLS else "host-not-allowed",
                name,
            )
            return False
        if not self.pins.pinned(name, conn.destination, now):
            self._refuse_claim(
                conn, "sni-mismatch" if verdict.kind is sniff.Kind.TLS else "host-mismatch", name
            )
            return False
        conn.claimed = name
        return True

    def _refuse_claim(self, conn: _Connection, why: str, name: str | None) -> None:
        self.counters.connections_refused += 1
        self.refuse("sni", str(conn.destination), why, port=conn.port, name=name or "")

    async def _pump_or_cancel(
        self,
        src: trio.socket.SocketType,
        dst: trio.socket.SocketType,
        outbound: bool,
        nursery: trio.Nursery,
    ) -> None:
        """Relay one direction to its end of file, then half-close; an error ends both."""
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep 64 KiB
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, RELAY_CHUNK)
        try:
            while True:
                moved = await self._splice_once(src, dst, read_end, write_end)
                if moved == 0:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                if outbound:
                    self.counters.bytes_out += moved
                else:
                    self.counters.bytes_in += moved
        except (OSError, TimeoutError):
            nursery.cancel_scope.cancel()
        finally:
            os.close(read_end)
            os.close(write_end)

    async def _splice(self, a: trio.SocketStream, b: trio.SocketStream) -> None:
        """Relay both ways until both ends are done; bytes move in the kernel (splice)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_or_cancel, a.socket, b.socket, True, nursery)
            nursery.start_soon(self._pump_or_cancel, b.socket, a.socket, False, nursery)

    async def _splice_once(
        self,
        src: trio.socket.SocketType,
        dst: trio.socket.SocketType,
        read_end: int,
        write_end: int,
    ) -> int:
        """Move one pipeful from ``src`` to ``dst``: its size, 0 at end of file."""
        await trio.lowlevel.checkpoint()
        while True:
            try:
                moved = os.splice(src.fileno(), write_end, RELAY_CHUNK, flags=_SPLICE_FLAGS)
                break
            except BlockingIOError:
                with trio.move_on_after(self.limits.idle_timeout_s) as idle:
                    await trio.lowlevel.wait_readable(src)
                if idle.cancelled_caught:
                    raise TimeoutError("idle connection") from None
        left = moved
        while left:
            try:
                left -= os.splice(read_end, dst.fileno(), left, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst)
        return moved

    # -- publishes ------------------------------------------------------

    def _publish_handler(self, publish: Publish) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                if len(self.connections) >= self.limits.max_connections:
                    return
                guest = self.addressing.guest_v4
                try:
                    with trio.fail_after(self.limits.connect_timeout_s):
                        upstream = await trio.open_tcp_stream(
                            guest, publish.zone_port, local_address=self.addressing.host_v4
                        )
                except (OSError, trio.TooSlowError):
                    return
                with trio.CancelScope() as scope:
                    conn = _Connection(ipaddress.ip_address(guest), publish.zone_port, scope)
                    self.connections.add(conn)
                    try:
                        async with upstream:
                            # Inbound: bytes from the host are "in" to the zone.
                            await self._splice(upstream, stream)
                    finally:
                        self.connections.discard(conn)

        return handle

    # -- the resolver ---------------------------------------------------

    def _dns_admit(self, source: str) -> bool:
        try:
            if ipaddress.ip_address(source) not in self.guests:
                self.counters.dns_dropped += 1
                return False
        except ValueError:
            return False
        if not self.dns_bucket.take(time.monotonic()):
            self.counters.dns_dropped += 1
            return False
        return True

    async def _dns_udp_loop(self, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                wire, source = await sock.recvfrom(dnsfilter.MAX_QUERY_BYTES + 1)
                if not self._dns_admit(source[0]):
                    continue
                if self.dns_inflight >= self.limits.dns_inflight:
                    self.counters.dns_dropped += 1
                    continue
                self.dns_inflight += 1
                nursery.start_soon(self._dns_udp_one, sock, wire, source)

    async def _dns_udp_one(
        self, sock: trio.socket.SocketType, wire: bytes, source: tuple[str, int]
    ) -> None:
        try:
            reply = await self._resolve(wire, udp=True)
            if reply is not None:
                with contextlib.suppress(OSError):
                    await sock.sendto(reply, source)
        except Exception:
            self._log_failure("DNS query failed")
        finally:
            self.dns_inflight -= 1

    async def _dns_tcp_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            peer = stream.socket.getpeername()[0]
            if self.tcp_dns_connections >= MAX_TCP_DNS_CONNECTIONS:
                return
            self.tcp_dns_connections += 1
            try:
                buffer = bytearray()
                while True:
                    with trio.move_on_after(10):
                        while len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(
                            buffer[:2], "big"
                        ):
                            chunk = await stream.receive_some(4096)
                            if not chunk:
                                return
                            buffer += chunk
                            if len(buffer) > dnsfilter.MAX_QUERY_BYTES + 2:
                                return
                    if len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(buffer[:2], "big"):
                        return
                    length = int.from_bytes(buffer[:2], "big")
                    wire, buffer = bytes(buffer[2 : 2 + length]), buffer[2 + length :]
                    if not self._dns_admit(peer):
                        return
                    reply = await self._resolve(wire, udp=False)
                    if reply is None:
                        return
                    await stream.send_all(len(reply).to_bytes(2, "big") + reply)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                self.tcp_dns_connections -= 1

    async def _resolve(self, wire: bytes, *, udp: bool) -> bytes | None:
        try:
            query = dnsfilter.parse_query(wire)
        except dnsfilter.BadQuery:
            self.counters.dns_dropped += 1
            return None
        limit = query.max_udp if udp else dnsfilter.MAX_ANSWER_BYTES
        decided = dnsfilter.decide(self.policy, query)
        if not decided.forward:
            assert decided.local is not None
            if decided.local.rcode() == dns.rcode.NXDOMAIN:
                self.counters.dns_refused += 1
                self.refuse("dns", query.name, decided.rule, protocol="dns", name=query.name)
            else:
                self.counters.dns_answered += 1
            return dnsfilter.to_wire(decided.local, limit)
        answer = await self._ask_upstream(query)
        if answer is None:
            self.counters.dns_answered += 1
            servfail = dns.message.make_response(query.message)
            servfail.set_rcode(dns.rcode.SERVFAIL)
            return dnsfilter.to_wire(servfail, limit)
        filtered = dnsfilter.filter_answer(self.policy, self.pins, query, answer)
        for addr, why in filtered.refused[:1]:
            self.refuse("rebinding", str(addr), why, protocol="dns", name=query.name)
        if filtered.refused and not filtered.pinned:
            self.counters.dns_refused += 1
        else:
            self.counters.dns_answered += 1
        if filtered.pinned:
            now = time.monotonic()
            self.pins.record(filtered.names, filtered.pinned, now)
            pins = [
                Pin(str(addr), name, now + self.pins.lifetime(ttl))
                for addr, ttl in filtered.pinned
                for name in filtered.names
            ]
            self.emit(Pinned(pins=pins[:PINS_PER_MESSAGE]))
        return dnsfilter.to_wire(filtered.response, limit)

    async def _ask_upstream(self, query: dnsfilter.Query) -> dns.message.Message | None:
        sent = dnsfilter.upstream_query(query)
        wire = sent.to_wire()
        for host, port in self.upstream:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with trio.move_on_after(self.limits.upstream_dns_timeout_s):
                try:
                    answer = await self._udp_exchange(family, host, port, sent, wire)
                    if answer is not None and answer.flags & dns.flags.TC:
                        answer = await self._tcp_exchange(family, host, port, sent, wire)
                    if answer is not None:
                        return answer
                except (OSError, dnsfilter.BadQuery):
                    continue
        return None

    async def _udp_exchange(
        self, family: int, host: str, port: int, sent: dns.message.Message, wire: bytes
    ) -> dns.message.Message | None:
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.connect((host, port))
            await sock.send(wire)
            for _ in range(8):  # stray datagrams on our port: a few, then give up
                data = await sock.recv(dnsfilter.MAX_ANSWER_BYTES)
                try:
                    return dnsfilter.parse_upstream(sent, data)
                except dnsfilter.BadQuery:
                    continue
        return None

    async def _tcp_exchange(
        self, family: int, host: str, port: int, sent: dns.message.Message, wire: bytes
    ) -> dns.message.Message | None:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(len(wire).to_bytes(2, "big") + wire)
            buffer = bytearray()
            while len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(buffer[:2], "big"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                buffer += chunk
            length = int.from_bytes(buffer[:2], "big")
            return dnsfilter.parse_upstream(sent, bytes(buffer[2 : 2 + length]))
