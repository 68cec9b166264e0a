"""Watch the host for CPUs going online or offline (IO shell over pyudev, for trio).

The kernel announces CPU hotplug with uevents on the ``cpu`` subsystem:
action ``online``/``offline``, or ``change`` on some paths (then the CPU's
``online`` attribute says which). :func:`watch_cpu_events` turns them into
:class:`CpuEvent` values on a trio channel.

Events are hints: the consumer should re-read the topology
(:func:`zoned.topology.read_host_topology`) and hand it to
:meth:`zoned.placement.Allocator.update_topology`, not trust the event alone.
A synthetic uevent (``echo online > /sys/devices/system/cpu/cpu1/uevent``)
produces an event without any state change.

Event source: udevd re-broadcasts kernel uevents after processing them, and
that is what a ``udev`` monitor hears. Without a running udevd (no
``/run/udev/control``; this development machine has none) libudev silently
disables such a monitor, so ``"auto"`` listens to the kernel's own uevents
instead. Both carry the same ``cpu`` events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyudev
import trio

Source = Literal["auto", "udev", "kernel"]

_UDEV_CONTROL = Path("/run/udev/control")
_CPU_NAME = re.compile(r"^cpu(\d+)$")


@dataclass(frozen=True)
class CpuEvent:
    cpu: int
    online: bool


def cpu_event_from_uevent(
    action: str, subsystem: str | None, sys_name: str, online_attr: bytes | None
) -> CpuEvent | None:
    """The CPU event a uevent means, or ``None`` if it is not about a CPU's state.

    ``online_attr`` is the device's ``online`` attribute, read only for
    ``change`` events.
    """
    if subsystem != "cpu":
        return None
    match = _CPU_NAME.match(sys_name)
    if match is None:
        return None
    cpu = int(match.group(1))
    if action == "online":
        return CpuEvent(cpu, True)
    if action == "offline":
        return CpuEvent(cpu, False)
    if action == "change" and online_attr is not None:
        value = online_attr.strip()
        if value in (b"0", b"1"):
            return CpuEvent(cpu, value == b"1")
    return None


class CpuMonitor:
    """A typed, non-blocking wrapper over a pyudev netlink monitor on ``cpu``."""

    def __init__(self, source: Source = "auto") -> None:
        if source == "auto":
            source = "udev" if _UDEV_CONTROL.exists() else "kernel"
        self.source: Literal["udev", "kernel"] = source
        context: Any = pyudev.Context()
        self._monitor: Any = pyudev.Monitor.from_netlink(context, source=source)
        self._monitor.filter_by("cpu")

    def start(self) -> None:
        """Bind the netlink socket: events from now on are queued for us."""
        self._monitor.start()

    def fileno(self) -> int:
        fd = self._monitor.fileno()
        assert isinstance(fd, int)
        return fd

    def drain(self) -> list[CpuEvent]:
        """Every queued CPU event, without blocking."""
        events: list[CpuEvent] = []
        while True:
            device: Any = self._monitor.poll(timeout=0)
            if device is None:
                return events
            action = str(device.action or "")
            online_attr: bytes | None = None
            if action == "change":
                raw = device.attributes.get("online")
                online_attr = raw if isinstance(raw, bytes) else None
            event = cpu_event_from_uevent(
                action, device.subsystem, str(device.sys_name), online_attr
            )
            if event is not None:
                events.append(event)


async def watch_cpu_events(
    send: trio.MemorySendChannel[CpuEvent],
    *,
    source: Source = "auto",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send a :class:`CpuEvent` for every CPU that goes online or offline; runs until cancelled.

    Use with ``nursery.start``: it reports started once the monitor listens,
    so no event after that point is lost. Closes ``send`` when it ends.
    """
    async with send:
        monitor = CpuMonitor(source)
        monitor.start()
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(monitor.fileno())
            for event in monitor.drain():
                await send.send(event)
