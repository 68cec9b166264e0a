"""Observability on real zones: metrics, the audit trail, process events, logs
after destroy and their retention, quarantine (a frozen busy loop, its evidence
with the workload's marker in the memory dump, a full disk's partial bundle).

One private zoned serves the module, with its metrics on a Unix socket in its
directory; two zones are shared by the tests in file order (``ob-busy`` and
``ob-two``), and the last test boots a few ``run`` zones of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import msgspec
import pytest
import trio

from tests.exposition import Series, series
from tests.integration.conftest import domain_name, open_libvirt, private_zoned
from tests.integration.test_exec import connect
from tests.peers import hello_as_nobody
from tests.zone_events import watching
from tests.zonectl_run import zonectl, zonectl_text
from zoned.client import Client
from zoned.errors import Conflict, HypervisorError, NotFound
from zoned.evidence import verify
from zoned.localdaemon import LocalDaemon, http_get

pytestmark = pytest.mark.integration

BUSY, TWO = "ob-busy", "ob-two"
CALL_TIMEOUT_S = 180.0
#: The gone zones' logs may take this much in all (the last test fills it with runs).
RETENTION_BYTES = 100_000
#: A busy loop that holds a marker only its own computation makes (argv, the audit
#: trail and the events hold the expression, never its value).
MARKER = ("zoned-quarantine-marker-" + str(7**40)).encode()
BUSY_LOOP = "m = 'zoned-quarantine-marker-' + str(7 ** 40)\nwhile True:\n    pass\n"


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    root = Path(tempfile.mkdtemp(prefix="zoned-", dir="/tmp"))
    extra = "\n".join(
        [
            "metrics_enabled = true",
            f'metrics_listen = "{root / "metrics.sock"}"',
            "metrics_stats_max_age_s = 0.0",
            f'evidence_dir = "{root / "evidence"}"',
            f"log_retention_max_bytes = {RETENTION_BYTES}",
        ]
    )

    async def create(daemon: LocalDaemon) -> None:
        async with Client(daemon.socket, client_name="it") as client:
            with trio.fail_after(CALL_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: client.create_zone(BUSY, memory_mib=256))
                    nursery.start_soon(lambda: client.create_zone(TWO, memory_mib=128))

    with private_zoned("ob-", root, extra) as daemon:
        trio.run(create, daemon)
        yield daemon


async def scrape(daemon: LocalDaemon) -> Series:
    status, body = await trio.to_thread.run_sync(http_get, daemon.root / "metrics.sock")
    assert status == 200, body
    return series(body)


def of_zone(found: Series, name: str, zone: str, **labels: str) -> list[float]:
    return [
        value
        for series_labels, value in found.get(name, [])
        if series_labels.get("zone") == zone
        and all(series_labels.get(k) == v for k, v in labels.items())
    ]


def one(found: Series, name: str, zone: str, **labels: str) -> float:
    values = of_zone(found, name, zone, **labels)
    assert len(values) == 1, (name, zone, labels, found.get(name))
    return values[0]


def libvirt_cpu_ns(domain: str) -> int:
    conn = open_libvirt()
    try:
        return int(conn.lookupByName(domain).info()[4])
    finally:
        conn.close()


def libvirt_vcpu_ns(domain: str) -> int:
    """The guest's own CPU time: the vCPU threads only (QEMU's main loop still
    ticks a little while the guest is paused)."""
    conn = open_libvirt()
    try:
        vcpus, _ = conn.lookupByName(domain).vcpus()
        return sum(int(vcpu[2]) for vcpu in vcpus)
    finally:
        conn.close()


# ---------------------------------------------------------------- metrics


async def test_metrics_list_a_running_zone_and_agree_with_show(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client:
        await client.exec(BUSY, ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
        before = await client.zone_metrics(BUSY)
        found = await scrape(zoned)
        after = await client.zone_metrics(BUSY)
    shown = json.loads(zonectl_text(zoned, "show", BUSY, "--json").stdout)
    cpu = one(found, "zoned_zone_cpu_seconds_total", BUSY)
    assert before.cpu_time_s is not None and after.cpu_time_s is not None
    assert 0 < before.cpu_time_s <= cpu <= after.cpu_time_s
    rss = one(found, "zoned_zone_host_resident_memory_bytes", BUSY)
    assert before.host_rss_kib is not None and after.host_rss_kib is not None
    low, high = sorted((before.host_rss_kib * 1024, after.host_rss_kib * 1024))
    assert 0.75 * low <= rss <= 1.25 * high
    # The guest's own figures, apart from the host's.
    guest_total = one(found, "zoned_zone_guest_memory_total_bytes", BUSY)
    assert 0 < guest_total <= 256 * 1024 * 1024
    assert one(found, "zoned_zone_guest_processes", BUSY) >= 1
    assert one(found, "zoned_zone_agent_heartbeat_age_seconds", BUSY) >= 0
    # What zonectl show says, the metrics say.
    assert one(found, "zoned_zone_state", BUSY, state="ready") == 1
    assert one(found, "zoned_zone_vcpus", BUSY) == shown["vcpus"]
    assert one(found, "zoned_zone_memory_bytes", BUSY) == shown["memory_mib"] * 1024 * 1024
    assert one(found, "zoned_zone_created_timestamp_seconds", BUSY) == pytest.approx(
        shown["created_at"]
    )
    boot = shown["ready_at"] - shown["created_at"]
    assert one(found, "zoned_zone_boot_seconds", BUSY) == pytest.approx(boot)
    info = [labels for labels, _ in found["zoned_zone_info"] if labels["zone"] == BUSY]
    assert info[0]["uuid"] == shown["uuid"] and info[0]["profile"] == shown["profile"]
    assert [v for labels, v in found["zoned_zones"] if labels["state"] == "ready"] == [2.0]


async def test_an_oom_killed_exec_is_counted_and_every_exec_is_audited_and_watched(
    zoned: LocalDaemon,
) -> None:
    # One allocation well past the limit: the kernel finds nothing left to
    # reclaim and kills at once. (Growing by 1 MiB steps from the interpreter
    # loop lets the memory cgroup evict and refault the interpreter's own
    # pages for minutes under TCG before it gives up.)
    argv = ["python3", "-c", "data = b'x' * (96 << 20)"]
    async with connect(zoned) as client, connect(zoned) as watcher:
        oom_before = one(await scrape(zoned), "zoned_zone_execs_oom_killed_total", BUSY)
        started_before = one(await scrape(zoned), "zoned_zone_execs_started_total", BUSY)
        async with watching(watcher, ["exec_started", "exec_ended"]) as events:
            with trio.fail_after(CALL_TIMEOUT_S):
                # The watch is live once it reports a process of ours.
                while not any(e.kind == "exec_ended" for e in events.events):
                    await client.exec(BUSY, ["true"])
                    started_before += 1
                events.events.clear()
                killed = await client.exec(BUSY, argv, memory_limit_mib=32, env={"SECRET": "x"})
                await client.exec(BUSY, ["sh", "-c", "exit 3"], cwd="/tmp")
                ended = await events.wait_for(
                    lambda e: (
                        e.kind == "exec_ended"
                        and e.exec is not None
                        and e.exec.argv == ["sh", "-c", "exit 3"]
                    )
                )
        found = await scrape(zoned)
        records = [r async for r in client.audit(zone=BUSY)]
    assert killed.exit.oom_killed, killed
    assert one(found, "zoned_zone_execs_oom_killed_total", BUSY) == oom_before + 1
    assert one(found, "zoned_zone_execs_started_total", BUSY) == started_before + 2
    # The audit record: argv, cwd, user, how it ended, the environment by name only.
    oom_record = next(r for r in records if r.exec is not None and r.exec.argv == argv)
    assert oom_record.op == "exec" and oom_record.outcome == "ok"
    assert oom_record.exec is not None and oom_record.exec.oom_killed
    assert oom_record.exec.env_names == ["SECRET"] and oom_record.exec.memory_limit_mib == 32
    assert oom_record.caller.uid == os.getuid() and oom_record.caller.pid == os.getpid()
    exit_record = records[-1]
    assert exit_record.exec is not None
    assert (exit_record.exec.argv, exit_record.exec.cwd, exit_record.exec.exit_code) == (
        ["sh", "-c", "exit 3"],
        "/tmp",
        3,
    )
    assert exit_record.exec.pid is not None and exit_record.exec.duration_s is not None
    # The event carries the same fields as the audit record.
    assert ended.exec == exit_record.exec
    assert ended.caller == exit_record.caller
    started = [e for e in events.events if e.kind == "exec_started"]
    assert [e.exec.argv for e in started if e.exec] == [argv, ["sh", "-c", "exit 3"]]
    trail = (zoned.root / "log" / "audit.jsonl").read_bytes()
    assert b"SECRET" in trail and b'"x"' not in trail


def test_a_caller_outside_the_group_is_refused_and_audited(zoned: LocalDaemon) -> None:
    zoned.socket.chmod(0o666)  # let SO_PEERCRED decide, not the file mode
    nobody = pwd.getpwnam("nobody")
    assert "permission_denied" in hello_as_nobody(zoned.socket)
    lines = zonectl_text(zoned, "audit", "--json").stdout.splitlines()
    denied = [r for r in map(json.loads, lines) if r["outcome"] == "denied"]
    assert denied[-1]["caller"]["uid"] == nobody.pw_uid
    assert denied[-1]["error_code"] == "permission_denied"
    assert denied[-1]["caller"]["exe"].startswith("/usr/bin/python3")
    bad = zonectl_text(zoned, "audit", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since: expected a time" in bad.stderr


# ---------------------------------------------------------------- quarantine


@contextlib.contextmanager
def full_disk(path: Path, size: str = "2m") -> Iterator[None]:
    """A tiny tmpfs mounted over ``path``: the next big write fills it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


