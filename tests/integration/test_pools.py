"""Warm pools on real zones: a private zoned on the host's libvirtd, the
default image, 256 MiB zones. One daemon and one pool serve the module and
the boots are shared (the host's 2 cores are shared too): the pool fills,
serves two concurrent creates and a run, refills, survives a kill -9 of the
daemon with its zones re-adopted as pool zones, and empties at size 0
leaving nothing behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from tests.integration.conftest import domain_name, open_libvirt, private_zoned, qemu_pid
from tests.waiting import wait_until_async
from zoned import protocol as p
from zoned.client import Client
from zoned.errors import NotFound
from zoned.localdaemon import LocalDaemon
from zoned.topology import read_host_topology

#: The pool "it": its zones are pool-it-<hex>, and this module names its own pool-it-*.
PREFIX = "pool-it"
SPEC = p.PoolSpec(memory_mib=256, size=2)
#: Booting two zones under TCG on shared cores, with margin.
FILL_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    with private_zoned(PREFIX) as daemon:
        yield daemon


@asynccontextmanager
async def connect(daemon: LocalDaemon) -> AsyncIterator[Client]:
    async with Client(daemon.socket, client_name="it") as client:
        yield client


async def wait_for_pool(client: Client, check: Callable[[p.PoolInfo], bool]) -> p.PoolInfo:
    with trio.fail_after(FILL_TIMEOUT_S):
        while True:
            (pool,) = await client.list_pools()
            if check(pool):
                return pool
            await trio.sleep(0.2)


def pool_domains() -> dict[str, int | None]:
    """This module's running domains and their QEMU pids."""
    conn = open_libvirt()
    try:
        names = [
            d.name() for d in conn.listAllDomains() if d.name().startswith(domain_name(PREFIX))
        ]
        return {name: qemu_pid(name) for name in names}
    finally:
        conn.close()


async def test_a_pool_fills_and_serves_each_zone_once(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client:
        await client.set_pool("it", SPEC)
        pool = await wait_for_pool(client, lambda pool: pool.ready == 2)
        assert (pool.hits, pool.misses) == (0, 0)
        assert len(pool_domains()) == 2
        assert await client.list_zones() == []

        zones: dict[str, p.ZoneInfo] = {}

        async def take(name: str) -> None:
            zones[name] = await client.create_zone(
                name, memory_mib=256, labels={"task": name.removeprefix(PREFIX + "-")}
            )

        async with trio.open_nursery() as nursery:
            for name in (f"{PREFIX}-a", f"{PREFIX}-b"):
                nursery.start_soon(take, name)
        a, b = zones[f"{PREFIX}-a"], zones[f"{PREFIX}-b"]
        assert (a.from_pool, b.from_pool) == ("it", "it")
        assert a.uuid != b.uuid
        assert (a.labels, b.labels) == ({"task": "a"}, {"task": "b"})
        # Each is a zone of its own with the name it was asked for.
        listed = {zone.name: zone for zone in await client.list_zones()}
        assert set(listed) == {a.name, b.name}
        outputs = set()
        for zone in (a, b):
            result = await client.exec(zone.name, ["cat", "/proc/sys/kernel/random/boot_id"])
            assert result.exit.exit_code == 0, result
            outputs.add(result.stdout)
        assert len(outputs) == 2
        # The workloads' hostname is the name the zone was acquired under.
        for zone in (a, b):
            result = await client.exec(zone.name, ["hostname"])
            assert result.stdout == f"{zone.name}\n".encode(), result
        for zone in (a, b):
            await client.destroy_zone(zone.name)
        # Its console log (the boot, under the pool's name) is kept under its own.
        kept = b"".join([chunk async for chunk in client.console_log(a.name, uuid=a.uuid)])
        assert b"zoned-agent: starting at" in kept, kept[-2000:]

        # The pool refills; a run takes one, prints, and its zone is gone after.
        await wait_for_pool(client, lambda pool: pool.ready == 2)
        before = set(pool_domains())
        async with client.run_process(
            ["sh", "-c", "echo pooled; hostname"], memory_mib=256
        ) as process:
            result = await process.communicate()
            assert process.zone is not None and process.zone.from_pool == "it"
            name = process.zone.name
        assert (result.exit.exit_code, result.stdout) == (0, f"pooled\n{name}\n".encode())
        with pytest.raises(NotFound):
            await client.get_zone(name)
        assert len(before - set(pool_domains())) == 1  # the one it took is gone
        (pool,) = await client.list_pools()
        assert pool.hits == 3 and pool.acquire_mean_s is not None


async def test_kill9_with_a_full_pool_readopts_it_and_size_0_leaves_nothing(
    zoned: LocalDaemon,
) -> None:
    async with connect(zoned) as client:
        await client.set_pool("it", SPEC)
        await wait_for_pool(client, lambda pool: pool.ready == 2)
    running = pool_domains()
    assert len(running) == 2

    zoned.kill9()
    await trio.to_thread.run_sync(zoned.start)

    async with connect(zoned) as client:
        # The same zones, the same QEMUs: re-adopted as the pool's, not booted again.
        pool = await wait_for_pool(client, lambda pool: pool.ready == 2)
        assert pool.refill_failures == 0
        assert pool_domains() == running
        assert await client.list_zones() == []

        await client.set_pool("it", msgspec.structs.replace(SPEC, size=0))
        await wait_for_pool(client, lambda pool: pool.ready + pool.booting == 0)

        # A pool zone's destroy stops its domain first and deletes its record
        # last: wait for both, bounded.
        def leftovers() -> list[str]:
            found = [f"domain {name}" for name in pool_domains()]
            for part in ("state/zones", "run/zones"):
                found += [f"{part}/{path.name}" for path in (zoned.root / part).iterdir()]
            return found

        await wait_until_async(
            lambda: not leftovers(), "the pool's zones all gone", details=lambda: repr(leftovers())
        )
        await client.remove_pool("it")
    for pid in running.values():
        assert pid is not None and not Path(f"/proc/{pid}").exists()


async def test_an_explicit_create_evicts_a_pool_zone_when_the_host_is_full() -> None:
    """A daemon of its own whose host has room for two 256 MiB zones and a bit."""
    room = 2 * SPEC.memory_mib + 200
    reserved = read_host_topology().memory_total_mib - room
    with private_zoned("pool-ev", extra_config=f"reserved_memory_mib = {reserved}") as daemon:
        async with connect(daemon) as client:
            await client.set_pool("ev", SPEC)
            await wait_for_pool(client, lambda pool: pool.ready == 2)
            # Not the pool's template (more memory): it boots cold, in a pool zone's room.
            mine = await client.create_zone("pool-ev-mine", memory_mib=300)
            assert (mine.state, mine.from_pool) == ("ready", "")
            pool = await wait_for_pool(client, lambda pool: pool.refill_failures >= 1)
            assert pool.ready == 1, pool
            assert "needs 256 MiB" in pool.last_failure, pool.last_failure
            assert pool.backoff_until is not None
            await client.destroy_zone("pool-ev-mine")
            # Room again: the pool fills once its wait is over.
            await wait_for_pool(client, lambda pool: pool.ready == 2)
            await client.remove_pool("ev")
            await wait_for_pool_gone(client)


async def wait_for_pool_gone(client: Client) -> None:
    with trio.fail_after(FILL_TIMEOUT_S):
        while (await client.host_info()).zone_count:
            await trio.sleep(0.2)
