"""Warm pools against the whole daemon on libvirt's test driver.

The test driver runs no QEMU, so an "agent farm" plays the guest agent of
every zone whose runtime directory appears (where QEMU would make the agent
socket), for the zones the test wants booted; the others time out as a zone
whose image cannot boot would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from tests.service.conftest import fake_zone_images, service_config
from tests.service.test_hostile_agent import fake_agent
from tests.zonectl_run import ZONECTL
from zoned import protocol as p
from zoned.client import Client
from zoned.daemon import Daemon
from zoned.errors import Conflict, InvalidRequest, NotFound
from zoned.topology import read_host_topology

SMALL = p.PoolSpec(image="builtin", memory_mib=128, size=2)


async def _exits_zero(stream: trio.SocketStream, start: p.AgentExecStart) -> None:
    await stream.send_all(p.encode_frame(p.AgentExecStarted(exec_id=start.exec_id, pid=7)))
    await stream.send_all(p.encode_frame(p.AgentExecExit(exec_id=start.exec_id, exit_code=0)))


@asynccontextmanager
async def agent_farm(daemon: Daemon, boots: Callable[[str], bool]) -> AsyncIterator[None]:
    """A well-behaved fake agent for each new zone directory whose name ``boots``."""
    zones = trio.Path(daemon.config.runtime_dir) / "zones"
    served: set[str] = set()
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while True:
                if await zones.is_dir():
                    for entry in await zones.iterdir():
                        if entry.name not in served and boots(entry.name):
                            served.add(entry.name)
                            socket = Path(entry) / "agent.sock"
                            await nursery.start(
                                lambda task_status, s=socket: fake_agent(
                                    s, _exits_zero, every_exec=True, task_status=task_status
                                )
                            )
                await trio.sleep(0.01)

        nursery.start_soon(watch)
        yield
        nursery.cancel_scope.cancel()


async def wait_for_pool(
    client: Client, name: str, check: Callable[[p.PoolInfo], bool]
) -> p.PoolInfo:
    while True:
        pool = next(p for p in await client.list_pools() if p.name == name)
        if check(pool):
            return pool
        await trio.sleep(0.02)


async def test_bad_templates_are_refused_and_change_nothing(daemon: Daemon) -> None:
    async with Client(daemon.config.socket_path) as client:
        bad = [
            (p.PoolSpec(image="no-such-image:1"), "no-such-image"),
            (p.PoolSpec(profile="nosuch"), "unknown profile"),
            (p.PoolSpec(vcpus=daemon.config.max_vcpus + 1), "vcpus="),
            (p.PoolSpec(memory_mib=64 * 1024, size=64), "more than"),
            (p.PoolSpec(memory_mib=100, size=0), "too small"),
            (p.PoolSpec(memory_mib=daemon.config.max_memory_mib + 1, size=0), "above this host"),
            (p.PoolSpec(size=-1), "size"),
            (p.PoolSpec(size=p.MAX_POOL_SIZE + 1), "size"),
            (p.PoolSpec(memory_mib=128, writable_layer_mib=100), "half"),
        ]
        for spec, why in bad:
            with pytest.raises(InvalidRequest, match=why):
                await client.set_pool("bad", spec)
        assert await client.list_pools() == []
        with pytest.raises(NotFound):
            await client.remove_pool("bad")
        assert not (Path(daemon.config.state_dir) / "pools.json").exists()


async def test_a_pool_fills_hands_out_each_zone_once_and_empties_at_size_0(
    daemon: Daemon,
) -> None:
    async with (
        agent_farm(daemon, lambda name: True),
        Client(daemon.config.socket_path) as client,
    ):
        await client.set_pool("small", SMALL)
        with trio.fail_after(20):
            pool = await wait_for_pool(client, "small", lambda p: p.ready == 2)
        assert (pool.hits, pool.misses, pool.refill_failures) == (0, 0, 0)
        # Pool zones are nobody's zones until acquired.
        assert await client.list_zones() == []

        zones: dict[str, p.ZoneInfo] = {}

        async def take(name: str) -> None:
            zones[name] = await client.create_zone(
                name, image="builtin", memory_mib=128, labels={"task": name}
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "one")
            nursery.start_soon(take, "two")
        assert {z.from_pool for z in zones.values()} == {"small"}
        assert zones["one"].uuid != zones["two"].uuid
        for name, zone in zones.items():
            assert (zone.name, zone.labels, zone.state) == (name, {"task": name}, "ready")
            assert zone.owner_uid == 0
            # Its logs are under its own name now.
            assert f"/zones/{name}/{zone.uuid}/console.log" in zone.console_log
            assert Path(zone.console_log).parent.is_dir()
        listed = {z.name: z for z in await client.list_zones()}
        assert set(listed) == {"one", "two"}
        assert listed["one"].from_pool == "small"
        # A request the pool does not match boots cold.
        cold = await client.create_zone("cold", image="builtin", memory_mib=256)
        assert cold.from_pool == ""
        with trio.fail_after(20):
            pool = await wait_for_pool(client, "small", lambda p: p.ready == 2)
        assert pool.hits == 2
        # The acquired zones work as any zone does.
        result = await client.exec("one", ["true"])
        assert result.exit.exit_code == 0
        for name in ("one", "two", "cold"):
            await client.destroy_zone(name)

        await client.set_pool("small", msgspec.structs.replace(SMALL, size=0))
        with trio.fail_after(20):
            await wait_for_pool(client, "small", lambda p: p.ready + p.booting == 0)
        while daemon.manager is not None and daemon.manager.zones:
            await trio.sleep(0.02)
        await client.remove_pool("small")
        assert await client.list_pools() == []


async def test_a_pool_that_cannot_boot_backs_off_and_says_why(daemon: Daemon) -> None:
    async with (
        agent_farm(daemon, lambda name: not name.startswith("pool-broken-")),
        Client(daemon.config.socket_path) as client,
    ):
        await client.set_pool("broken", p.PoolSpec(image="builtin", memory_mib=128, size=1))
        with trio.fail_after(20):
            pool = await wait_for_pool(client, "broken", lambda p: p.refill_failures >= 1)
        assert pool.ready == 0
        assert "did not say hello" in pool.last_failure or "boot" in pool.last_failure
        assert pool.backoff_until is not None
        # A miss boots cold; the failed pool zone left nothing behind.
        zone = await client.create_zone("miss", image="builtin", memory_mib=128)
        assert zone.from_pool == ""
        pool = next(p for p in await client.list_pools() if p.name == "broken")
        assert pool.misses == 1
        await client.destroy_zone("miss")
        await client.remove_pool("broken")


async def test_an_explicit_create_evicts_a_pool_zone_when_the_host_is_full(
    short_tmp: Path,
) -> None:
    topology = read_host_topology()
    # Room for exactly two zones of 128 MiB.
    config = service_config(short_tmp, reserved_memory_mib=topology.memory_total_mib - 300)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(Daemon(config, zone_images=fake_zone_images).run)
        async with (
            agent_farm(daemon, lambda name: True),
            Client(config.socket_path) as client,
        ):
            with pytest.raises(InvalidRequest, match="more than the 300 MiB"):
                await client.set_pool("small", msgspec.structs.replace(SMALL, size=3))
            await client.set_pool("small", SMALL)
            with trio.fail_after(20):
                await wait_for_pool(client, "small", lambda p: p.ready == 2)
            # Not the pool's spec: it boots cold, in the room of a pool zone.
            zone = await client.create_zone("mine", image="builtin", memory_mib=120)
            assert zone.from_pool == ""
            with trio.fail_after(20):
                pool = await wait_for_pool(client, "small", lambda p: p.refill_failures >= 1)
            assert pool.ready == 1
            assert "needs 128 MiB" in pool.last_failure, pool.last_failure
            await client.destroy_zone("mine")
            await client.remove_pool("small")
        nursery.cancel_scope.cancel()


async def test_zonectl_pool_set_list_rm(daemon: Daemon) -> None:
    """The command line end to end: what it sets is what the daemon keeps, and says."""

    async def zonectl(*args: str) -> tuple[int, str, str]:
        result = await trio.run_process(
            [*ZONECTL, "--socket", daemon.config.socket_path, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    status, out, _ = await zonectl(
        "pool", "set", "py", "--size", "0", "--memory", "512", "--image", "builtin",
        "--writable-layer", "disk", "--writable-size", "64",
    )  # fmt: skip
    assert status == 0 and out.startswith("POOL"), out
    async with Client(daemon.config.socket_path) as client:
        (pool,) = await client.list_pools()
    assert pool.spec == p.PoolSpec(
        image="builtin", memory_mib=512, writable_layer="disk", writable_layer_mib=64, size=0
    )
    status, out, _ = await zonectl("--json", "pool", "list")
    assert status == 0 and '"name":"py"' in out.replace(" ", ""), out
    status, _, err = await zonectl("pool", "set", "bad", "--profile", "nosuch")
    assert status != 0 and "unknown profile" in err, err
    status, out, _ = await zonectl("pool", "rm", "py")
    assert status == 0 and "py" in out
    assert not json.loads((Path(daemon.config.state_dir) / "pools.json").read_bytes())["pools"]


async def test_a_name_being_created_is_not_handed_a_pool_zone(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold create holds its name from its checks on: a matching request of the
    same name meanwhile is a conflict and takes no pool zone."""
    assert daemon.images is not None
    images = daemon.images
    acquire = images.acquire
    entered, go = trio.Event(), trio.Event()

    async def slow_acquire(zone: str, reference: str) -> object:
        if zone == "x":
            entered.set()
            await go.wait()
        return await acquire(zone, reference)

    async with (
        agent_farm(daemon, lambda name: True),
        Client(daemon.config.socket_path) as client,
    ):
        await client.set_pool("small", SMALL)
        with trio.fail_after(20):
            await wait_for_pool(client, "small", lambda p: p.ready == 2)
        monkeypatch.setattr(images, "acquire", slow_acquire)
        cold: list[p.ZoneInfo] = []

        async def create_cold() -> None:
            cold.append(await client.create_zone("x", image="builtin", memory_mib=256))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create_cold)
            await entered.wait()
            with pytest.raises(Conflict, match="'x' is taken"):
                await client.create_zone("x", image="builtin", memory_mib=128)
            go.set()
        assert (cold[0].name, cold[0].from_pool, cold[0].state) == ("x", "", "ready")
        pool = next(p for p in await client.list_pools() if p.name == "small")
        assert (pool.ready, pool.hits) == (2, 0)
        await client.destroy_zone("x")
        await client.remove_pool("small")