async def test_a_full_disk_makes_a_partial_bundle_and_harms_nothing_else(
    zoned: LocalDaemon,
) -> None:
    evidence = zoned.root / "evidence"
    with full_disk(evidence):
        result = zonectl_text(zoned, "quarantine", TWO, "--destroy", "--json")
        assert result.returncode == 0, result.stderr
        reply = msgspec.json.decode(result.stdout, type=dict)
        bundle = reply["bundle"]
        assert bundle["partial"] is True
        assert any(e.startswith("memory.elf:") for e in bundle["errors"]), bundle
        assert Path(bundle["path"], "PARTIAL").exists()
        names = {f["name"] for f in bundle["files"]}
        assert "zone.json" in names  # what fitted before the memory dump is whole
        assert verify(Path(bundle["path"])) == []
        assert "partial" in result.stderr
    assert reply["zone"]["state"] == "stopped"
    # The daemon and the other zone carry on.
    async with connect(zoned) as client:
        assert (await client.exec(BUSY, ["true"])).exit.exit_code == 0
        with pytest.raises(NotFound):
            await client.get_zone(TWO)
        assert b"zoned-agent: starting" in b"".join([c async for c in client.console_log(TWO)])


async def test_quarantine_freezes_a_busy_loop_and_collects_its_evidence(
    zoned: LocalDaemon,
) -> None:
    domain = domain_name(BUSY)
    async with connect(zoned) as client, trio.open_nursery() as nursery:
        lost: list[BaseException] = []

        async def busy(*, task_status: trio.TaskStatus[None]) -> None:
            async with client.exec_process(BUSY, ["python3", "-c", BUSY_LOOP]) as process:
                await process.started()
                task_status.started()
                try:
                    await process.wait()
                except HypervisorError as exc:
                    lost.append(exc)

        await nursery.start(busy)
        with trio.fail_after(CALL_TIMEOUT_S):
            # The loop runs: libvirt's CPU time grows.
            first = await trio.to_thread.run_sync(libvirt_cpu_ns, domain)
            while await trio.to_thread.run_sync(libvirt_cpu_ns, domain) < first + 500_000_000:
                await trio.sleep(0.2)
            result = await trio.to_thread.run_sync(lambda: zonectl_text(zoned, "quarantine", BUSY))
        assert result.returncode == 0, result.stderr
        assert "evidence: " in result.stdout and "PARTIAL" not in result.stdout
        frozen = await trio.to_thread.run_sync(libvirt_vcpu_ns, domain)
        await trio.sleep(3)
        assert await trio.to_thread.run_sync(libvirt_vcpu_ns, domain) == frozen
        conn = open_libvirt()
        try:
            assert conn.lookupByName(domain).state()[0] == libvirt.VIR_DOMAIN_PAUSED
        finally:
            conn.close()
        zone = await client.get_zone(BUSY)
        assert zone.state == "quarantined"
        with pytest.raises(Conflict, match="quarantined"):
            await client.exec(BUSY, ["true"])
    assert lost and "quarantined" in str(lost[0])
    path = Path(result.stdout.split("evidence: ", 1)[1].split(" (", 1)[0])
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["partial"] is False and manifest["errors"] == []
    names = {f["name"] for f in manifest["files"]}
    assert {
        "zone.json",
        "domain.xml",
        "kernel-manifest.json",
        "console.log",
        "audit.jsonl",
        "events.jsonl",
        "memory.elf",
    } <= names
    for entry in manifest["files"]:
        digest = hashlib.sha256((path / entry["name"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"], entry["name"]
    assert verify(path) == []
    assert manifest["identity"]["kernel_config_sha256"]
    assert oct(path.stat().st_mode & 0o777) == "0o700"
    assert contains(path / "memory.elf", MARKER)
    assert not contains(path / "audit.jsonl", MARKER)
    metrics = await scrape(zoned)
    assert one(metrics, "zoned_zone_state", BUSY, state="quarantined") == 1


def contains(path: Path, needle: bytes) -> bool:
    overlap = len(needle) - 1
    with path.open("rb") as source:
        tail = b""
        while block := source.read(8 * 1024 * 1024):
            if needle in tail + block:
                return True
            tail = block[-overlap:]
    return False


# ---------------------------------------------------------------- after the zone


async def test_destroy_is_audited_series_go_and_logs_stay(zoned: LocalDaemon) -> None:
    shown = json.loads(zonectl_text(zoned, "show", BUSY, "--json").stdout)
    destroyed = zonectl_text(zoned, "destroy", BUSY)
    assert destroyed.returncode == 0, destroyed.stderr
    found = await scrape(zoned)
    assert of_zone(found, "zoned_zone_state", BUSY) == []
    assert of_zone(found, "zoned_zone_cpu_seconds_total", BUSY) == []
    logs = zonectl(zoned, "logs", BUSY)
    assert logs.returncode == 0 and b"zoned-agent: starting" in logs.stdout
    by_uuid = zonectl(zoned, "logs", BUSY, "--uuid", shown["uuid"], "--tail", "100")
    assert by_uuid.returncode == 0 and by_uuid.stdout == logs.stdout[-100:]
    missing = zonectl_text(zoned, "logs", "ob-never")
    assert missing.returncode == 4 and "no kept logs" in missing.stderr
    records = [
        json.loads(line)
        for line in zonectl_text(zoned, "audit", "--zone", BUSY, "--json").stdout.splitlines()
    ]
    ops = [(r["op"], r["outcome"]) for r in records]
    assert ops[0] == ("create_zone", "ok") and ops[-1] == ("destroy_zone", "ok")
    assert ("quarantine_zone", "ok") in ops and ("exec", "ok") in ops
    assert {r["caller"]["uid"] for r in records} == {os.getuid()}
    assert {r["zone_uuid"] for r in records} == {shown["uuid"]}
    text = zonectl_text(zoned, "audit", "--zone", BUSY)
    assert text.returncode == 0 and "destroy_zone" in text.stdout
    again = zonectl_text(zoned, "quarantine", BUSY)
    assert again.returncode == 4 and "no zone named" in again.stderr


async def test_run_zones_logs_stay_within_the_retention(zoned: LocalDaemon) -> None:
    # Each run leaves its console log, audit record and events behind; with
    # a long argv each is large, and together they pass the retention's bytes.
    filler = "#" + "x" * 12_000
    names = []
    async with connect(zoned) as client:
        for _ in range(5):
            with trio.fail_after(CALL_TIMEOUT_S):
                async with client.run_process(["sh", "-c", "echo ran", filler]) as process:
                    await process.wait()
            assert process.zone is not None
            names.append(process.zone.name)
    zones_dir = zoned.root / "log" / "zones"
    with trio.fail_after(CALL_TIMEOUT_S):
        while True:
            kept = [d for d in zones_dir.glob("*/*") if d.is_dir()]
            total = sum(f.stat().st_size for d in kept for f in d.iterdir())
            if total <= RETENTION_BYTES and not (zones_dir / BUSY).exists():
                break
            await trio.sleep(0.2)
    kept_names = {d.parent.name for d in kept}
    assert names[-1] in kept_names  # the newest is kept
    assert names[0] not in kept_names  # the oldest went first
    assert BUSY not in kept_names and TWO not in kept_names
