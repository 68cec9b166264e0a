"""Observability through the real daemon on libvirt's test driver: the metrics
endpoint over real HTTP, the audit trail (a refused caller's too), logs that
outlive their zone and their retention, quarantine's refusals and its partial
bundle. Zones here never boot (the test driver runs no agent): real zones are
in tests/integration/test_observability.py."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from tests.exposition import series
from tests.peers import hello_as_nobody, relay_as, unused_uids
from tests.service.conftest import fake_zone_images, service_config
from tests.zone_events import watching
from zoned import protocol as p
from zoned import zonelogs
from zoned.client import Client
from zoned.daemon import Daemon
from zoned.errors import Conflict, HypervisorError, InvalidRequest, NotFound
from zoned.evidence import verify

GUARD_S = 60.0
ADMIN_GROUP = "staff"  # any group of the host: membership is what the relay is given


async def http(daemon: Daemon, raw: bytes) -> tuple[int, bytes]:
    """One raw HTTP exchange with the metrics endpoint: the status and the body."""
    assert daemon.monitor is not None
    host, _, port = daemon.monitor.metrics_address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(raw)
        data = bytearray()
        with trio.fail_after(GUARD_S):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def get(path: str, extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + extra + b"\r\n"


async def failed_zone(client: Client, name: str) -> p.ZoneInfo:
    """A zone of the test driver: it never hears an agent, so it fails its boot."""
    with pytest.raises(HypervisorError, match="failed to boot"):
        await client.create_zone(name)
    return await client.get_zone(name)


async def test_metrics_endpoint_serves_and_refuses_bad_requests(observed: Daemon) -> None:
    async with Client(observed.config.socket_path) as client:
        zone = await failed_zone(client, "m1")
        status, body = await http(observed, get("/metrics"))
        assert status == 200
        found = series(body)
        owner = str(os.getuid())
        image = observed.config.default_image  # a zone created without one: the default
        labels = {"zone": "m1", "profile": "strict", "image": image, "pool": "", "owner_uid": owner}
        state = [v for ls, v in found["zoned_zone_state"] if ls == {**labels, "state": "failed"}]
        assert state == [1.0]
        assert [v for ls, v in found["zoned_zones"] if ls["state"] == "failed"] == [1.0]
        assert [v for ls, v in found["zoned_zone_failures_total"] if ls["cause"] == "boot_timeout"]
        created = [v for ls, v in found["zoned_zone_creates_total"] if ls["result"] == "hypervisor"]
        assert created == [1.0]
        info = [ls for ls, _ in found["zoned_zone_info"]]
        assert info[0]["uuid"] == zone.uuid
        await client.destroy_zone("m1")
        _, after = await http(observed, get("/metrics"))
        gone = series(after)
        assert "zoned_zone_state" not in gone or not any(
            ls["zone"] == "m1" for ls, _ in gone["zoned_zone_state"]
        )
        assert [v for ls, v in gone["zoned_zone_destroys_total"] if ls["result"] == "ok"] == [1.0]
    assert (await http(observed, get("/nope")))[0] == 404
    assert (
        await http(
            observed,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        )
    )[0] == 405
    assert (await http(observed, get("/metrics", b"X: " + b"a" * 20_000 + b"\r\n")))[0] == 431
    big_body = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    assert (await http(observed, big_body))[0] == 413
    assert (await http(observed, b"\x16\x03\x01 not http\r\n\r\n"))[0] == 400
    # The daemon serves on after all of it.
    assert (await http(observed, get("/metrics")))[0] == 200


async def test_audit_records_changes_and_denials_and_reads_them_back(observed: Daemon) -> None:
    socket_path = observed.config.socket_path
    os.chmod(socket_path, 0o666)
    os.chmod(Path(socket_path).parent, 0o755)
    async with Client(socket_path) as client:
        await failed_zone(client, "a1")
        await client.destroy_zone("a1")
        with pytest.raises(NotFound):
            await client.destroy_zone("a1")
        await client.list_zones()  # a read: not audited
        denied_stdout = await trio.to_thread.run_sync(hello_as_nobody, Path(socket_path))
        assert "permission_denied" in denied_stdout
        records = [r async for r in client.audit()]
        ops = [(r.op, r.outcome, r.error_code, r.zone) for r in records]
        assert ops == [
            ("create_zone", "error", "hypervisor", "a1"),
            ("destroy_zone", "ok", "", "a1"),
            ("destroy_zone", "error", "not_found", "a1"),
            ("hello", "denied", "permission_denied", ""),
        ]
        me = records[0].caller
        assert (me.uid, me.pid) == (os.getuid(), os.getpid())
        assert me.exe == os.readlink("/proc/self/exe")
        assert records[0].zone_uuid and records[0].zone_uuid == records[1].zone_uuid
        nobody = records[-1].caller
        assert nobody.uid == pwd.getpwnam("nobody").pw_uid
        assert nobody.exe == "/usr/bin/python3.11" or nobody.exe.startswith("/usr/bin/python3")
        # Filters; a bad time is refused, nothing read.
        assert [r.op for r in await collect(client, zone="a1", since=records[1].time)] == [
            "destroy_zone",
            "destroy_zone",
        ]
        assert await collect(client, zone="nosuch") == []
        with pytest.raises(InvalidRequest, match="since"):
            await collect(client, since=-5.0)
    # The zone's own copy of its records outlives it, with its ended marker.
    zone_dirs = list((Path(observed.config.log_dir) / "zones" / "a1").iterdir())
    assert len(zone_dirs) == 1
    lines = (zone_dirs[0] / "audit.jsonl").read_bytes().splitlines()
    assert len(lines) == 2  # its create and its destroy (the refused destroy names no uuid)
    ended = msgspec.json.decode(
        (zone_dirs[0] / zonelogs.ENDED).read_bytes(), type=zonelogs.EndedZone
    )
    # Its last state, and why it had failed (the record's cause).
    assert (ended.state, ended.failure) == ("stopped", "boot_timeout"), ended
    assert b"creating" in (zone_dirs[0] / "events.jsonl").read_bytes()


async def collect(client: Client, **query: object) -> list[p.AuditRecord]:
    return [record async for record in client.audit(**query)]  # type: ignore[arg-type]


async def test_logs_outlive_their_zone_and_retention_bounds_them(observed: Daemon) -> None:
    async with Client(observed.config.socket_path) as client:
        uuids = []
        for index in range(4):
            zone = await failed_zone(client, "lg")
            uuids.append(zone.uuid)
            console = Path(zone.console_log)
            assert console.parent.name == zone.uuid
            # virtlogd writes the console of a real zone; its rotated copies count too.
            console.write_bytes(f"boot {index}\n".encode() * 50)
            console.with_name("console.log.0").write_bytes(b"older\n" * 50)
            await client.destroy_zone("lg")
            kept = b"".join([chunk async for chunk in client.console_log("lg")])
            assert kept == b"older\n" * 50 + f"boot {index}\n".encode() * 50
        tail = b"".join([chunk async for chunk in client.console_log("lg", tail_bytes=7)])
        assert tail == b"boot 3\n"
        assert observed.monitor is not None
        observed.monitor._prune_soon.set()
        await wait_until_pruned(observed, uuids[:-1])
        # The newest stays within the budget (3000 bytes); an older one is gone.
        assert b"boot 3" in b"".join([chunk async for chunk in client.console_log("lg")])
        with pytest.raises(NotFound, match="no kept logs"):
            async for _ in client.console_log("lg", uuid=uuids[0]):
                pass
        with pytest.raises(NotFound):
            async for _ in client.console_log("never-was"):
                pass


async def wait_until_pruned(daemon: Daemon, uuids: list[str]) -> None:
    root = Path(daemon.config.log_dir) / "zones" / "lg"
    with trio.fail_after(GUARD_S):
        while any((root / uuid).exists() for uuid in uuids[:2]):
            await trio.sleep(0.05)
    remaining = [entry.uuid for entry in zonelogs.scan(Path(daemon.config.log_dir))]
    assert uuids[0] not in remaining and uuids[1] not in remaining


async def test_quarantine_refusals_change_nothing(observed: Daemon) -> None:
    async with Client(observed.config.socket_path) as client:
        with pytest.raises(NotFound, match="no zone named 'ghost'"):
            await client.quarantine_zone("ghost")
        await failed_zone(client, "q0")
        with pytest.raises(Conflict, match="is failed: only a running zone"):
            await client.quarantine_zone("q0")
        assert (await client.get_zone("q0")).state == "failed"
        await client.destroy_zone("q0")
        with pytest.raises(NotFound):
            await client.quarantine_zone("q0")
    assert not Path(observed.config.evidence_dir).exists()


async def test_quarantine_of_a_booting_zone_freezes_it_and_bundles_what_it_can(
    observed: Daemon,
) -> None:
    async with (
        Client(observed.config.socket_path) as client,
        Client(observed.config.socket_path) as watcher,
        watching(watcher) as events,
    ):
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def create() -> None:
                with pytest.raises(Conflict, match="quarantined before it became ready"):
                    await client.create_zone("q1")

            nursery.start_soon(create)
            with trio.fail_after(GUARD_S):
                await events.wait_for_state("q1", "booting")
            reply = await client.quarantine_zone("q1")
        assert reply.zone.state == "quarantined"
        assert "quarantined" in (await client.get_zone("q1")).reason
        # The test driver cannot dump memory: the bundle is partial and says so.
        bundle = reply.bundle
        assert bundle.partial
        assert any(error.startswith("memory.elf:") for error in bundle.errors)
        names = {f.name for f in bundle.files}
        assert {"zone.json", "domain.xml", "kernel-manifest.json", "audit.jsonl"} <= names
        assert verify(Path(bundle.path)) == []
        assert (Path(bundle.path) / "PARTIAL").exists()
        assert oct(Path(bundle.path).stat().st_mode & 0o777) == "0o700"
        with pytest.raises(Conflict, match="quarantined"):
            await client.exec("q1", ["true"])
        # A second quarantine collects again; destroy ends it.
        again = await client.quarantine_zone("q1", destroy=True)
        assert again.zone.state == "stopped" and again.bundle.path != bundle.path
        records = [r async for r in client.audit(zone="q1")]
        assert [(r.op, r.outcome, r.error_code) for r in records][-3:] == [
            ("quarantine_zone", "ok", ""),
            ("exec", "error", "conflict"),
            ("quarantine_zone", "ok", ""),
        ]
        assert records[-1].bundle == again.bundle.path


async def test_callers_see_their_own_records_and_administrators_all(short_tmp: Path) -> None:
    short_tmp.chmod(0o711)  # other uids reach the socket through its directory
    config = service_config(short_tmp, admin_group=ADMIN_GROUP)
    zoned_gid = grp.getgrnam(config.socket_group).gr_gid
    admin_gid = grp.getgrnam(ADMIN_GROUP).gr_gid
    alice, bob, carol = unused_uids(3)
    socket_path = Path(config.socket_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(Daemon(config, zone_images=fake_zone_images).run)
        with (
            relay_as(alice, alice, [zoned_gid], socket_path) as as_alice,
            relay_as(bob, bob, [zoned_gid], socket_path) as as_bob,
            relay_as(carol, carol, [zoned_gid, admin_gid], socket_path) as as_carol,
        ):
            async with Client(as_alice) as client:
                await failed_zone(client, "alices")
                mine = await collect(client)
            async with Client(as_bob) as client:
                with pytest.raises(NotFound):  # her zone does not exist for him
                    await client.destroy_zone("alices")
                with pytest.raises(NotFound):
                    async for _ in client.console_log("alices"):
                        pass
                bobs = await collect(client)
                bobs_of_hers = await collect(client, zone="alices")
            async with Client(as_carol) as client:
                await client.destroy_zone("alices")
                everything = await collect(client)
            async with Client(as_alice) as client:
                kept = b"".join([chunk async for chunk in client.console_log("alices")])
                after = await collect(client, zone="alices")
        nursery.cancel_scope.cancel()
    assert [(r.op, r.caller.uid, r.owner_uid) for r in mine] == [("create_zone", alice, alice)]
    # Bob sees his own refused destroy (it named a zone he could not see), nothing of hers.
    assert [(r.op, r.error_code, r.caller.uid) for r in bobs] == [
        ("destroy_zone", "not_found", bob)
    ]
    assert [r.caller.uid for r in bobs_of_hers] == [bob]
    assert (bobs[0].zone_uuid, bobs[0].owner_uid) == ("", None)
    assert [(r.op, r.caller.uid) for r in everything] == [
        ("create_zone", alice),
        ("destroy_zone", bob),
        ("destroy_zone", carol),
    ]
    # Her zone's records (carol's destroy too) are hers to see; so is its kept log.
    # Bob's attempt names no zone of hers: his record does not say it exists.
    assert [(r.op, r.caller.uid) for r in after] == [
        ("create_zone", alice),
        ("destroy_zone", carol),
    ]
    assert kept == b""
