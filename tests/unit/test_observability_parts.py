"""The parts of observability that need no daemon: retention plans, the audit
trail's files, the journal's wire format, the metrics' rendering, bundles."""

from __future__ import annotations

import os
import socket
import uuid as uuidlib
from pathlib import Path

import pytest
import trio

from tests.exposition import Series, series
from zoned import audit, journal, zonelogs
from zoned import protocol as p
from zoned.evidence import Bundle, verify
from zoned.metrics import HostSample, Snapshot, Telemetry, ZoneCounters, ZoneSample, render
from zoned.net.accounting import NetCounters
from zoned.virt import BulkDomainStats

CALLER = p.CallerInfo(uid=1000, gid=995, pid=77, exe="/usr/bin/python3")


def new_uuid() -> str:
    return str(uuidlib.uuid4())


# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------


def logs(name: str, ended_at: float, size: int) -> zonelogs.ZoneLogs:
    uuid = new_uuid()
    return zonelogs.ZoneLogs(
        name=name,
        uuid=uuid,
        path=Path("/nonexistent") / uuid,
        size_bytes=size,
        ended_at=ended_at,
        ended=None,
    )


def test_retention_prunes_by_age_then_by_size_and_count_oldest_first() -> None:
    live = logs("live", 0.0, 10**9)
    old = logs("old", 100.0, 1)
    a, b, c = logs("a", 900.0, 400), logs("b", 950.0, 400), logs("c", 990.0, 400)
    entries = [c, live, old, a, b]
    plan = zonelogs.plan_prune(
        entries, {live.uuid}, 1000.0, zonelogs.Retention(max_age_s=500, max_bytes=800, max_zones=10)
    )
    # Too old first, then the oldest of the rest until the total fits; never the live one.
    assert plan == [old, a]
    by_count = zonelogs.plan_prune(
        entries,
        {live.uuid},
        1000.0,
        zonelogs.Retention(max_age_s=1e9, max_bytes=10**9, max_zones=1),
    )
    assert by_count == [old, a, b]
    keep_all = zonelogs.Retention(max_age_s=1e9, max_bytes=10**9, max_zones=10)
    assert zonelogs.plan_prune(entries, {live.uuid}, 1000.0, keep_all) == []


def test_zone_logs_found_pruned_and_never_recreated(tmp_path: Path) -> None:
    first, second = new_uuid(), new_uuid()
    one = zonelogs.make_zone_log_dir(tmp_path, "web", first)
    (one / "console.log").write_bytes(b"new\n")
    (one / "console.log.0").write_bytes(b"older\n")
    (one / "console.log.1").write_bytes(b"oldest\n")
    zonelogs.mark_ended(
        one,
        zonelogs.EndedZone(name="web", uuid=first, ended_at=10.0, created_at=1.0, state="stopped"),
    )
    two = zonelogs.make_zone_log_dir(tmp_path, "web", second)
    zonelogs.mark_ended(
        two,
        zonelogs.EndedZone(
            name="web", uuid=second, ended_at=20.0, created_at=11.0, state="stopped"
        ),
    )
    assert [f.name for f in zonelogs.console_files(one)] == [
        "console.log.1",
        "console.log.0",
        "console.log",
    ]
    # The newest gone zone of that name, or the one asked for.
    assert zonelogs.find_kept(tmp_path, "web", None, set()).uuid == second  # type: ignore[union-attr]
    assert zonelogs.find_kept(tmp_path, "web", first, set()).uuid == first  # type: ignore[union-attr]
    assert zonelogs.find_kept(tmp_path, "web", None, {first, second}) is None
    removed = zonelogs.prune(
        tmp_path, set(), 25.0, zonelogs.Retention(max_age_s=1e9, max_bytes=10**9, max_zones=1)
    )
    assert [entry.uuid for entry in removed] == [first]
    assert not one.exists() and two.exists()
    # A late write to a pruned zone creates nothing.
    assert not zonelogs.append_line(one, zonelogs.AUDIT_LOG, b"{}\n")
    assert not one.exists()
    # Names and uuids are checked before they become paths.
    with pytest.raises(ValueError):
        zonelogs.zone_log_dir(tmp_path, "../etc", first)
    with pytest.raises(ValueError):
        zonelogs.zone_log_dir(tmp_path, "web", "../../x")


