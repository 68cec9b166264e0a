"""zonectl's observability commands without a daemon: times, uuids, formatting."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import msgspec
import pytest

from tests.samples import minimal_zone
from zoned import protocol as p
from zoned.cli.args import parse_args, parse_since, parse_uuid
from zoned.cli.format import describe_exec, format_audit_table, format_event, format_quarantine

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC).timestamp()
CALLER = p.CallerInfo(uid=1000, gid=995, pid=42, exe="/usr/bin/python3.11")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - 30),
        ("10m", NOW - 600),
        ("2h", NOW - 7200),
        ("1.5d", NOW - 1.5 * 86400),
        ("@1700000000", 1_700_000_000.0),
        ("2026-12-02T11:00:00Z", NOW - 3600),
        ("2026-12-02T13:00:00+02:00", NOW - 3600),
        ("2026-12-02 11:00:00", NOW - 3600),  # no offset: UTC
    ],
)
def test_since_accepts_relative_unix_and_iso_times(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "yesterday", "10x", "@-5", "@1e99", "-3h", "2026-13-40"])
def test_since_refuses_what_is_not_a_time(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a time"):
        parse_since(text, NOW)


def test_bad_since_and_uuid_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["audit", "--since", "soon"])
    assert exited.value.code == 2
    assert "--since: expected a time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["logs", "web", "--uuid", "../../etc"])
    assert parse_uuid("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0") == (
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    )
    args = parse_args(["watch", "--zone", "web", "--kind", "exec_ended"])
    assert (args.zones, args.kinds) == (["web"], ["exec_ended"])
    assert parse_args(["quarantine", "web", "--destroy"]).destroy


EXEC = p.ExecRecord(
    argv=["sh", "-c", "exit 3"],
    cwd="/tmp",
    uid=1000,
    gid=1000,
    tty=False,
    stdin=False,
    pid=7,
    exit_code=3,
    cpu_time_s=0.25,
    memory_peak_kib=4096,
)


def test_processes_audit_lines_and_bundles_read_plainly() -> None:
    assert describe_exec(EXEC) == (
        "pid 7, sh -c exit 3, as 1000:1000, exit 3, cpu 0.25s, peak 4MiB"
    )
    killed = p.ExecRecord(
        argv=["x\x1b[31m"], cwd="/", uid=0, gid=0, tty=True, stdin=True, signal=9, oom_killed=True
    )
    assert describe_exec(killed) == "not started, x\\x1b[31m, tty, signal 9, OOM-killed"
    # A process of an image: its own command unless the request gave one, a user by name.
    of_image = p.ExecRecord(argv=[], cwd="/", uid=0, gid=0, tty=False, stdin=False, user="app")
    assert describe_exec(of_image) == "not started, (the image's command), as app"
    entry = msgspec.structs.replace(of_image, entrypoint=["python3", "-I"], argv=["app.py"])
    assert describe_exec(entry) == "not started, python3 -I app.py, as app"
    event = p.Event(seq=3, time=NOW, kind="exec_ended", zone="web", exec=EXEC, caller=CALLER)
    assert format_event(event).endswith(
        "zone web: process ended: " + describe_exec(EXEC) + " (uid 1000)"
    )
    table = format_audit_table(
        [
            p.AuditRecord(time=NOW, op="exec", outcome="ok", caller=CALLER, zone="web", exec=EXEC),
            p.AuditRecord(
                time=NOW,
                op="hello",
                outcome="denied",
                caller=CALLER,
                error_code="permission_denied",
                error="not in\nthe group",
            ),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["TIME", "UID", "PID", "EXE", "OP", "ZONE", "OUTCOME", "DETAIL"]
    assert "python3.11  exec   web   ok" in lines[1]
    assert lines[2].endswith("permission_denied: not in the group")
    bundle = p.EvidenceBundle(
        path="/e/web-1",
        size_bytes=3 * 1024 * 1024,
        partial=True,
        files=[p.EvidenceFile(name="zone.json", size_bytes=10, sha256="0" * 64)],
        errors=["memory.elf: No space left on device"],
    )
    zone = minimal_zone("web", state="quarantined", created_at=NOW)
    text = format_quarantine(p.QuarantineReply(id=1, zone=zone, bundle=bundle))
    assert text.splitlines() == [
        "zone web: quarantined (paused)",
        "evidence: /e/web-1 (3.0 MiB, 1 files, PARTIAL)",
        "  zone.json  10 B",
        "missing: memory.elf: No space left on device",
    ]
