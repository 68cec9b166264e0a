"""CPU hotplug watcher: uevent decoding, start-up, cancellation, and real uevents.

Real CPU hotplug cannot be triggered on this machine (and must not be in a
test), but the kernel emits a genuine uevent when an action is written to a
device's ``uevent`` file. The watcher cannot tell such a synthetic event from a
real one, so writing ``online``/``change`` for an online CPU (no state change)
exercises the whole path: netlink socket, trio wakeup, pyudev decoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from zoned.hostwatch import CpuEvent, CpuMonitor, cpu_event_from_uevent, watch_cpu_events
from zoned.topology import read_topology


@pytest.mark.parametrize(
    ("action", "subsystem", "name", "attr", "event"),
    [
        ("online", "cpu", "cpu3", None, CpuEvent(3, True)),
        ("offline", "cpu", "cpu12", None, CpuEvent(12, False)),
        ("change", "cpu", "cpu1", b"0\n", CpuEvent(1, False)),
        ("change", "cpu", "cpu1", b"1\n", CpuEvent(1, True)),
        ("change", "cpu", "cpu1", None, None),
        ("change", "cpu", "cpu1", b"garbage", None),
        ("add", "cpu", "cpu1", None, None),
        ("online", "memory", "memory7", None, None),
        ("online", "cpu", "cpufreq", None, None),
        ("online", None, "cpu1", None, None),
    ],
)
def test_cpu_event_from_uevent(
    action: str, subsystem: str | None, name: str, attr: bytes | None, event: CpuEvent | None
) -> None:
    assert cpu_event_from_uevent(action, subsystem, name, attr) == event


def test_monitor_source_auto_follows_udevd() -> None:
    monitor = CpuMonitor()
    expected = "udev" if Path("/run/udev/control").exists() else "kernel"
    assert monitor.source == expected
    monitor.start()
    assert monitor.fileno() >= 0
    assert isinstance(monitor.drain(), list)  # nothing queued blocks nobody


async def test_watch_starts_and_is_cancellable() -> None:
    send, receive = trio.open_memory_channel[CpuEvent](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_cpu_events, send)
        nursery.cancel_scope.cancel()
    # The watcher owns the send side and closes it when it ends.
    with pytest.raises(trio.EndOfChannel):
        await receive.receive()


def _last_online_cpu() -> int:
    return read_topology(Path("/sys")).online_cpus()[-1]


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("writing /sys/devices/system/cpu/cpuN/uevent needs root; run as root")


async def _expect(receive: trio.MemoryReceiveChannel[CpuEvent], wanted: CpuEvent) -> None:
    # A guard against hanging, not a timing assertion.
    with trio.fail_after(30):
        async for event in receive:
            if event == wanted:
                return


@pytest.mark.parametrize("action", ["online", "change"])
async def test_watch_reports_a_real_uevent(action: str) -> None:
    _require_root()
    cpu = _last_online_cpu()
    send, receive = trio.open_memory_channel[CpuEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_cpu_events, send)
        Path(f"/sys/devices/system/cpu/cpu{cpu}/uevent").write_text(action)
        await _expect(receive, CpuEvent(cpu, True))
        nursery.cancel_scope.cancel()