# --------------------------------------------------------------------------
# The audit trail's files
# --------------------------------------------------------------------------


def record(time: float, zone: str = "", zone_uuid: str = "", op: str = "exec") -> p.AuditRecord:
    return p.AuditRecord(
        time=time, op=op, outcome="ok", caller=CALLER, zone=zone, zone_uuid=zone_uuid
    )


async def test_trail_rotates_by_size_and_reads_back_in_order(tmp_path: Path) -> None:
    trail = audit.AuditTrail(tmp_path, max_bytes=2000, max_files=3)
    zone_uuid = new_uuid()
    zone_dir = zonelogs.make_zone_log_dir(tmp_path, "web", zone_uuid)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.run)
        for index in range(60):
            zone = "web" if index % 2 else "other"
            trail.record(record(float(index), zone, zone_uuid if zone == "web" else ""))
        nursery.cancel_scope.cancel()  # the writer finishes what is queued
    files = audit.trail_files(tmp_path, 3)
    assert [f.name for f in files] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    assert all(f.stat().st_size <= 2000 for f in files)
    everything = list(audit.read_records(tmp_path, 3))
    times = [r.time for r in everything]
    assert times == sorted(times) and times[-1] == 59.0 and times[0] > 0.0  # oldest rotated out
    # The zone's own file kept all of its records, past the trail's rotation.
    assert len((zone_dir / "audit.jsonl").read_bytes().splitlines()) == 30
    web = list(audit.read_records(tmp_path, 3, zone="web"))
    assert [r.time for r in web] == [float(i) for i in range(1, 60, 2)]
    recent = list(audit.read_records(tmp_path, 3, zone="web", since=50.0))
    assert [r.time for r in recent] == [51.0, 53.0, 55.0, 57.0, 59.0]
    mine = list(audit.read_records(tmp_path, 3, visible=lambda r: r.zone == "other"))
    assert {r.zone for r in mine} == {"other"}


def test_a_corrupt_line_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").write_bytes(
        audit.encode_line(record(1.0)) + b"{not json\n" + audit.encode_line(record(2.0))
    )
    stats = audit.ReadStats()
    assert [r.time for r in audit.read_records(tmp_path, 2, stats=stats)] == [1.0, 2.0]
    assert stats.corrupt_lines == 1


def test_argv_is_bounded_and_env_values_never_kept() -> None:
    kept, truncated = audit.bounded_argv(["a" * 10_000, "b" * 10_000, "c"])
    assert truncated and sum(map(len, kept)) == p.MAX_AUDIT_ARGV_CHARS
    entry = audit.exec_record_of(
        ["sh", "-c", "true"],
        cwd="/",
        uid=0,
        gid=0,
        tty=False,
        stdin=False,
        env_names={"TOKEN": "s3cret", "PATH": "/bin"},
        memory_limit_mib=None,
        pids_limit=None,
    )
    assert entry.env_names == ["PATH", "TOKEN"]
    assert (entry.user, entry.entrypoint) == (None, None)  # the image's own
    of_image = audit.exec_record_of(
        [],
        cwd="/srv",
        uid=0,
        gid=0,
        tty=False,
        stdin=False,
        env_names=[],
        memory_limit_mib=None,
        pids_limit=None,
        user="app:staff",
        entrypoint=["x" * 20_000],
    )
    assert of_image.user == "app:staff" and of_image.argv_truncated
    assert of_image.entrypoint == ["x" * p.MAX_AUDIT_ARGV_CHARS]
    assert b"s3cret" not in audit.encode_line(
        p.AuditRecord(time=0.0, op="exec", outcome="ok", caller=CALLER, exec=entry)
    )


# --------------------------------------------------------------------------
# The journal's native protocol, over a real datagram socket
# --------------------------------------------------------------------------


