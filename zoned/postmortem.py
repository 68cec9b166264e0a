"""What a failed zone left behind, read for :mod:`zoned.failures` (IO shell).

Blocking: run in a worker thread. Every read is bounded (the tails of the
console log and of libvirt's log of the domain's QEMU; the host's kernel
log holds what its ring buffer holds) and none follows a symbolic link: the
console log's directory is zoned's, but its contents are the guest's.

The host's kernel log (``/dev/kmsg``) is read where it is readable: as root
outside systemd, or under a unit that grants ``CAP_SYSLOG`` and leaves
``ProtectKernelLogs`` off (the shipped ``zoned.service`` does not: there,
a QEMU the host's OOM killer took shows as a crashed QEMU).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from zoned.failures import CONSOLE_TAIL_BYTES, QEMU_LOG_TAIL_BYTES, Evidence, Observed
from zoned.records import ZoneRecord

log = logging.getLogger(__name__)

KMSG: Final = Path("/dev/kmsg")
#: Lines of the host kernel's log kept per failure (the latest).
MAX_HOST_LINES: Final = 16
#: Records of /dev/kmsg read at most (its ring buffer holds fewer on any usual host).
MAX_KMSG_RECORDS: Final = 200_000


def read_tail(path: Path, size: int) -> bytes:
    """The last ``size`` bytes of a regular file; b"" if it is missing, a link or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b""
        offset = max(0, info.st_size - size)
        return os.pread(fd, size, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)


def kmsg_messages(kmsg: Path = KMSG) -> Iterator[tuple[float, str]]:
    """(seconds since boot, message) of every message in the host kernel's ring
    buffer, oldest first (none if unreadable)."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("host kernel log unreadable: %s", exc)
        return
    try:
        for _ in range(MAX_KMSG_RECORDS):
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while we read: go on
                    continue
                return
            if not record:
                return
            parsed = parse_kmsg_record(record)
            if parsed is not None:
                yield parsed
    finally:
        os.close(fd)


def parse_kmsg_record(record: bytes) -> tuple[float, str] | None:
    """(seconds since boot, message) of one /dev/kmsg record, None if it is not one.

    A record is ``<prio>,<seq>,<usec>,<flags>[,...];<message>`` and a newline,
    then continuation lines `` KEY=value`` (Documentation/ABI/testing/dev-kmsg).
    """
    header, _, rest = record.partition(b";")
    fields = header.split(b",")
    if not rest or len(fields) < 4 or not fields[2].isdigit():
        return None
    return int(fields[2]) / 1e6, rest.split(b"\n", 1)[0].decode("utf-8", errors="replace")


def host_kernel_lines(
    domain_name: str,
    qemu_pid: int | None,
    since_s: float,
    messages: Iterator[tuple[float, str]],
) -> tuple[str, ...]:
    """The OOM killer's messages since ``since_s`` (seconds since boot) that name
    this domain's QEMU: its memory cgroup (libvirt's ``qemu-<id>-<domain>.libvirt-qemu``)
    or, when known, its pid."""
    cgroup = f"-{domain_name}.libvirt-qemu,"
    killed = f"Killed process {qemu_pid} (qemu" if qemu_pid is not None else None
    found = [
        message
        for at, message in messages
        if at >= since_s
        and (
            (message.startswith("oom-kill:") and cgroup in message)
            or (killed is not None and killed in message)
        )
    ]
    return tuple(found[-MAX_HOST_LINES:])


def _since_boot(wall_time: float) -> float:
    """``wall_time`` as seconds since the host booted (the kernel log's clock),
    a little earlier to allow for the clocks' drift."""
    return wall_time - (time.time() - time.monotonic()) - 5.0


def gather(
    record: ZoneRecord,
    *,
    observed: Observed,
    detail: str,
    stop: str,
    running_state: str,
    qemu_pid: int | None,
    qemu_log_dir: Path,
    boot_timeout_s: float,
    silence_limit_s: float,
    kmsg: Path = KMSG,
) -> Evidence:
    """Read what the zone left behind into :class:`Evidence`. Blocking."""
    return Evidence(
        observed=observed,
        detail=detail,
        stop=stop,
        running_state=running_state,
        console_tail=read_tail(Path(record.console_log), CONSOLE_TAIL_BYTES),
        qemu_log_tail=read_tail(qemu_log_dir / f"{record.domain_name}.log", QEMU_LOG_TAIL_BYTES),
        host_kernel_lines=host_kernel_lines(
            record.domain_name, qemu_pid, _since_boot(record.created_at), kmsg_messages(kmsg)
        ),
        booted=record.ready_at is not None,
        memory_mib=record.memory_mib,
        qemu_memory_limit_mib=record.memory_hard_limit_mib,
        boot_timeout_s=boot_timeout_s,
        silence_limit_s=silence_limit_s,
    )
