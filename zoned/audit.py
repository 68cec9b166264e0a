"""The audit trail: one JSON line per control-socket request that changes or runs something.

A line is a :class:`~zoned.protocol.AuditRecord` (the wire type: ``zonectl
audit`` shows the records as they were written). What is audited, and what
each line holds, is the daemon's to decide (:mod:`zoned.daemon`); this
module writes, rotates, ships and reads them.

Rules:

- :meth:`AuditTrail.record` and :meth:`AuditTrail.event` never block: they
  queue. One writer task does the writes on a worker thread, one batch at a
  time and in the order they were queued (``fdatasync`` once per batch). At
  most :data:`MAX_QUEUED` wait; beyond that a record is dropped, counted and
  logged: a stalled disk must not grow the daemon's memory.
- The host's trail is ``log_dir/audit.jsonl`` (mode 0640); once it would grow
  past ``max_bytes`` it becomes ``audit.jsonl.1`` (the older ones move up
  one; ``max_files`` files are kept in all). A record of a zone also goes to
  that zone's own log directory (:mod:`zoned.zonelogs`), which outlives the
  zone for the log retention; a zone's events go there too
  (``events.jsonl``).
- Each record also goes to the systemd journal when there is one
  (:mod:`zoned.journal`): ``MESSAGE`` in words, ``PRIORITY`` (info, notice
  for errors, warning for denials), ``SYSLOG_IDENTIFIER=zoned``, a fixed
  ``MESSAGE_ID``, ``ZONED_*`` fields, and the JSON line as ``ZONED_AUDIT``.
- Nothing secret is written: the daemon passes an exec's environment by
  variable name only and never its input or output.
- Reading (:func:`read_records`) is blocking (worker threads); a line that
  does not decode is skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
import trio

from zoned import zonelogs
from zoned.journal import PRIORITY_INFO, PRIORITY_NOTICE, PRIORITY_WARNING, Journal
from zoned.protocol import MAX_AUDIT_ARGV_CHARS, AuditRecord, Event, ExecRecord

log = logging.getLogger(__name__)

TRAIL: Final = "audit.jsonl"
#: Records (and events) waiting to be written before new ones are dropped.
MAX_QUEUED: Final = 10_000
#: The journal's MESSAGE_ID of zoned's audit records (``journalctl MESSAGE_ID=...``).
MESSAGE_ID: Final = "6f8c4d3a2b1e4c5d9e7f0a1b2c3d4e5f"

_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(AuditRecord)


def bounded_argv(argv: Iterable[str]) -> tuple[list[str], bool]:
    """argv as the audit trail keeps it: at most :data:`MAX_AUDIT_ARGV_CHARS` in all."""
    kept: list[str] = []
    budget = MAX_AUDIT_ARGV_CHARS
    for arg in argv:
        if len(arg) > budget:
            if budget > 0:
                kept.append(arg[:budget])
            return kept, True
        kept.append(arg)
        budget -= len(arg)
    return kept, False


def encode_line(record: AuditRecord) -> bytes:
    return _ENCODER.encode(record) + b"\n"


def describe(record: AuditRecord) -> str:
    """One sentence for the journal's MESSAGE."""
    who = f"uid {record.caller.uid}"
    if record.caller.exe:
        who += f" ({os.path.basename(record.caller.exe)})"
    what = record.op + (f" {record.zone}" if record.zone else "")
    if record.outcome == "ok":
        result = "ok"
    else:
        result = f"{record.outcome}: {record.error_code}: {record.error}".rstrip(": ")
    detail = ""
    exec_ = record.exec
    if exec_ is not None:
        detail = f" argv={exec_.argv[:8]!r}"
        if exec_.exit_code is not None:
            detail += f" exit={exec_.exit_code}"
        if exec_.signal is not None:
            detail += f" signal={exec_.signal}"
        if exec_.oom_killed:
            detail += " oom_killed"
    return f"zoned audit: {who} {what}: {result}{detail}"


def journal_fields(record: AuditRecord, line: bytes) -> dict[str, str | bytes | int]:
    priority = {"ok": PRIORITY_INFO, "error": PRIORITY_NOTICE, "denied": PRIORITY_WARNING}
    fields: dict[str, str | bytes | int] = {
        "MESSAGE": describe(record),
        "PRIORITY": priority[record.outcome],
        "SYSLOG_IDENTIFIER": "zoned",
        "MESSAGE_ID": MESSAGE_ID,
        "ZONED_OP": record.op,
        "ZONED_OUTCOME": record.outcome,
        "ZONED_CALLER_UID": record.caller.uid,
        "ZONED_CALLER_GID": record.caller.gid,
        "ZONED_CALLER_PID": record.caller.pid,
    }
    optional = {
        "ZONED_CALLER_EXE": record.caller.exe,
        "ZONED_ZONE": record.zone,
        "ZONED_ZONE_UUID": record.zone_uuid,
        "ZONED_ERROR_CODE": record.error_code,
    }
    fields.update({name: value for name, value in optional.items() if value})
    fields["ZONED_AUDIT"] = line.rstrip(b"\n")
    return fields


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    data: bytes
    #: The zone's log directory and the file there, if the line goes there too.
    zone_dir: Path | None
    zone_file: str
    #: Goes to the host's trail (and the journal).
    record: AuditRecord | None


