"""The zone's network as its workloads see it: IPv6 and ``/etc/resolv.conf``.

The kernel brings the NIC up with IPv4 before init (``ip=`` on its command
line, which the daemon appends; callers cannot). The rest is the agent's,
once, before any workload starts (:func:`set_up_network`, called when the
workload root is mounted):

- IPv6 when the command line carries ``zoned.ip6=ADDRESS/PREFIX,GATEWAY``:
  the address on ``eth0`` (no duplicate address detection: the host end is
  the only other node on the link), a default route through the gateway, and
  no router advertisements or autoconfiguration believed. ioctls, no
  netlink: there is no ``ip`` in the agent's image.
- ``/etc/resolv.conf`` in the workload root naming the zone's resolver (the
  ``ip=`` argument's DNS server: the host end of the link, where zoned
  answers only the names the zone's policy allows). Written fresh, never
  through a link the image may hold there.

A zone without a network has no ``ip=``: nothing happens. What this module
sets up is convenience for the workload: the policy is enforced on the host,
whatever the guest configures.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

from zoned.agent.system import console, libc

DEVICE = "eth0"
RESOLV_OPTIONS = "options edns0 timeout:2 attempts:2"

# sys/socket.h, linux/sockios.h, linux/route.h
_AF_INET6 = 10
_SOCK_DGRAM = 2
_SOCK_CLOEXEC = 0o2000000
_SIOCSIFADDR = 0x8916
_SIOCADDRT = 0x890B
_RTF_UP = 0x1
_RTF_GATEWAY = 0x2


class ZoneNet:
    """What the kernel command line says about the zone's network."""

    def __init__(self, resolver: str, ipv6: tuple[bytes, int, bytes] | None) -> None:
        self.resolver = resolver
        # (address, prefix length, gateway), addresses as 16 bytes.
        self.ipv6 = ipv6


def _ipv4_text(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts)


def _ipv6_bytes(text: str) -> bytes | None:
    import _socket

    try:
        return _socket.inet_pton(_AF_INET6, text)
    except (OSError, ValueError):
        return None


def zone_network(cmdline: str) -> ZoneNet | None:
    """The zone's network from the kernel command line (None: it has none)."""
    resolver = ""
    ipv6: tuple[bytes, int, bytes] | None = None
    for word in cmdline.split():
        if word.startswith("ip="):
            fields = word[3:].split(":")
            if len(fields) >= 8 and _ipv4_text(fields[7]):
                resolver = fields[7]
        elif word.startswith("zoned.ip6="):
            address_text, _, gateway_text = word[len("zoned.ip6=") :].partition(",")
            address_part, _, prefix_text = address_text.partition("/")
            address, gateway = _ipv6_bytes(address_part), _ipv6_bytes(gateway_text)
            if address and gateway and prefix_text.isdigit() and 1 <= int(prefix_text) <= 128:
                ipv6 = (address, int(prefix_text), gateway)
    if not resolver:
        return None
    return ZoneNet(resolver, ipv6)


def resolv_conf(resolver: str) -> str:
    """The workload's /etc/resolv.conf (``zoned.net.addressing.resolv_conf`` says the same)."""
    return f"nameserver {resolver}\n{RESOLV_OPTIONS}\n"


def write_resolv_conf(root: str, resolver: str) -> None:
    """``<root>/etc/resolv.conf`` replaced by a fresh file; links are not followed."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir("etc", 0o755, dir_fd=root_fd)
        etc_fd = os.open("etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("resolv.conf", dir_fd=etc_fd)
            fd = os.open(
                "resolv.conf",
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=etc_fd,
            )
            try:
                os.write(fd, resolv_conf(resolver).encode())
            finally:
                os.close(fd)
        finally:
            os.close(etc_fd)
    finally:
        os.close(root_fd)


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
    except OSError as exc:
        console(f"cannot set {path}: {exc}")


def configure_ipv6(address: bytes, prefix: int, gateway: bytes, device: str = DEVICE) -> None:
    """The zone's IPv6 address on ``device`` and its default route (ioctls)."""
    for name in ("accept_ra", "autoconf", "accept_dad"):
        _write_sysctl(f"net/ipv6/conf/{device}/{name}", "0")
    with open(f"/sys/class/net/{device}/ifindex") as f:
        ifindex = int(f.read())
    lib = libc()
    fd = lib.socket(_AF_INET6, _SOCK_DGRAM | _SOCK_CLOEXEC, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "socket(AF_INET6)")
    try:
        # struct in6_ifreq: the address, the prefix length (u32), the ifindex (int).
        ifreq = bytearray(address + prefix.to_bytes(4, "little") + ifindex.to_bytes(4, "little"))
        if lib.ioctl(fd, _SIOCSIFADDR, (ctypes.c_char * len(ifreq)).from_buffer(ifreq)) != 0:
            code = ctypes.get_errno()
            if code != errno.EEXIST:  # a second set-up after a reconnect
                raise OSError(code, "SIOCSIFADDR")
        # struct in6_rtmsg (x86_64): dst, src, gateway (16 each), type (u32),
        # dst_len, src_len (u16), metric (u32), padding, info (unsigned
        # long), flags (u32), ifindex (int): 80 bytes.
        route = bytearray(80)
        route[32:48] = gateway
        route[56:60] = (1).to_bytes(4, "little")
        route[72:76] = (_RTF_UP | _RTF_GATEWAY).to_bytes(4, "little")
        route[76:80] = ifindex.to_bytes(4, "little")
        if lib.ioctl(fd, _SIOCADDRT, (ctypes.c_char * len(route)).from_buffer(route)) != 0:
            code = ctypes.get_errno()
            if code != errno.EEXIST:
                raise OSError(code, "SIOCADDRT")
    finally:
        os.close(fd)


def set_up_network(root: str, cmdline_path: str = "/proc/cmdline") -> None:
    """IPv6 and resolv.conf for a networked zone; failures go to the console."""
    try:
        with open(cmdline_path) as f:
            net = zone_network(f.read())
    except OSError:
        return
    if net is None:
        return
    if net.ipv6 is not None:
        try:
            configure_ipv6(*net.ipv6)
        except OSError as exc:
            console(f"cannot configure IPv6: {exc}")
    try:
        write_resolv_conf(root or "/", net.resolver)
    except OSError as exc:
        console(f"cannot write the workload's /etc/resolv.conf: {exc}")