def test_journal_entries_reach_the_socket_in_the_native_format(tmp_path: Path) -> None:
    path = tmp_path / "journal.sock"
    assert journal.open_journal(path) is None  # no journald: said by the caller, not raised
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        sink = journal.open_journal(path)
        assert sink is not None
        line = audit.encode_line(record(5.0, "web", new_uuid()))
        fields = audit.journal_fields(record(5.0, "web"), line)
        fields["ZONED_MULTILINE"] = "two\nlines"
        assert sink.send(fields)
        got = journal.decode_entry(receiver.recv(1 << 16))
        assert got["SYSLOG_IDENTIFIER"] == b"zoned"
        assert got["PRIORITY"] == b"6"
        assert got["MESSAGE_ID"] == audit.MESSAGE_ID.encode()
        assert got["ZONED_ZONE"] == b"web" and got["ZONED_CALLER_UID"] == b"1000"
        assert got["ZONED_MULTILINE"] == b"two\nlines"
        assert got["MESSAGE"].startswith(b"zoned audit: uid 1000 (python3) exec web: ok")
        # Larger than a datagram may be: sent as a sealed memfd.
        big = {"MESSAGE": "x" * 400_000}
        assert sink.send(big)
        data, fds, _flags, _addr = socket.recv_fds(receiver, 1 << 16, 1)
        assert data == b"" and len(fds) == 1
        with os.fdopen(fds[0], "rb") as memfd:
            memfd.seek(0)
            assert journal.decode_entry(memfd.read()) == {"MESSAGE": b"x" * 400_000}
        sink.close()
    finally:
        receiver.close()
    with pytest.raises(ValueError, match="field name"):
        journal.encode_entry({"_TRUSTED": "x"})


# --------------------------------------------------------------------------
# Metrics, parsed by prometheus-client's own parser
# --------------------------------------------------------------------------


def sample_zone(**changes: object) -> ZoneSample:
    values: dict[str, object] = {
        "name": "web",
        "uuid": new_uuid(),
        "state": "ready",
        "profile": "strict",
        "vcpus": 2,
        "memory_mib": 256,
        "machine": "microvm",
        "accelerator": "tcg",
        "created_at": 100.0,
        "ready_at": 103.0,
        "guest_boot_s": 1.5,
        "owner_uid": 1000,
        "host": BulkDomainStats(
            name="zoned-web", state="running", cpu_time_ns=2_500_000_000, rss_kib=300_000
        ),
        "host_sampled_at": 109.0,
        "guest": p.GuestMetrics(
            uptime_s=5.0,
            load1=0.5,
            mem_total_kib=240_000,
            mem_available_kib=200_000,
            processes=9,
            reported_at=109.5,
        ),
        "heartbeat_at": 109.5,
        "execs_running": 1,
        "counters": ZoneCounters(execs_started=3, execs_failed=1, execs_oom_killed=1),
    }
    values.update(changes)
    return ZoneSample(**values)  # type: ignore[arg-type]


HOST = HostSample(
    cpus_online=2,
    cpus_reserved=0,
    cpus_free_exclusive=1,
    cpus_shared_pool=2,
    memory_total_mib=24000,
    memory_reserved_mib=1024,
    memory_free_mib=20000,
    started_at=1.0,
    accelerator="tcg",
)