@dataclass(frozen=True)
class _Call:
    """Run ``fn`` on the writer's thread after everything queued before it;
    ``done`` is set (on trio's thread) once it ran."""

    fn: Callable[[], None] | None
    done: trio.Event | None = None


_Job = _Line | _Call


@dataclass
class AuditStats:
    written: int = 0
    dropped: int = 0
    write_errors: int = 0
    journal_failures: int = 0


@dataclass
class AuditTrail:
    """The daemon's audit trail; :meth:`run` is its writer task."""

    log_dir: Path
    max_bytes: int
    max_files: int
    journal: Journal | None = None
    stats: AuditStats = field(default_factory=AuditStats)

    def __post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[_Job](MAX_QUEUED)

    @property
    def path(self) -> Path:
        return self.log_dir / TRAIL

    # -- queueing (sync, never blocks) --

    def record(self, record: AuditRecord) -> None:
        zone_dir = self._zone_dir(record.zone, record.zone_uuid)
        self._queue(_Line(encode_line(record), zone_dir, zonelogs.AUDIT_LOG, record))

    def event(self, event: Event, zone_uuid: str) -> None:
        """A zone's event, for its own log directory (``events.jsonl``)."""
        zone_dir = self._zone_dir(event.zone, zone_uuid)
        if zone_dir is not None:
            self._queue(_Line(_ENCODER.encode(event) + b"\n", zone_dir, zonelogs.EVENTS_LOG, None))

    def _zone_dir(self, zone: str, uuid: str) -> Path | None:
        if not zone or not uuid:
            return None
        try:
            return zonelogs.zone_log_dir(self.log_dir, zone, uuid)
        except ValueError:
            return None

    def run_in_order(self, fn: Callable[[], None]) -> None:
        """Run blocking ``fn`` on the writer's thread, after what is queued now."""
        self._queue(_Call(fn))

    async def barrier(self) -> None:
        """Wait until everything queued before now is written (the writer must run)."""
        done = trio.Event()
        await self._send.send(_Call(None, done))
        await done.wait()

    def _queue(self, line: _Job) -> None:
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.stats.dropped += 1
            if self.stats.dropped in (1, 10, 100) or self.stats.dropped % 1000 == 0:
                log.error(
                    "audit trail: %d record(s) dropped so far: %d are waiting for the disk",
                    self.stats.dropped,
                    MAX_QUEUED,
                )

    # -- the writer --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write until cancelled; on cancellation, write what is already queued."""
        await trio.Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        task_status.started()
        try:
            while True:
                batch = [await self._receive.receive()]
                batch += self._drain()
                await self._write(batch)
        finally:
            with trio.CancelScope(shield=True):
                if rest := self._drain():
                    await self._write(rest)

    def _drain(self) -> list[_Job]:
        batch: list[_Job] = []
        while len(batch) < 1000:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return batch

    async def _write(self, batch: list[_Job]) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self._write_batch, batch)
            except Exception:
                self.stats.write_errors += 1
                log.exception("audit trail: writing %d line(s) failed", len(batch))
            for job in batch:
                if isinstance(job, _Call) and job.done is not None:
                    job.done.set()

    def _write_batch(self, batch: list[_Job]) -> None:
        """Blocking: the host's trail, the zones' files, the journal, queued calls;
        in order (lines up to a call are written before it runs)."""
        lines: list[_Line] = []
        for job in batch:
            if isinstance(job, _Line):
                lines.append(job)
                continue
            self._write_lines(lines)
            lines = []
            if job.fn is not None:
                try:
                    job.fn()
                except Exception:
                    self.stats.write_errors += 1
                    log.exception("audit trail: a queued step failed")
        self._write_lines(lines)

    def _write_lines(self, batch: list[_Line]) -> None:
        trail_lines = [line for line in batch if line.record is not None]
        if trail_lines:
            self._append_to_trail([line.data for line in trail_lines])
        for line in batch:
            if line.zone_dir is not None:
                try:
                    zonelogs.append_line(line.zone_dir, line.zone_file, line.data)
                except OSError as exc:
                    self.stats.write_errors += 1
                    log.warning("audit trail: cannot write to %s: %s", line.zone_dir, exc)
            if line.record is not None:
                self.stats.written += 1
                if self.journal is not None and not self.journal.send(
                    journal_fields(line.record, line.data)
                ):
                    self.stats.journal_failures += 1

    def _append_to_trail(self, lines: list[bytes]) -> None:
        """Append, rotating before a line that would take the file past max_bytes."""
        path = self.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        pending: list[bytes] = []
        pending_size = 0
        for line in lines:
            if size + pending_size + len(line) > self.max_bytes and size + pending_size > 0:
                _append(path, b"".join(pending))
                rotate(path, self.max_files)
                size, pending, pending_size = 0, [], 0
            pending.append(line)
            pending_size += len(line)
        if pending:
            _append(path, b"".join(pending))


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def rotate(path: Path, max_files: int) -> None:
    """``path`` -> ``path.1`` -> ... -> ``path.<max_files - 1>``; the oldest is dropped."""
    oldest = path.with_name(f"{path.name}.{max_files - 1}")
    if max_files <= 1:
        path.unlink(missing_ok=True)
        return
    oldest.unlink(missing_ok=True)
    for index in range(max_files - 2, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(
                path.with_name(f"{path.name}.{index}"), path.with_name(f"{path.name}.{index + 1}")
            )
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, path.with_name(f"{path.name}.1"))


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def trail_files(log_dir: Path, max_files: int) -> list[Path]:
    """The host trail's files, oldest first (those that exist)."""
    path = log_dir / TRAIL
    names = [path.with_name(f"{path.name}.{i}") for i in range(max_files - 1, 0, -1)]
    return [p for p in [*names, path] if p.is_file()]


