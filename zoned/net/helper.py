"""A zone's network helper: the process that parses the zone's DNS and TCP bytes.

``python -m zoned.net.helper --control-fd N --uid U --gid G --owner TAG --zone Z``

Started by the daemon (:mod:`zoned.net.host`) with a SOCK_SEQPACKET control
socket; it asks for SIGKILL when the daemon dies, drops to its own uid/gid
(one per zone: a helper taken over by a hostile zone cannot signal, trace or
read another zone's helper), sets no_new_privs and resource limits (file
descriptors bound the connections), then waits for :class:`wire.Setup` with
its listening sockets and serves until the daemon says :class:`wire.Stop` or
hangs up. It never binds or opens anything but outbound connections and
datagrams; if it dies, the zone's DNAT'ed traffic meets closed ports: the
network stops, it never falls open.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import importlib
import logging
import os
import resource
import signal
import socket
import sys
import time

import dns.edns
import dns.message
import msgspec
import trio

from zoned.net import wire
from zoned.net.engine import ZoneEngine

log = logging.getLogger("zoned.net.helper")

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
MARKER = "zoned.net.helper"


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def preload() -> None:
    """Import now what would be imported lazily later, while the files are still readable.

    After :func:`drop_privileges` the interpreter's own tree may be closed to
    us (a venv under /root); dnspython loads its record types on first use.
    """
    importlib.import_module("encodings.idna")
    # Every record type dnspython knows, so any upstream answer parses.
    for package in ("dns.rdtypes.ANY", "dns.rdtypes.IN"):
        for module in importlib.import_module(package).__all__:
            importlib.import_module(f"{package}.{module}")
    query = dns.message.make_query("a.example", "A", use_edns=0)
    query.use_edns(0, options=[dns.edns.EDEOption(dns.edns.EDECode.BLOCKED, "x")])
    dns.message.from_wire(query.to_wire())
    "pre.example".encode("idna")


def drop_privileges(uid: int, gid: int, max_files: int) -> None:
    if os.getuid() == 0 or os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def receive(sock: socket.socket) -> tuple[wire.ToHelper, list[int]]:
    """One control message and the descriptors that came with it (blocking)."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(
        wire.MAX_MESSAGE, socket.CMSG_SPACE(wire.MAX_FDS * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        raise EOFError("control socket closed")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise ValueError("truncated control message")
    return wire.decode_to_helper(data), list(fds)


def _sockets(fds: list[int], indices: list[int], kind: int) -> list[trio.socket.SocketType]:
    return [trio.socket.from_stdlib_socket(socket.socket(fileno=fds[i])) for i in indices]


async def serve(
    control: socket.socket, setup: wire.Setup, fds: list[int], pins: list[wire.Pin]
) -> None:
    control.setblocking(False)
    ctl = trio.socket.from_stdlib_socket(control)
    send_channel, receive_channel = trio.open_memory_channel[wire.FromHelper](1024)

    def emit(message: wire.FromHelper) -> None:
        # The daemon is not reading: counters catch up on the next tick.
        with contextlib.suppress(trio.WouldBlock):
            send_channel.send_nowait(message)

    engine = ZoneEngine(
        setup,
        proxy=_sockets(fds, setup.proxy_fds, socket.SOCK_STREAM),
        dns_udp=_sockets(fds, setup.dns_udp_fds, socket.SOCK_DGRAM),
        dns_tcp=_sockets(fds, setup.dns_tcp_fds, socket.SOCK_STREAM),
        publish=_sockets(fds, setup.publish_fds, socket.SOCK_STREAM),
        emit=emit,
    )

    engine.seed_pins(pins)

    async def sender() -> None:
        async for message in receive_channel:
            await ctl.send(wire.encode(message))

    async def controller(nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(ctl)
            try:
                message, new_fds = receive(control)
            except BlockingIOError:
                continue
            except EOFError:
                nursery.cancel_scope.cancel()
                return
            if isinstance(message, wire.Stop):
                nursery.cancel_scope.cancel()
                return
            if isinstance(message, wire.SetPolicy):
                closed = engine.set_policy(message.policy)
                emit(wire.Applied(seq=message.seq, closed=closed))
            elif isinstance(message, wire.GetCounters):
                engine.pins.expire(time.monotonic())
                counters = msgspec.structs.replace(engine.counters)
                emit(wire.Counters(counters=counters, pins=len(engine.pins), seq=message.seq))
            elif isinstance(message, wire.SetPublishes):
                engine.set_publishes(
                    message.publishes, _sockets(new_fds, message.publish_fds, socket.SOCK_STREAM)
                )
                emit(wire.Applied(seq=message.seq))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await nursery.start(engine.run)
        emit(wire.Ready(pid=os.getpid()))
        nursery.start_soon(controller, nursery)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MARKER)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--owner", required=True)  # marks our helpers for reclaim
    parser.add_argument("--zone", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{MARKER}[{args.zone}] %(message)s")
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args.parent:
        return 1  # the daemon died before we could ask to follow it
    control = socket.socket(fileno=args.control_fd)
    try:
        message, fds = receive(control)
    except (EOFError, OSError, ValueError, msgspec.DecodeError) as exc:
        print(f"{MARKER}: no setup: {exc}", file=sys.stderr)
        return 1
    if not isinstance(message, wire.Setup):
        print(f"{MARKER}: first message is {type(message).__name__}, not setup", file=sys.stderr)
        return 1
    seeds: list[wire.SeedPins] = []
    try:
        for _ in range(message.seed_messages):
            seed, _ = receive(control)
            if isinstance(seed, wire.SeedPins):
                seeds.append(seed)
    except (EOFError, OSError, ValueError, msgspec.DecodeError) as exc:
        print(f"{MARKER}: no pins: {exc}", file=sys.stderr)
        return 1
    limits = message.limits
    # Per connection: two sockets and two pipes (the splice relay).
    max_files = 6 * limits.max_connections + 2 * limits.dns_inflight + 96 + len(fds)
    preload()
    os.chdir("/")
    drop_privileges(args.uid, args.gid, max_files)
    trio.run(serve, control, message, fds, [pin for seed in seeds for pin in seed.pins])
    return 0


if __name__ == "__main__":
    sys.exit(main())
