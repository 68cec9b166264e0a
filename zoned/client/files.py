"""Files and directory trees in and out of a zone, composed over exec.

Nothing here is a protocol request of its own: each transfer is a process in
the zone's workload root (``cat``, ``tar``, a short ``sh`` script) whose
stdin or stdout carries the bytes, so it has exec's flow control end to end.
Those helpers are the agent's own tools (``agent_tools``: its static
busybox), never the workload root's programs, which may be missing or
replaced. A helper that fails raises :class:`~zoned.errors.InvalidRequest`
with (the start of) its stderr.

What comes back is hostile (the zone may be owned): output taken out of a
zone is bounded by ``max_bytes`` (beyond it: :class:`FileTooLarge`, an
``InvalidRequest``), a directory listing by ``max_entries`` and parsed
without trusting it, and a tree is unpacked by :meth:`FileTransfer.get_tree`
with :mod:`zoned.client.extract` (never following a link the zone made,
atomically).
"""

from __future__ import annotations

import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import trio

from zoned import protocol as p
from zoned.client.extract import TreeExtractor, TreeSummary
from zoned.client.process import ExecResult, Process
from zoned.client.tarstream import DEFAULT_MAX_ENTRIES as DEFAULT_MAX_TREE_ENTRIES
from zoned.client.tarstream import UnsafeTree
from zoned.errors import InvalidRequest

if TYPE_CHECKING:
    from typing import Unpack

    from zoned.client.options import ProcessOptions

#: Largest file or tree :meth:`FileTransfer.get_file` and friends take by default.
DEFAULT_MAX_FILE = 1024 * 1024 * 1024
#: Entries :meth:`FileTransfer.list_directory` takes by default.
DEFAULT_MAX_ENTRIES = 10_000
#: How much of a failed helper's stderr becomes the error message.
_MAX_ERROR_BYTES = 4096
#: Transfers run as root whatever the image's User (as ``docker cp`` does).
AS_ROOT = "0:0"

# Writes stdin to a temporary name beside the target, then renames it: the
# file appears whole or not at all. $1 path, $2 octal mode, $3 uid, $4 gid.
_PUT_SCRIPT = (
    'tmp="$1.zoned-put.$$" && cat > "$tmp" && chmod "$2" "$tmp" && chown "$3:$4" "$tmp"'
    ' && mv -f "$tmp" "$1" || { rm -f "$tmp"; exit 1; }'
)

# One line per entry of directory $1: raw mode (hex), size, mtime, "./name"
# (stat does not follow links). A name with a newline continues on the next
# lines; the zone decides what it sends, so the parser trusts none of it.
_LIST_SCRIPT = 'cd -- "$1" && exec find . -mindepth 1 -maxdepth 1 -exec stat -c "%f %s %Y %n" {} +'
_LIST_LINE = re.compile(rb"([0-9a-f]{1,8}) ([0-9]{1,18}) (-?[0-9]{1,18}) \./(.*)", re.S)
FileKind = Literal[
    "file", "directory", "symlink", "fifo", "socket", "char-device", "block-device", "other"
]
_KINDS: dict[int, FileKind] = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char-device",
    stat.S_IFBLK: "block-device",
}


class FileTooLarge(InvalidRequest):
    """A file or tree taken out of a zone was larger than the caller's ``max_bytes``."""


class DirEntry(NamedTuple):
    """One entry of a directory in a zone, as the zone reported it (advisory)."""

    #: The name, decoded with ``surrogateescape`` (as :func:`os.listdir` does).
    name: str
    kind: FileKind
    size: int
    #: Permission bits (``stat.S_IMODE``).
    mode: int
    #: Modification time, unix seconds.
    mtime: int


class DirectoryListing(NamedTuple):
    """The entries of a directory by name; ``complete`` False: cut at ``max_entries``."""

    entries: list[DirEntry]
    complete: bool


