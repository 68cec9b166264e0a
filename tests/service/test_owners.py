"""Zones have owners: another member of the zoned group can neither see nor
touch them; an administrator can (the daemon on libvirt's test driver).

The other users are real uids (no accounts needed): each talks to the daemon
through a relay running as that uid (:mod:`tests.peers`), so the daemon
sees it by ``SO_PEERCRED`` as it would see any client.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.peers import relay_as, unused_uids
from tests.service.conftest import fake_zone_images, service_config
from tests.service.test_hostile_agent import fake_agent, sends
from tests.zone_events import watching
from zoned import protocol as p
from zoned.client import Client
from zoned.daemon import Daemon
from zoned.errors import ConfigError, Conflict, NotFound, PermissionDenied

ADMIN_GROUP = "staff"  # any group of the host: membership is what the relay is given


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    # Other uids must reach the socket (0660 root:zoned) through its directory.
    short_tmp.chmod(0o711)
    config = service_config(short_tmp, admin_group=ADMIN_GROUP)
    async with trio.open_nursery() as nursery:
        started: Daemon = await nursery.start(Daemon(config, zone_images=fake_zone_images).run)
        yield started
        nursery.cancel_scope.cancel()


@dataclass(frozen=True)
class Users:
    """Relays to the daemon for two members of the zoned group and one administrator."""

    alice: Path
    bob: Path
    carol: Path
    alice_uid: int


@contextlib.contextmanager
def users(daemon: Daemon) -> Iterator[Users]:
    zoned_gid = grp.getgrnam(daemon.config.socket_group).gr_gid
    admin_gid = grp.getgrnam(ADMIN_GROUP).gr_gid
    alice, bob, carol = unused_uids(3)
    socket_path = Path(daemon.config.socket_path)
    with (
        relay_as(alice, alice, [zoned_gid], socket_path) as as_alice,
        relay_as(bob, bob, [zoned_gid], socket_path) as as_bob,
        relay_as(carol, carol, [zoned_gid, admin_gid], socket_path) as as_carol,
    ):
        yield Users(alice=as_alice, bob=as_bob, carol=as_carol, alice_uid=alice)


async def test_only_the_owner_and_administrators_see_and_touch_a_zone(daemon: Daemon) -> None:
    runtime = Path(daemon.config.runtime_dir) / "zones"
    with users(daemon) as relays:
        alice_uid = relays.alice_uid
        async with trio.open_nursery() as agents:
            for name in ("mine", "hers", "bobs"):
                await agents.start(fake_agent, runtime / name / "agent.sock", sends(b""))
            async with (
                Client(relays.alice, client_name="alice") as alice,
                Client(relays.bob, client_name="bob") as bob,
                Client(relays.carol, client_name="carol") as carol,
                watching(bob) as bobs_events,
            ):
                await trio.testing.wait_all_tasks_blocked()
                zone = await alice.create_zone("mine", placement="exclusive")
                assert (zone.state, zone.owner_uid) == ("ready", alice_uid)
                assert (await alice.create_zone("hers")).owner_uid == alice_uid

                # To bob, alice's zones do not exist: every request says so alike.
                assert [z.name for z in await bob.list_zones()] == []
                for attempt in (
                    bob.get_zone("mine"),
                    bob.destroy_zone("mine"),
                    bob.zone_metrics("mine"),
                    bob.exec("mine", ["true"]),
                    _read_log(bob, "mine"),
                ):
                    with pytest.raises(NotFound, match="no zone named 'mine'"):
                        await attempt
                # Nor does his host report name her zone's CPU.
                host = await bob.host_info()
                holders = {cpu.allocated_to for cpu in host.cpus} - {None}
                assert holders == {"(another user's zone)"}, holders
                assert host.isolation is not None and not host.isolation.caller_sees_all
                # Her zone's name is taken for him too, and it stays hers.
                with pytest.raises(Conflict, match="the zone name 'mine' is taken"):
                    await bob.create_zone("mine")
                assert (await alice.get_zone("mine")).state == "ready"

                # His own zone he sees; his event stream carried only its events.
                await bob.create_zone("bobs")
                await bobs_events.wait_for_state("bobs", "ready")
                assert {e.zone for e in bobs_events.events if e.kind == "zone_state"} == {"bobs"}
                assert [z.name for z in await bob.list_zones()] == ["bobs"]

                # The administrator sees everything and may destroy alice's zone.
                assert [z.name for z in await carol.list_zones()] == ["bobs", "hers", "mine"]
                assert (await carol.host_info()).isolation.caller_sees_all  # type: ignore[union-attr]
                assert (await carol.get_zone("mine")).owner_uid == alice_uid
                assert (await carol.destroy_zone("mine")).state == "stopped"
                with pytest.raises(NotFound):
                    await alice.get_zone("mine")
                await alice.destroy_zone("hers")
                await bob.destroy_zone("bobs")
            agents.cancel_scope.cancel()


async def test_only_administrators_remove_images(daemon: Daemon) -> None:
    """Images are shared by every user's zones: a member may list them, not remove them."""
    with users(daemon) as relays:
        async with (
            Client(relays.bob, client_name="bob") as bob,
            Client(relays.carol, client_name="carol") as carol,
        ):
            before = await bob.list_images()
            for attempt in (bob.remove_image("default"), bob.prune_images()):
                with pytest.raises(PermissionDenied, match="administrators' group"):
                    await attempt
            assert await bob.list_images() == before
            pruned = await carol.prune_images()
            assert pruned.removed == []


