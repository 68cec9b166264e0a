"""Zone records persisted one JSON file per zone, written atomically.

Layout: ``<state_dir>/zones/<zone>.json``, one msgspec-encoded record each.

Rules:

- A save is all or nothing: the record is written to a temporary file in the
  same directory, fsynced, renamed over the old file with ``os.replace``, and
  the directory is fsynced. A crash at any point leaves either the old record
  or the new one, plus at worst a stray ``.<zone>.*.tmp`` file, which
  :meth:`ZoneStore.load_all` removes.
- A file that does not decode into the record type is never fatal:
  :meth:`ZoneStore.load_all` renames it to ``<zone>.json.corrupt`` (kept for
  the operator, see :meth:`ZoneStore.corrupt_files`), logs why, and skips it.
- Zone names are checked before they become file names.

:class:`ZoneStore` is synchronous and does blocking file IO (fsync); the
daemon uses it through :class:`RecordWriter`, which runs every write on a
worker thread, one at a time and in the order they were asked for, and only
then runs what waited for that write (the announcement of a state change).
So the trio thread never blocks on a disk, and still nothing is announced
before it is on disk: a crash loses at most changes nobody was told of. It
expects one daemon per state directory.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Generic, TypeVar

import msgspec
import trio

from zoned.errors import InvalidRequest
from zoned.protocol import ZONE_NAME_PATTERN

log = logging.getLogger(__name__)

RecordT = TypeVar("RecordT")

_ZONE_NAME: Final = re.compile(ZONE_NAME_PATTERN)
_RECORD_SUFFIX: Final = ".json"
_CORRUPT_SUFFIX: Final = ".corrupt"
_TEMP_SUFFIX: Final = ".tmp"


def _check_name(name: str) -> None:
    if not _ZONE_NAME.fullmatch(name):
        raise InvalidRequest(f"invalid zone name {name!r}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(target: Path, data: bytes) -> None:
    """Replace ``target`` (mode 0600) with ``data`` atomically and durably.

    A temporary file in the same directory, fsynced, renamed over the old
    one, and the directory fsynced: a crash leaves the old file or the new.
    """
    fd, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=_TEMP_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as temp_file:
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


class ZoneStore(Generic[RecordT]):
    """Persistent records of type ``RecordT`` (any msgspec-encodable type), keyed by zone name.

    ``ZoneStore(state_dir, ZoneRecord)`` keeps its files in
    ``state_dir/zones`` (created mode 0700; records are written mode 0600).
    """

    def __init__(self, state_dir: Path, record_type: type[RecordT]) -> None:
        self.directory = state_dir / "zones"
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(record_type)

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        _check_name(name)
        return self.directory / f"{name}{_RECORD_SUFFIX}"

    def save(self, name: str, record: RecordT) -> None:
        """Replace the record of ``name`` atomically and durably."""
        target = self.path(name)
        self._ensure_directory()
        write_file_atomically(target, self._encoder.encode(record))

    def load(self, name: str) -> RecordT | None:
        """The record of ``name``, ``None`` if there is none.

        Raises ``msgspec.DecodeError`` for a corrupt file (only
        :meth:`load_all` quarantines).
        """
        try:
            data = self.path(name).read_bytes()
        except FileNotFoundError:
            return None
        return self._decoder.decode(data)

    def load_all(self) -> dict[str, RecordT]:
        """Every readable record by zone name; quarantines corrupt files, drops stray temps.

        Meant for start-up, before any :meth:`save`: a temporary file present
        now is the remains of an interrupted save.
        """
        records: dict[str, RecordT] = {}
        if not self.directory.is_dir():
            return records
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX):
                log.info("removing %s, left by an interrupted save", entry)
                entry.unlink(missing_ok=True)
                continue
            if not entry.name.endswith(_RECORD_SUFFIX):
                continue
            name = entry.name.removesuffix(_RECORD_SUFFIX)
            if not _ZONE_NAME.fullmatch(name):
                log.warning("ignoring %s: not a zone name", entry)
                continue
            try:
                records[name] = self._decoder.decode(entry.read_bytes())
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                self._quarantine(entry, str(exc))
        return records

    def _quarantine(self, entry: Path, reason: str) -> None:
        target = entry.with_name(entry.name + _CORRUPT_SUFFIX)
        counter = 1
        while target.exists():
            target = entry.with_name(f"{entry.name}{_CORRUPT_SUFFIX}.{counter}")
            counter += 1
        os.replace(entry, target)
        _fsync_dir(self.directory)
        log.error("zone record %s is corrupt (%s); moved it to %s", entry, reason, target)

    def corrupt_files(self) -> list[Path]:
        """Quarantined records, for the operator to inspect."""
        if not self.directory.is_dir():
            return []
        return sorted(entry for entry in self.directory.iterdir() if _CORRUPT_SUFFIX in entry.name)

    def delete(self, name: str) -> bool:
        """Remove the record of ``name``; ``False`` if there was none."""
        target = self.path(name)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(self.directory)
        return True


@dataclass(eq=False)
class Write:
    """One queued save or delete; :meth:`wait` returns once it is on disk."""

    run: Callable[[], object]
    then: Callable[[], None] | None
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None

    async def wait(self) -> None:
        """Wait until this write (and every one queued before it) is done; re-raise its error."""
        await self.done.wait()
        if self.error is not None:
            raise self.error


class RecordWriter(Generic[RecordT]):
    """Writes a :class:`ZoneStore`'s records on a worker thread, in order.

    :meth:`save` and :meth:`delete` never block: they queue the write and
    return it. ``then`` runs on the trio thread once the write is done (also
    when it failed: the failure is logged, and the zone's record stays in
    memory for its next save), so announcing there keeps "written before
    announced". :meth:`run` is the writer task; when it is cancelled it
    still finishes every write already queued, and a write asked for after it
    ended (by a shielded clean-up while the daemon stops) is done at once on
    the trio thread: no write is ever left waiting.
    """

    def __init__(self, store: ZoneStore[RecordT]) -> None:
        self.store = store
        self._send, self._receive = trio.open_memory_channel[Write](float("inf"))
        self._ended = False

    def save(self, name: str, record: RecordT, then: Callable[[], None] | None = None) -> Write:
        return self._queue(Write(lambda: self.store.save(name, record), then))

    def delete(self, name: str, then: Callable[[], None] | None = None) -> Write:
        return self._queue(Write(lambda: self.store.delete(name), then))

    async def load_all(self) -> dict[str, RecordT]:
        """:meth:`ZoneStore.load_all` on a worker thread (start-up, before any save)."""
        return await trio.to_thread.run_sync(self.store.load_all)

    def _queue(self, write: Write) -> Write:
        if self._ended:
            # The writer task is gone (the daemon is stopping): write now, in order.
            try:
                write.run()
            except Exception as exc:
                self._failed(write, exc)
            self._finish(write)
        else:
            self._send.send_nowait(write)
        return write

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for write in self._receive:
                await self._perform(write)
        finally:
            with trio.CancelScope(shield=True):
                while True:
                    try:
                        write = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    await self._perform(write)
                self._ended = True  # no checkpoint since the queue was found empty

    async def _perform(self, write: Write) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(write.run)
            except Exception as exc:
                self._failed(write, exc)
            self._finish(write)

    @staticmethod
    def _failed(write: Write, exc: Exception) -> None:
        log.error("writing a zone record failed", exc_info=exc)
        write.error = exc

    @staticmethod
    def _finish(write: Write) -> None:
        write.done.set()
        if write.then is not None:
            try:
                write.then()
            except Exception:
                log.exception("announcing a written zone record failed")
