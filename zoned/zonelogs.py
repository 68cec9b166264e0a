"""Where a zone's logs live, and how long they outlive it (retention).

Layout under ``log_dir``::

  audit.jsonl, audit.jsonl.1, ...   the host's audit trail (zoned.audit), rotated by size
  zones/<name>/<uuid>/              one directory per zone that ever existed
      console.log, console.log.0 .. its serial console (virtlogd writes it; .0 is
                                    its newest rotated copy)
      audit.jsonl                   its audit records
      events.jsonl                  its events (state changes, processes)
      ended.json                    once it is gone: its last record (EndedZone)

Rules:

- A zone's directory is made when the zone is, keyed by its uuid, so a new
  zone of the same name never overwrites the logs of an old one.
- While the zone exists its directory is never pruned. Once it is gone
  (destroyed, or its creation undone) the directory stays for
  ``log_retention_s`` and within the budget of every gone zone's logs
  together: ``log_retention_max_bytes`` and ``log_retention_max_zones``;
  past either, the oldest go first (:func:`plan_prune`, pure). virtlogd's
  rotated copies are in the directory: they count, and go with it.
- A directory of no existing zone without ``ended.json`` (the daemon died
  before writing it) counts as ended at its last change.
- Writers never create a zone's directory after it was made: a late write
  to a pruned zone is dropped, not a directory that nothing prunes.
- Everything here is blocking file IO (worker threads) except
  :func:`plan_prune`; names are checked before they become paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from zoned.protocol import UUID_PATTERN, ZONE_NAME_PATTERN

log = logging.getLogger(__name__)

ZONES_DIR: Final = "zones"
CONSOLE_LOG: Final = "console.log"
AUDIT_LOG: Final = "audit.jsonl"
EVENTS_LOG: Final = "events.jsonl"
ENDED: Final = "ended.json"

_NAME: Final = re.compile(ZONE_NAME_PATTERN)
_UUID: Final = re.compile(UUID_PATTERN)


class EndedZone(msgspec.Struct, frozen=True, kw_only=True):
    """What is kept of a gone zone beside its logs."""

    name: str
    uuid: str
    ended_at: float
    created_at: float
    # Its last state before it went ("stopped" for a destroyed zone).
    state: str
    reason: str = ""
    # Why it failed, if it did (zoned.failures' cause; "" otherwise).
    failure: str = ""
    owner_uid: int | None = None
    profile: str = ""
    labels: dict[str, str] = {}


_ENDED_DECODER: Final = msgspec.json.Decoder(EndedZone)


def _check(name: str, uuid: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid zone name {name!r}")
    if not _UUID.fullmatch(uuid):
        raise ValueError(f"invalid zone uuid {uuid!r}")


def zone_log_dir(log_dir: Path, name: str, uuid: str) -> Path:
    """The directory of one zone's logs (it need not exist)."""
    _check(name, uuid)
    return log_dir / ZONES_DIR / name / uuid


def make_zone_log_dir(log_dir: Path, name: str, uuid: str) -> Path:
    """Create a new zone's log directory (mode 0750); returns it."""
    directory = zone_log_dir(log_dir, name, uuid)
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    return directory


