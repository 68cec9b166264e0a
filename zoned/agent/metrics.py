"""What the agent reports about its guest with each heartbeat: uptime, load, memory, processes.

Read from /proc on every call (cheap, and always current). Imported with the
first heartbeat, after the hello (like :mod:`zoned.protocol`, which the reply
is built with); the hello's own facts are :func:`zoned.agent.channel.hello_frame`'s.
"""

from __future__ import annotations

import os

from zoned.agent.system import uptime_s

# Not typing.TYPE_CHECKING (see zoned.agent.system).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from zoned.protocol import HeartbeatReply


def load1() -> float:
    with open("/proc/loadavg", "rb") as f:
        return float(f.read().split()[0])


def meminfo_kib(keys: tuple[bytes, ...] = (b"MemTotal", b"MemAvailable")) -> tuple[int, ...]:
    """The /proc/meminfo figures named by ``keys``, in KiB (0 for one that is absent)."""
    found = dict.fromkeys(keys, 0)
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            if key in found:
                found[key] = int(rest.split()[0])
    return tuple(found[key] for key in keys)


def memory_report(what: str) -> str:
    """The console line for an OOM kill: what was killed and where the guest's RAM
    went; tmpfs (``Shmem``) holds the files written to the workload root and /tmp.
    The host reads it after a guest that ran out of memory panicked
    (zoned.failures); keep its shape."""
    try:
        total, available, shmem = meminfo_kib((b"MemTotal", b"MemAvailable", b"Shmem"))
    except (OSError, ValueError, IndexError):
        return f"out of memory: {what} was killed"
    return (
        f"out of memory: {what} was killed; guest RAM {total // 1024} MiB,"
        f" {available // 1024} MiB available, {shmem // 1024} MiB in tmpfs"
    )


def process_count() -> int:
    """Processes in the guest (numeric entries of /proc); 0 when /proc is absent."""
    try:
        return sum(1 for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return 0


def heartbeat_reply(seq: int) -> HeartbeatReply:
    """The reply to heartbeat ``seq``, with the guest's figures now."""
    from zoned.protocol import HeartbeatReply

    total, available = meminfo_kib()
    return HeartbeatReply(
        seq=seq,
        uptime_s=uptime_s(),
        load1=load1(),
        mem_total_kib=total,
        mem_available_kib=available,
        processes=process_count(),
    )
