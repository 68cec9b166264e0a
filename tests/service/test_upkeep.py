"""What the zone manager keeps tidy: sizes that cannot boot are refused, a run
destroys only its own zone and leaves nothing after a failed boot, a destroy
that libvirt's absence cut off is finished when libvirt is back.

libvirt's test driver runs no QEMU: zones here never say hello and fail
their (1 s) boot, which is what a failed create is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.waiting import wait_until_async
from tests.zone_events import watching
from zoned import protocol as p
from zoned import sizes
from zoned.client import Client
from zoned.daemon import Daemon
from zoned.errors import Conflict, HypervisorError, InvalidRequest

HANG_GUARD_S = 30.0


def leftovers(daemon: Daemon) -> dict[str, list[str]]:
    """What the daemon keeps per zone on disk: records and runtime directories."""
    config = daemon.config
    return {
        "records": sorted(f.stem for f in Path(config.state_dir, "zones").glob("*.json")),
        "runtime": sorted(d.name for d in Path(config.runtime_dir, "zones").glob("*")),
    }


async def test_sizes_that_cannot_boot_are_refused_naming_the_minimum(daemon: Daemon) -> None:
    microvm = sizes.minimum_memory_mib("strict", "microvm")
    q35 = sizes.minimum_memory_mib("strict", "q35")
    assert q35 < microvm  # the machines differ: the bound is the daemon's to apply
    async with Client(daemon.config.socket_path, client_name="test") as client:
        with pytest.raises(InvalidRequest) as raised:
            await client.create_zone("tiny", memory_mib=microvm - 1, machine="microvm")
        assert raised.value.message == (
            f"memory_mib={microvm - 1} is too small: a strict zone on microvm needs at least"
            f" {microvm} MiB to boot and run (below that its kernel runs out of memory while"
            " it boots)"
        )
        with pytest.raises(InvalidRequest, match=f"`int` >= {p.MIN_MEMORY_MIB}"):
            await client.create_zone("tiny", memory_mib=p.MIN_MEMORY_MIB - 1, machine="q35")
        # The smallest q35 zone is not refused (here it then fails its boot:
        # the test driver has no guest).
        with pytest.raises(HypervisorError, match="failed to boot"):
            await client.create_zone("tiny", memory_mib=q35, machine="q35")
        assert [z.state for z in await client.list_zones()] == ["failed"]
        await client.destroy_zone("tiny")
    assert leftovers(daemon) == {"records": [], "runtime": []}


def test_the_protocols_bound_is_the_smallest_minimum() -> None:
    assert p.MIN_MEMORY_MIB == sizes.SMALLEST_MEMORY_MIB
    for (profile, machine), measured in sizes.MEASURED_BOOT_MIB.items():
        minimum = sizes.minimum_memory_mib(profile, machine)
        assert minimum >= measured + sizes.MIN_MEMORY_MARGIN_MIB
        assert minimum % sizes.ROUND_MIB == 0 and minimum >= p.MIN_MEMORY_MIB


async def test_a_run_never_destroys_a_zone_it_did_not_create(daemon: Daemon) -> None:
    async with Client(daemon.config.socket_path, client_name="test") as client:
        with pytest.raises(HypervisorError):
            await client.create_zone("mine")  # fails its boot, stays as "failed"
        before = await client.get_zone("mine")
        with trio.fail_after(HANG_GUARD_S), pytest.raises(Conflict, match="already exists"):
            await client.run(["true"], name="mine")
        assert await client.get_zone("mine") == before
        await client.destroy_zone("mine")


async def test_a_run_whose_zone_fails_to_boot_leaves_nothing(daemon: Daemon) -> None:
    async with Client(daemon.config.socket_path, client_name="test") as client:
        with trio.fail_after(HANG_GUARD_S), pytest.raises(HypervisorError) as raised:
            await client.run(["true"], name="doomed")
        assert "failed to boot" in raised.value.message
        assert "did not say hello within 1 s" in raised.value.message
        assert await client.list_zones() == []
    assert leftovers(daemon) == {"records": [], "runtime": []}


async def test_a_destroy_cut_off_from_libvirt_is_finished_by_the_resync(daemon: Daemon) -> None:
    """libvirtd cannot be stopped here (other checkouts share it), so its absence
    is the daemon's connection taken away, as a lost connection leaves it."""
    manager = daemon.manager
    assert manager is not None
    async with (
        Client(daemon.config.socket_path, client_name="test") as client,
        watching(client) as events,
    ):
        with pytest.raises(HypervisorError):
            await client.create_zone("stuck")
        link, manager.hv._link = manager.hv._link, None
        try:
            with pytest.raises(HypervisorError, match="not connected"):
                await client.destroy_zone("stuck")
            assert (await client.get_zone("stuck")).state == "stopping"
        finally:
            manager.hv._link = link
        await manager.resync()  # what the daemon does once it has reconnected
        with trio.fail_after(HANG_GUARD_S):
            await events.wait_for_state("stuck", "stopped")
        assert await client.list_zones() == []
        empty: dict[str, list[str]] = {"records": [], "runtime": []}
        await wait_until_async(lambda: leftovers(daemon) == empty, "the record removed")