def append_line(directory: Path, filename: str, line: bytes) -> bool:
    """Append one line to a file of an existing zone directory; False if the
    directory is gone (pruned, never made): nothing is created then."""
    try:
        fd = os.open(directory / filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    except FileNotFoundError:
        return False
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return True


def mark_ended(directory: Path, ended: EndedZone) -> bool:
    """Write ``ended.json`` atomically; False if the directory is gone."""
    if not directory.is_dir():
        return False
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".ended.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.encode(ended))
        os.replace(temp, directory / ENDED)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return True


def console_files(directory: Path, current: str = CONSOLE_LOG) -> list[Path]:
    """A zone's console output in order: virtlogd's rotated copies oldest first, then
    the current file (those that exist)."""
    pattern = re.compile(re.escape(current) + r"\.(\d{1,4})\Z")
    rotated: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in directory.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_file():
                rotated.append((int(match.group(1)), entry))
    files = [path for _, path in sorted(rotated, reverse=True)]
    last = directory / current
    if last.is_file():
        files.append(last)
    return files


# --------------------------------------------------------------------------
# What there is
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneLogs:
    """One zone's log directory as found on disk."""

    name: str
    uuid: str
    path: Path
    size_bytes: int
    #: When the zone went (ended.json), else the directory's last change.
    ended_at: float
    #: ended.json, when it was written.
    ended: EndedZone | None


def _read_ended(path: Path) -> EndedZone | None:
    try:
        return _ENDED_DECODER.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def _measure(directory: Path) -> tuple[int, float]:
    size = 0
    latest = 0.0
    with contextlib.suppress(FileNotFoundError):
        latest = directory.stat().st_mtime
        for entry in directory.iterdir():
            with contextlib.suppress(FileNotFoundError):
                info = entry.lstat()
                size += info.st_size
                latest = max(latest, info.st_mtime)
    return size, latest


def scan(log_dir: Path, names: Iterable[str] | None = None) -> list[ZoneLogs]:
    """Every zone log directory (of ``names`` only, if given); entries that are not
    a zone's (bad names, stray files) are skipped."""
    root = log_dir / ZONES_DIR
    found: list[ZoneLogs] = []
    try:
        name_dirs = (
            [root / name for name in names if _NAME.fullmatch(name)]
            if names is not None
            else list(root.iterdir())
        )
    except FileNotFoundError:
        return found
    for name_dir in name_dirs:
        if not _NAME.fullmatch(name_dir.name) or not name_dir.is_dir():
            continue
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for zone_dir in name_dir.iterdir():
                if not _UUID.fullmatch(zone_dir.name) or not zone_dir.is_dir():
                    continue
                size, latest = _measure(zone_dir)
                ended = _read_ended(zone_dir / ENDED)
                found.append(
                    ZoneLogs(
                        name=name_dir.name,
                        uuid=zone_dir.name,
                        path=zone_dir,
                        size_bytes=size,
                        ended_at=ended.ended_at if ended is not None else latest,
                        ended=ended,
                    )
                )
    return found


def find_kept(log_dir: Path, name: str, uuid: str | None, live: set[str]) -> ZoneLogs | None:
    """The logs of a gone zone called ``name``: that ``uuid``, else the newest."""
    candidates = [
        entry
        for entry in scan(log_dir, [name])
        if entry.uuid not in live and (uuid is None or entry.uuid == uuid)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda entry: entry.ended_at)


# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """How long, and how much, gone zones' logs are kept."""

    max_age_s: float
    max_bytes: int
    max_zones: int


def plan_prune(
    entries: Sequence[ZoneLogs], live: set[str], now: float, retention: Retention
) -> list[ZoneLogs]:
    """The gone zones' log directories to remove, oldest first (pure).

    Live zones' directories (``live``: their uuids) are never chosen and do
    not count against the budget.
    """
    gone = sorted((e for e in entries if e.uuid not in live), key=lambda e: e.ended_at)
    doomed: list[ZoneLogs] = []
    kept: list[ZoneLogs] = []
    for entry in gone:
        if now - entry.ended_at > retention.max_age_s:
            doomed.append(entry)
        else:
            kept.append(entry)
    total = sum(entry.size_bytes for entry in kept)
    while kept and (total > retention.max_bytes or len(kept) > retention.max_zones):
        oldest = kept.pop(0)
        total -= oldest.size_bytes
        doomed.append(oldest)
    return doomed


LEGACY: Final = "legacy"


def scan_legacy(log_dir: Path) -> list[ZoneLogs]:
    """Console logs from before this layout (``log_dir/<name>.console.log`` and its
    rotated copies), one entry per name; its ``uuid`` is ``legacy:<name>``."""
    by_name: dict[str, list[Path]] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in log_dir.iterdir():
            name, sep, rest = entry.name.partition(".console.log")
            if sep and _NAME.fullmatch(name) and (not rest or rest[1:].isdigit()):
                by_name.setdefault(name, []).append(entry)
    found = []
    for name, files in by_name.items():
        infos = [info for info in map(_lstat, files) if info is not None]
        if not infos:
            continue
        found.append(
            ZoneLogs(
                name=name,
                uuid=f"{LEGACY}:{name}",
                path=log_dir / f"{name}.console.log",
                size_bytes=sum(info.st_size for info in infos),
                ended_at=max(info.st_mtime for info in infos),
                ended=None,
            )
        )
    return found


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def remove(entries: Iterable[ZoneLogs]) -> int:
    """Delete these zone log directories (and empty name directories), or a legacy
    console log with its rotated copies; bytes freed."""
    freed = 0
    for entry in entries:
        if entry.uuid.startswith(LEGACY + ":"):
            for path in console_files(entry.path.parent, entry.path.name):
                path.unlink(missing_ok=True)
            freed += entry.size_bytes
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        freed += entry.size_bytes
        with contextlib.suppress(OSError):
            entry.path.parent.rmdir()  # only when no other zone of that name is left
    return freed


def prune(
    log_dir: Path,
    live: set[str],
    now: float,
    retention: Retention,
    live_names: Iterable[str] = (),
) -> list[ZoneLogs]:
    """Apply the retention once; returns what was removed.

    Console logs of the layout before this one count as gone zones' too,
    except those of a name a live zone has (which may still write there).
    """
    busy = set(live_names)
    legacy = [entry for entry in scan_legacy(log_dir) if entry.name not in busy]
    doomed = plan_prune([*scan(log_dir), *legacy], live, now, retention)
    if doomed:
        freed = remove(doomed)
        log.info("log retention: removed the logs of %d gone zone(s), %d bytes", len(doomed), freed)
    return doomed


def move_legacy_console_log(source: Path, directory: Path) -> None:
    """Move a zone's console log (and its rotated copies) that predates this
    layout (``log_dir/<name>.console.log``) into its zone directory."""
    if source.parent == directory or not directory.is_dir():
        return
    for path in console_files(source.parent, source.name) if source.parent.is_dir() else []:
        suffix = path.name.removeprefix(source.name)
        with contextlib.suppress(OSError):
            os.replace(path, directory / (CONSOLE_LOG + suffix))