class _ListingParser:
    """``_LIST_SCRIPT``'s output, fed as it comes, into at most ``max_entries`` entries."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: list[DirEntry] = []
        self._pending = bytearray()
        self._name: bytearray | None = None
        self._fields: tuple[int, int, int] = (0, 0, 0)

    def feed(self, data: bytes) -> bool:
        """Take more output; False once ``max_entries`` entries are complete."""
        self._pending += data
        *lines, rest = self._pending.split(b"\n")
        self._pending = bytearray(rest)
        if len(self._pending) > p.MAX_PATH_CHARS + 64:
            raise InvalidRequest("the zone sent a directory listing line that is too long")
        return all(self._line(bytes(line)) for line in lines)

    def _line(self, line: bytes) -> bool:
        found = _LIST_LINE.fullmatch(line)
        if found is None:
            if self._name is None:
                raise InvalidRequest("the zone sent a directory listing that cannot be read")
            self._name += b"\n" + line  # a name with a newline in it
        else:
            if not self._finish():
                return False
            self._fields = (int(found[1], 16), int(found[2]), int(found[3]))
            self._name = bytearray(found[4])
        if len(self._name) > p.MAX_PATH_CHARS:
            raise InvalidRequest("the zone sent a file name that is too long")
        return True

    def _finish(self) -> bool:
        """Close the entry being read; False if it was one too many."""
        if self._name is None:
            return True
        if len(self.entries) >= self.max_entries:
            return False
        mode, size, mtime = self._fields
        kind = _KINDS.get(stat.S_IFMT(mode), "other")
        name = bytes(self._name).decode("utf-8", "surrogateescape")
        self.entries.append(DirEntry(name, kind, size, stat.S_IMODE(mode), mtime))
        self._name = None
        return True

    def listing(self, complete: bool) -> DirectoryListing:
        if complete and self._pending:
            self._line(bytes(self._pending))
            self._pending.clear()
        complete = self._finish() and complete
        return DirectoryListing(sorted(self.entries), complete)


class FileTransfer(ABC):
    """The file methods of :class:`~zoned.client.Client`, over its :meth:`exec_process`."""

    @abstractmethod
    def exec_process(
        self, zone: str, argv: Sequence[str], **options: Unpack[ProcessOptions]
    ) -> AbstractAsyncContextManager[Process]: ...

    async def put_file(
        self,
        zone: str,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
    ) -> int:
        """Write a file in the zone's workload root, atomically; returns its size.

        ``data`` is bytes or an async iterable of chunks (streamed, never held
        whole). The file appears under its name only once complete, with
        ``mode`` and owner ``uid``:``gid``.
        """
        argv = [
            "sh",
            "-c",
            _PUT_SCRIPT,
            "zoned-put",
            path,
            f"{mode & 0o7777:o}",
            str(uid),
            str(gid),
        ]
        async with self.exec_process(
            zone, argv, stdin=True, agent_tools=True, user=AS_ROOT
        ) as process:
            sent = await _feed(process, data)
            await _checked(process, f"cannot write {path!r} in zone {zone!r}")
        return sent

    async def get_file(self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE) -> bytes:
        """A file of the zone's workload root; :class:`InvalidRequest` beyond ``max_bytes``."""
        data = bytearray()
        async for chunk in self.stream_file(zone, path, max_bytes=max_bytes):
            data.extend(chunk)
        return bytes(data)

    async def stream_file(
        self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> AsyncGenerator[bytes, None]:
        """A file of the zone's workload root as chunks, as they come."""
        async for chunk in self._stream_command(
            zone, ["cat", "--", path], f"cannot read {path!r} in zone {zone!r}", max_bytes
        ):
            yield chunk

    async def put_tree(self, zone: str, directory: str, tar_stream: AsyncIterable[bytes]) -> None:
        """Unpack a tar stream into ``directory`` of the zone (created if missing)."""
        argv = ["sh", "-c", 'mkdir -p -- "$1" && exec tar -x -f - -C "$1"', "zoned-put", directory]
        async with self.exec_process(
            zone, argv, stdin=True, agent_tools=True, user=AS_ROOT
        ) as process:
            await _feed(process, tar_stream)
            await _checked(process, f"cannot unpack into {directory!r} in zone {zone!r}")

    async def stream_tree(
        self, zone: str, directory: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> AsyncGenerator[bytes, None]:
        """``directory`` of the zone as a tar stream, as it comes: as hostile as the
        zone (unpack it with :meth:`get_tree`, never with ``tarfile``)."""
        async for chunk in self._stream_command(
            zone,
            ["tar", "-c", "-f", "-", "-C", directory, "."],
            f"cannot pack {directory!r} in zone {zone!r}",
            max_bytes,
        ):
            yield chunk

    async def get_tree(
        self,
        zone: str,
        directory: str,
        dest: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_FILE,
        max_entries: int = DEFAULT_MAX_TREE_ENTRIES,
        outward_links: bool = False,
    ) -> TreeSummary:
        """Copy ``directory`` of the zone to ``dest`` on this host, which must not exist.

        ``dest`` appears whole or not at all (its parent must exist). Nothing
        the zone sends is followed or trusted (:mod:`zoned.client.extract`):
        symbolic links that lead outside the tree refuse the copy unless
        ``outward_links``; devices, FIFOs, names with ``..`` and the like
        refuse it always, as :class:`~zoned.client.tarstream.UnsafeTree` (an
        ``InvalidRequest``) naming the entry. At most ``max_bytes`` of archive
        and ``max_entries`` entries.
        """
        target = Path(dest)
        try:
            extractor = await trio.to_thread.run_sync(
                lambda: TreeExtractor(target, max_entries=max_entries, outward_links=outward_links)
            )
        except OSError as exc:
            raise InvalidRequest(f"cannot copy to {str(target)!r}: {exc.strerror or exc}") from None
        failure = f"cannot copy {directory!r} of zone {zone!r} to {str(target)!r}"
        try:
            async for chunk in self.stream_tree(zone, directory, max_bytes=max_bytes):
                await trio.to_thread.run_sync(extractor.feed, chunk)
            return await trio.to_thread.run_sync(extractor.finish)
        except UnsafeTree as exc:
            raise UnsafeTree(f"{failure}: {exc.message}") from None
        except OSError as exc:
            name = f" ({exc.filename})" if exc.filename else ""
            raise InvalidRequest(f"{failure}: {exc.strerror or exc}{name}") from None
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(extractor.abort)

    async def list_directory(
        self, zone: str, path: str, *, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> DirectoryListing:
        """The entries of directory ``path`` in the zone (not recursive), by name.

        Beyond ``max_entries`` the listing stops (``complete`` False); which
        entries it holds then is the directory's order, not the names'.
        """
        parser = _ListingParser(max_entries)
        errors = bytearray()
        failure = f"cannot list {path!r} in zone {zone!r}"
        argv = ["sh", "-c", _LIST_SCRIPT, "zoned-list", path]
        async with self.exec_process(zone, argv, agent_tools=True, user=AS_ROOT) as process:
            async for chunk in process:
                if chunk.stream == "stderr":
                    _keep_some(errors, chunk.data)
                elif not parser.feed(chunk.data):
                    await process.signal(9)
                    await process.wait()
                    return parser.listing(complete=False)
        assert process.result is not None
        _raise_on_failure(process.result, errors, failure)
        return parser.listing(complete=True)

    async def is_directory(self, zone: str, path: str) -> bool:
        async with self.exec_process(
            zone, ["test", "-d", path], agent_tools=True, user=AS_ROOT
        ) as process:
            result = await process.wait()
        return result.exit.exit_code == 0

    async def _stream_command(
        self, zone: str, argv: list[str], failure: str, max_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        received = 0
        errors = bytearray()
        async with self.exec_process(zone, argv, agent_tools=True, user=AS_ROOT) as process:
            async for chunk in process:
                if chunk.stream == "stderr":
                    _keep_some(errors, chunk.data)
                    continue
                received += len(chunk.data)
                if received > max_bytes:
                    await process.signal(9)
                    await process.wait()
                    raise FileTooLarge(f"{failure}: larger than the limit of {max_bytes} bytes")
                yield chunk.data
        assert process.result is not None
        _raise_on_failure(process.result, errors, failure)


async def _feed(process: Process, data: bytes | AsyncIterable[bytes]) -> int:
    sent = 0
    if isinstance(data, bytes):
        await process.write(data)
        sent = len(data)
    else:
        async for chunk in data:
            await process.write(chunk)
            sent += len(chunk)
    await process.close_stdin()
    return sent


async def _checked(process: Process, failure: str) -> ExecResult:
    errors = bytearray()
    async for chunk in process:
        _keep_some(errors, chunk.data)
    result = process.result
    assert result is not None
    _raise_on_failure(result, errors, failure)
    return result


def _keep_some(errors: bytearray, data: bytes) -> None:
    """The start of a helper's complaints, bounded: the zone decides how much it writes."""
    errors.extend(data[: max(0, _MAX_ERROR_BYTES - len(errors))])


def _raise_on_failure(result: ExecResult, stderr: bytes | bytearray, failure: str) -> None:
    """A helper command that failed: its stderr (or status) as the error."""
    if result.returncode != 0:
        detail = bytes(stderr).decode(errors="replace").strip() or f"status {result.returncode}"
        raise InvalidRequest(f"{failure}: {detail}")
