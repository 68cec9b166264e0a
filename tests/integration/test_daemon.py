"""The daemon as operators run it: a ``zoned`` process on a real libvirtd,
booting real zones (our kernel, our agent) under the accelerator it probes.

One daemon serves the whole module (it is restarted once, by the kill -9
test); zones are shared between checks where a test allows. Needs what
``.ci/run`` sets up: libvirtd on qemu:///system and a built strict kernel.
Every zone here is named ``it-*``; the module removes leftovers of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import libvirt
import pytest
import trio

from tests.integration.conftest import (
    destroy_domains,
    domain_name,
    open_libvirt,
    private_zoned,
    qemu_pid,
)
from tests.zone_events import EventLog, watching
from zoned import protocol as p
from zoned.client import Client
from zoned.errors import Conflict, NoCapacity, NotFound
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

# Generous: several TCG boots share two host cores.
CALL_TIMEOUT_S = 120.0


def own_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    return [d for d in conn.listAllDomains() if d.name().startswith(domain_name("it-"))]


def remove_own_domains() -> None:
    destroy_domains(domain_name("it-"))


@pytest.fixture
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    """Per test: the libvirtd restart test breaks connections that predate it."""
    conn = open_libvirt()
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    with private_zoned("it-") as daemon:
        yield daemon


@contextlib.asynccontextmanager
async def connect(daemon: LocalDaemon) -> AsyncIterator[Client]:
    async with Client(daemon.socket, client_name="it") as client:
        yield client


def zone_qemu_pid(zone: str) -> int:
    pid = qemu_pid(domain_name(zone))
    assert pid is not None, f"no QEMU runs for zone {zone}"
    return pid


def thread_affinity(pid: int) -> dict[str, str]:
    """Each QEMU thread's name and its Cpus_allowed_list, as the kernel sees them."""
    threads: dict[str, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            fields = dict(
                line.split(":\t", 1)
                for line in (task / "status").read_text().splitlines()
                if ":\t" in line
            )
            threads[f"{fields['Name'].strip()}#{task.name}"] = fields["Cpus_allowed_list"].strip()
    return threads


def parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


async def wait_for_state(events: EventLog, zone: str, state: p.ZoneState) -> p.Event:
    with trio.fail_after(CALL_TIMEOUT_S):
        return await events.wait_for_state(zone, state)


async def test_create_ready_pinned_logged_listed_destroyed(
    zoned: LocalDaemon, libvirt_conn: libvirt.virConnect
) -> None:
    async with connect(zoned) as client, watching(client) as events:
        host = await client.host_info()
        assert host.accelerator in ("kvm", "tcg")
        with trio.fail_after(CALL_TIMEOUT_S):
            zone = await client.create_zone(
                "it-one", placement="exclusive", labels={"suite": "it", "test": "one"}
            )
        assert zone.state == "ready", zone
        assert zone.kernel_release.startswith("6.12"), zone
        assert zone.ready_at is not None and zone.ready_at >= zone.created_at
        # Every transition was an event, in order.
        await wait_for_state(events, "it-one", "ready")
        assert events.states("it-one") == ["creating", "booting", "ready"]

        # Placement: one whole host core, and both the kernel and libvirt agree.
        assert len(zone.cpus) == 1 and zone.numa_node is not None
        pinned = zone.cpus[0]
        dom = libvirt_conn.lookupByName(domain_name("it-one"))
        libvirt_view = dom.vcpuPinInfo(0)[0]
        assert {i for i, on in enumerate(libvirt_view) if on} == {pinned}
        threads = thread_affinity(zone_qemu_pid("it-one"))
        vcpu_threads = {name: cpus for name, cpus in threads.items() if name.startswith("CPU ")}
        assert vcpu_threads, threads
        for name, cpus in vcpu_threads.items():
            assert parse_cpu_list(cpus) == {pinned}, (name, threads)
        emulator = set(zone.emulator_cpus)
        others = [c for n, c in threads.items() if not n.startswith("CPU ")]
        assert others and all(parse_cpu_list(c) == emulator for c in others), threads
        # The domain's XML carries the same record as the state directory.
        live = dom.XMLDesc(0)
        assert "zoned" in live and zoned.record_path("it-one").exists()
        # Memory given back (docs/fast-start.md): the running QEMU has the
        # balloon for free page reporting, and under TCG the bounded cache.
        assert "<memballoon model='virtio' freePageReporting='on'>" in live, live
        if host.accelerator == "tcg":
            assert "<tb-cache unit='KiB'>65536</tb-cache>" in live, live

        # Listing, with and without label filters.
        assert [z.name for z in await client.list_zones()] == ["it-one"]
        assert [z.name for z in await client.list_zones({"test": "one"})] == ["it-one"]
        assert await client.list_zones({"test": "two"}) == []
        assert (await client.get_zone("it-one")).cpus == [pinned]

        # The serial console reached its log, and the log streams.
        log = b""
        async with contextlib.aclosing(client.console_log("it-one")) as chunks:
            async for chunk in chunks:
                log += chunk
        assert b"zoned-agent: host connected" in log, log[-2000:]

        # Names collide: a second create of the same name changes nothing.
        with pytest.raises(Conflict):
            await client.create_zone("it-one")
        assert (await client.get_zone("it-one")).uuid == zone.uuid

        # A zone that does not fit is refused whole.
        with pytest.raises(NoCapacity):
            await client.create_zone("it-big", vcpus=len(host.cpus) + 1, placement="exclusive")
        assert libvirt_conn.lookupByName(domain_name("it-one")).isActive()
        with pytest.raises(NotFound):
            await client.get_zone("it-big")

        final = await client.destroy_zone("it-one")
        assert final.state == "stopped"
        await wait_for_state(events, "it-one", "stopped")
        assert events.states("it-one")[-2:] == ["stopping", "stopped"]
        with pytest.raises(NotFound):
            await client.get_zone("it-one")
        assert not own_domains(libvirt_conn)
        assert not zoned.record_path("it-one").exists()


async def test_three_zones_at_once(zoned: LocalDaemon, libvirt_conn: libvirt.virConnect) -> None:
    names = ["it-par-0", "it-par-1", "it-par-2"]
    created: dict[str, p.ZoneInfo] = {}
    async with connect(zoned) as client:

        async def create(name: str) -> None:
            with trio.fail_after(CALL_TIMEOUT_S * 2):
                created[name] = await client.create_zone(name, memory_mib=192)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(create, name)
        assert all(created[n].state == "ready" for n in names), created
        assert len({created[n].uuid for n in names}) == 3
        listed = await client.list_zones()
        assert sorted(z.name for z in listed) == names
        assert all(z.state == "ready" for z in listed)
        assert len({zone_qemu_pid(n) for n in names}) == 3

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(client.destroy_zone, name)
        assert await client.list_zones() == []
    assert not own_domains(libvirt_conn)


async def test_destroy_during_boot(zoned: LocalDaemon, libvirt_conn: libvirt.virConnect) -> None:
    async with connect(zoned) as client, watching(client) as events:

        async def create() -> None:
            # Destroyed while booting: the create answers that it was stopped.
            with pytest.raises(Conflict, match=r"zone 'it-early' was (stopping|stopped) before"):
                await client.create_zone("it-early")

        with trio.fail_after(CALL_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(create)
                await events.wait_for_state("it-early", "booting")
                final = await client.destroy_zone("it-early")
                assert final.state == "stopped"
        assert "ready" not in events.states("it-early")
        with pytest.raises(NotFound):
            await client.get_zone("it-early")
    assert not own_domains(libvirt_conn)
    assert not zoned.record_path("it-early").exists()


async def test_qemu_killed_from_outside_fails_the_zone(
    zoned: LocalDaemon, libvirt_conn: libvirt.virConnect
) -> None:
    async with connect(zoned) as client, watching(client) as events:
        with trio.fail_after(CALL_TIMEOUT_S):
            await client.create_zone("it-victim")
        os.kill(zone_qemu_pid("it-victim"), signal.SIGKILL)
        failed = await wait_for_state(events, "it-victim", "failed")
        assert failed.previous == "ready" and "QEMU" in failed.reason, failed
        zone = await client.get_zone("it-victim")
        assert zone.state == "failed" and zone.reason, zone
        # The record is kept (an operator wants to see why), and on disk too.
        record = json.loads(zoned.record_path("it-victim").read_text())
        assert record["state"] == "failed"
        # Destroying a failed zone removes its record.
        assert (await client.destroy_zone("it-victim")).state == "stopped"
    assert not own_domains(libvirt_conn)


async def test_libvirtd_restart_is_survived(zoned: LocalDaemon) -> None:
    """libvirtd dies under a running zone: zoned reconnects, resynchronises and
    still hears lifecycle events afterwards."""
    async with connect(zoned) as client, watching(client) as events:
        with trio.fail_after(CALL_TIMEOUT_S):
            zone = await client.create_zone("it-survivor")
        libvirtd = int(Path("/run/libvirtd.pid").read_text())
        os.kill(libvirtd, signal.SIGKILL)
        with trio.fail_after(CALL_TIMEOUT_S):
            await events.wait_for(lambda e: e.kind == "daemon" and "re-established" in e.reason)
        daemon_events = [e.reason for e in events.events if e.kind == "daemon"]
        assert daemon_events[0].startswith("libvirt connection lost"), daemon_events
        assert int(Path("/run/libvirtd.pid").read_text()) != libvirtd
        after = await client.get_zone("it-survivor")
        assert after.state == "ready" and after.uuid == zone.uuid, after
        # Events flow from the new connection: a QEMU killed now is noticed.
        os.kill(zone_qemu_pid("it-survivor"), signal.SIGKILL)
        failed = await wait_for_state(events, "it-survivor", "failed")
        assert "QEMU" in failed.reason, failed
        await client.destroy_zone("it-survivor")
    conn = open_libvirt()
    try:
        assert not own_domains(conn)
    finally:
        conn.close()


async def test_kill9_and_restart_readopts_running_zones(
    zoned: LocalDaemon, libvirt_conn: libvirt.virConnect
) -> None:
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S * 2):
            keep = await client.create_zone("it-keep", placement="exclusive", labels={"k": "v"})
            vanish = await client.create_zone("it-vanish", memory_mib=128)
    keep_pid = zone_qemu_pid("it-keep")

    zoned.kill9()
    # While zoned is down, one domain disappears from under it, and another
    # zone's record file is lost: its domain's metadata still has it.
    libvirt_conn.lookupByName(domain_name("it-vanish")).destroy()
    zoned.record_path("it-keep").unlink()
    # Another zoned on the same libvirtd (its own state directory) does not
    # take zones that are not its own.
    with LocalDaemon(extra_config='accelerator = "tcg"') as neighbour:

        async def neighbour_zones() -> list[p.ZoneInfo]:
            async with Client(neighbour.socket, client_name="it") as other:
                return await other.list_zones()

        assert await neighbour_zones() == []
    await trio.to_thread.run_sync(zoned.start)

    async with connect(zoned) as client, watching(client) as events:
        # Re-adopted zones wait for their agent's hello again (booting -> ready).
        if (await client.get_zone("it-keep")).state != "ready":
            await wait_for_state(events, "it-keep", "ready")
        adopted = await client.get_zone("it-keep")
        assert adopted.state == "ready", adopted
        # Same zone, same QEMU, same placement: adopted, not recreated.
        assert zone_qemu_pid("it-keep") == keep_pid
        for field in ("uuid", "cpus", "emulator_cpus", "numa_node", "labels", "created_at"):
            assert getattr(adopted, field) == getattr(keep, field), field
        assert adopted.ready_at == keep.ready_at
        assert zoned.record_path("it-keep").exists()  # written back
        gone = await client.get_zone("it-vanish")
        assert gone.state == "failed" and gone.uuid == vanish.uuid, gone
        assert "the zone's QEMU domain disappeared" in gone.reason, gone.reason
        assert "without zoned asking" in gone.reason, gone.reason
        # Its CPU is still held: an exclusive zone asking for it does not fit.
        with pytest.raises(NoCapacity):
            await client.create_zone("it-thief", placement="exclusive", vcpus=2)

        for name in ("it-keep", "it-vanish"):
            await client.destroy_zone(name)
        assert await client.list_zones() == []
    assert not own_domains(libvirt_conn)