@dataclass
class ReadStats:
    corrupt_lines: int = 0


def _records_of(handles: Iterable[Iterable[bytes]], stats: ReadStats) -> Iterator[AuditRecord]:
    for handle in handles:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield _DECODER.decode(line)
            except msgspec.DecodeError:
                stats.corrupt_lines += 1


def read_records(
    log_dir: Path,
    max_files: int,
    *,
    zone: str = "",
    since: float | None = None,
    visible: Callable[[AuditRecord], bool] = lambda _record: True,
    stats: ReadStats | None = None,
) -> Generator[AuditRecord, None, None]:
    """The records ``visible`` lets through, oldest first; blocking (advance it in
    a worker thread).

    The host's trail is opened whole first (a rotation while reading moves
    no record under the reader). With ``zone``, the zone's own files (every
    zone of that name whose logs are kept) come in too, so that a gone
    zone's records outlast the trail's rotation; a record found in both is
    given once.
    """
    stats = stats if stats is not None else ReadStats()
    handles = []
    for path in trail_files(log_dir, max_files):
        with contextlib.suppress(FileNotFoundError):
            handles.append(path.open("rb"))
    zone_files = []
    zone_uuids: set[str] = set()
    if zone:
        for entry in zonelogs.scan(log_dir, [zone]):
            with contextlib.suppress(FileNotFoundError):
                zone_files.append((entry.path / zonelogs.AUDIT_LOG).open("rb"))
                zone_uuids.add(entry.uuid)
    try:

        def wanted(record: AuditRecord) -> bool:
            if zone and record.zone != zone:
                return False
            if since is not None and record.time < since:
                return False
            return visible(record)

        trail = (
            record
            for record in _records_of(handles, stats)
            if not (zone and record.zone_uuid in zone_uuids)
        )
        per_zone = [_records_of([handle], stats) for handle in zone_files]
        merged = heapq.merge(trail, *per_zone, key=lambda record: record.time)
        for record in merged:
            if wanted(record):
                yield record
    finally:
        for handle in [*handles, *zone_files]:
            handle.close()


def exec_record_of(
    argv: Iterable[str],
    *,
    cwd: str,
    uid: int,
    gid: int,
    tty: bool,
    stdin: bool,
    env_names: Iterable[str],
    memory_limit_mib: int | None,
    pids_limit: int | None,
    user: str | None = None,
    entrypoint: Iterable[str] | None = None,
) -> ExecRecord:
    """What the trail keeps of a process being started (no env values, no input)."""
    kept, truncated = bounded_argv(argv)
    entry: list[str] | None = None
    if entrypoint is not None:
        entry, entry_truncated = bounded_argv(entrypoint)
        truncated = truncated or entry_truncated
    return ExecRecord(
        user=user,
        entrypoint=entry,
        argv=kept,
        argv_truncated=truncated,
        cwd=cwd,
        uid=uid,
        gid=gid,
        tty=tty,
        stdin=stdin,
        env_names=sorted(env_names),
        memory_limit_mib=memory_limit_mib,
        pids_limit=pids_limit,
    )