def value(found: Series, name: str, **labels: str) -> float:
    matches = [v for ls, v in found[name] if all(ls.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


def test_metrics_render_host_and_guest_views_apart() -> None:
    telemetry = Telemetry()
    telemetry.requests[("create_zone", "ok")] += 2
    telemetry.requests[("hello", "permission_denied")] += 1
    telemetry.failures["boot_timeout"] += 1
    stopped = sample_zone(
        name="old",
        state="stopped",
        host=None,
        guest=None,
        heartbeat_at=None,
        net=NetCounters(bytes_out=5, connections_refused=2),
    )
    text = render(
        Snapshot(now=110.0, host=HOST, zones=[sample_zone(), stopped], telemetry=telemetry)
    )
    found = series(text)
    web = {"zone": "web", "profile": "strict", "owner_uid": "1000"}
    assert value(found, "zoned_zone_cpu_seconds_total", **web) == 2.5
    assert value(found, "zoned_zone_host_resident_memory_bytes", **web) == 300_000 * 1024
    assert value(found, "zoned_zone_guest_memory_total_bytes", **web) == 240_000 * 1024
    assert value(found, "zoned_zone_guest_processes", **web) == 9
    assert value(found, "zoned_zone_state", state="ready", **web) == 1
    assert value(found, "zoned_zone_state", state="failed", **web) == 0
    assert value(found, "zoned_zone_boot_seconds", **web) == 3.0
    assert value(found, "zoned_zone_agent_heartbeat_age_seconds", **web) == 0.5
    assert value(found, "zoned_zone_execs_oom_killed_total", **web) == 1
    assert value(found, "zoned_zones", state="ready") == 1
    assert value(found, "zoned_zones", state="stopped") == 1
    assert value(found, "zoned_host_memory_bytes", kind="free") == 20000 * 1024 * 1024
    assert value(found, "zoned_requests_total", op="hello", result="permission_denied") == 1
    assert value(found, "zoned_zone_failures_total", cause="boot_timeout") == 1
    # No libvirt sample, no host series; no network, no network series.
    assert not [ls for ls, _ in found["zoned_zone_cpu_seconds_total"] if ls["zone"] == "old"]
    assert "zoned_zone_network_transmit_bytes_total" in found
    assert [ls["zone"] for ls, _ in found["zoned_zone_network_transmit_bytes_total"]] == ["old"]
    # Labels a zone does not have are empty (no image, no pool).
    assert {ls["image"] for ls, _ in found["zoned_zone_info"]} == {""}


def test_metrics_render_each_pool() -> None:
    pool = p.PoolInfo(
        name="py",
        spec=p.PoolSpec(size=3),
        ready=2,
        booting=1,
        hits=4,
        misses=1,
        refill_failures=2,
        acquire_mean_s=0.005,
    )
    taken = sample_zone(pool="py")
    text = render(
        Snapshot(now=110.0, host=HOST, zones=[taken], telemetry=Telemetry(), pools=[pool])
    )
    found = series(text)
    assert value(found, "zoned_pool_size", pool="py") == 3
    assert value(found, "zoned_pool_zones", pool="py", state="ready") == 2
    assert value(found, "zoned_pool_zones", pool="py", state="booting") == 1
    assert value(found, "zoned_pool_hits_total", pool="py") == 4
    assert value(found, "zoned_pool_misses_total", pool="py") == 1
    assert value(found, "zoned_pool_refill_failures_total", pool="py") == 2
    assert value(found, "zoned_pool_acquire_seconds_count", pool="py") == 4
    assert value(found, "zoned_pool_acquire_seconds_sum", pool="py") == 0.02
    assert {ls["pool"] for ls, _ in found["zoned_zone_info"]} == {"py"}


# --------------------------------------------------------------------------
# Evidence bundles
# --------------------------------------------------------------------------


def test_a_bundle_lists_whole_files_and_sums_that_verify(tmp_path: Path) -> None:
    source = tmp_path / "console.log"
    source.write_bytes(b"boot\n" * 1000)
    link = tmp_path / "link"
    link.symlink_to(source)
    bundle = Bundle.create(tmp_path / "evidence", "web", new_uuid(), 0.0)
    assert bundle.add_bytes("zone.json", b"{}")
    assert bundle.add_copy("console.log", source)
    assert not bundle.add_copy("planted", link)  # a link is never followed
    assert not bundle.add_copy("gone", tmp_path / "nothing")
    result = bundle.finish(
        zone="web",
        uuid="u",
        domain_name="zoned-web",
        collected_by=CALLER,
        zone_state="quarantined",
        identity={},
        notes=[],
    )
    assert result.partial and len(result.errors) == 2
    assert [f.name for f in result.files] == ["zone.json", "console.log"]
    assert (Path(result.path) / "PARTIAL").exists()
    assert verify(Path(result.path)) == []
    assert oct((tmp_path / "evidence").stat().st_mode & 0o777) == "0o700"


def test_console_logs_of_the_old_layout_are_pruned_unless_their_zone_lives(
    tmp_path: Path,
) -> None:
    (tmp_path / "old.console.log").write_bytes(b"x" * 100)
    (tmp_path / "old.console.log.0").write_bytes(b"y" * 100)
    (tmp_path / "kept.console.log").write_bytes(b"z" * 100)
    (tmp_path / "audit.jsonl").write_bytes(b"{}\n")
    legacy = {entry.name: entry for entry in zonelogs.scan_legacy(tmp_path)}
    assert set(legacy) == {"old", "kept"} and legacy["old"].size_bytes == 200
    nothing_kept = zonelogs.Retention(max_age_s=0.0, max_bytes=0, max_zones=0)
    removed = zonelogs.prune(tmp_path, set(), 1e10, nothing_kept, live_names=["kept"])
    assert [entry.name for entry in removed] == ["old"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["audit.jsonl", "kept.console.log"]