async def _read_log(client: Client, name: str) -> bytes:
    chunks = []
    async with contextlib.aclosing(client.console_log(name)) as log:
        async for chunk in log:
            chunks.append(chunk)
    return b"".join(chunks)


async def test_the_owner_is_in_the_record_and_the_domain_metadata(daemon: Daemon) -> None:
    """What re-adoption rebuilds a zone from says whose it is and which uid its QEMU has."""
    runtime = Path(daemon.config.runtime_dir) / "zones"
    with users(daemon) as relays:
        alice_uid = relays.alice_uid
        async with trio.open_nursery() as agents:
            await agents.start(fake_agent, runtime / "kept" / "agent.sock", sends(b""))
            async with Client(relays.alice, client_name="alice") as alice:
                zone = await alice.create_zone("kept")
                assert zone.qemu_uid is not None
                assert zone.qemu_uid == daemon.config.zone_uid_base + 1
                record = json.loads(Path(daemon.config.state_dir, "zones", "kept.json").read_text())
                assert (record["owner_uid"], record["qemu_uid"]) == (alice_uid, zone.qemu_uid)
                assert daemon.manager is not None
                metadata = await daemon.manager.hv.xml(zone_domain(daemon, "kept"))
                assert f'"owner_uid":{alice_uid}' in metadata
                assert f'"qemu_uid":{zone.qemu_uid}' in metadata
                assert f"+{zone.qemu_uid}:+{zone.qemu_uid}" in metadata  # the seclabel
                await alice.destroy_zone("kept")
            agents.cancel_scope.cancel()


def zone_domain(daemon: Daemon, zone: str) -> str:
    return daemon.config.domain_prefix + zone


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # nobody (65534) and nogroup are accounts: the range may not hold them.
        ({"zone_uid_base": 65000, "zone_uid_count": 1000}, "user nobody (65534)"),
        ({"admin_group": "no-such-group-here"}, "admin_group 'no-such-group-here' does not"),
    ],
)
async def test_a_bad_isolation_config_stops_the_daemon_before_it_changes_anything(
    short_tmp: Path, overrides: dict[str, object], message: str
) -> None:
    config = service_config(short_tmp, **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        await Daemon(config, zone_images=fake_zone_images).run()
    for directory in (config.state_dir, config.runtime_dir, config.log_dir):
        assert not os.path.exists(directory), directory
    assert not os.path.exists(config.socket_path)


async def test_pools_are_changed_by_root_and_administrators_only(daemon: Daemon) -> None:
    """Pool zones take every user's capacity: a user may list pools, not set or remove them."""
    with users(daemon) as relays:
        async with Client(relays.alice, client_name="alice") as alice:
            with pytest.raises(PermissionDenied, match="administrators"):
                await alice.set_pool("mine", p.PoolSpec(image="builtin", size=0))
            assert await alice.list_pools() == []
        async with Client(daemon.config.socket_path) as root:
            await root.set_pool("shared", p.PoolSpec(image="builtin", size=0))
        async with Client(relays.alice, client_name="alice") as alice:
            assert [pool.name for pool in await alice.list_pools()] == ["shared"]
            with pytest.raises(PermissionDenied):
                await alice.remove_pool("shared")
