"""What a zoned-mcp tool call gives back, pure: result Structs, bounded output, errors.

Rules:

- Output that comes out of a zone is hostile and unbounded: it is kept
  within a limit per stream (:class:`BoundedOutput`: the head and the tail),
  decoded to text without ever failing, and every cut is said in the
  result's ``notes``.
- Results are Structs: ``structured_content`` is their builtins form, the
  tool's ``output_schema`` their schema.
- A failed call is a :class:`ToolError` (or an error of zoned or of its
  client); :func:`error_text` is the one place that words them for the model.
"""

from __future__ import annotations

import base64
import codecs
import signal
from typing import Literal

import msgspec

from zoned import protocol as p
from zoned.client.connection import ClientError, ConnectionLost, DaemonUnavailable
from zoned.client.files import DirEntry, FileKind
from zoned.errors import ZonedError

Encoding = Literal["utf-8", "base64"]


class ToolError(Exception):
    """A tool call failed, for a reason said in words (the model reads ``message``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ToolInputError(ToolError):
    """The tool's arguments are not acceptable; nothing was done."""


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class ToolResult(msgspec.Struct, frozen=True):
    """Base of every tool's result (``structured_content``)."""


class ZoneSummary(ToolResult, frozen=True):
    zone: str
    name: str
    state: str
    vcpus: int
    memory_mib: int
    kernel_release: str = ""
    # The image the zone runs, and its id.
    image: str = ""
    image_id: str = ""
    # Its allow-list (None: no network).
    network: list[str] | None = None


class ZoneListResult(ToolResult, frozen=True):
    zones: list[ZoneSummary]


class DestroyResult(ToolResult, frozen=True):
    zone: str
    destroyed: bool
    notes: list[str] = msgspec.field(default_factory=list)


class CommandResult(ToolResult, frozen=True):
    """How a command ended; exactly one of ``exit_code`` and ``signal`` is set."""

    zone: str
    exit_code: int | None
    signal: int | None
    timed_out: bool
    oom_killed: bool
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    fresh_zone: bool = False
    notes: list[str] = msgspec.field(default_factory=list)


class WriteResult(ToolResult, frozen=True):
    zone: str
    path: str
    bytes_written: int


class ReadResult(ToolResult, frozen=True):
    zone: str
    path: str
    content: str
    encoding: Encoding
    bytes_read: int
    truncated: bool
    notes: list[str] = msgspec.field(default_factory=list)


class FileEntry(ToolResult, frozen=True):
    name: str
    type: FileKind
    size: int
    mode: str
    mtime: int


class ListResult(ToolResult, frozen=True):
    zone: str
    path: str
    entries: list[FileEntry]
    truncated: bool
    notes: list[str] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


class BoundedOutput:
    """One output stream of a process, kept within ``limit`` bytes: its head and its tail.

    Everything is counted; the first half of the limit and the last half are
    kept, the middle is dropped. Memory stays within the limit (plus one
    chunk) however much the process writes.
    """

    def __init__(self, name: str, limit: int) -> None:
        if limit < 2:
            raise ValueError("the output limit must be at least 2 bytes")
        self.name = name
        self.limit = limit
        self.total = 0
        self._head = bytearray()
        self._tail = bytearray()
        self._head_limit = limit - limit // 2
        self._tail_limit = limit // 2

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            if len(self._tail) > self._tail_limit:
                del self._tail[: len(self._tail) - self._tail_limit]

    @property
    def cut(self) -> int:
        """Bytes dropped from the middle."""
        return self.total - len(self._head) - len(self._tail)

    def text(self) -> str:
        """The kept output as text: invalid UTF-8 replaced, the cut marked in place."""
        if not self.cut:
            return bytes(self._head + self._tail).decode(errors="replace")
        head = _decode_prefix(bytes(self._head))
        tail = _decode_suffix(bytes(self._tail))
        return f"{head}\n[... {self.cut} bytes of {self.name} cut here by zoned-mcp ...]\n{tail}"

    def note(self) -> str | None:
        if not self.cut:
            return None
        return (
            f"{self.name} was {self.total} bytes: the first {len(self._head)} and the last"
            f" {len(self._tail)} are shown, {self.cut} cut in between"
        )


def _decode_prefix(data: bytes) -> str:
    """The start of a cut stream: a character split at its end is left out."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)


def _decode_suffix(data: bytes) -> str:
    """The end of a cut stream: the rest of a character split at its start is left out."""
    skip = 0
    while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return data[skip:].decode(errors="replace")


def file_text(data: bytes, encoding: Encoding, truncated: bool) -> tuple[str, list[str]]:
    """A file's bytes for ``read_file``, and notes on what was changed to show them."""
    if encoding == "base64":
        return base64.b64encode(data).decode(), []
    text = _decode_prefix(data) if truncated else data.decode(errors="replace")
    notes = []
    if "\ufffd" in text and "\ufffd".encode() not in data:
        notes.append(
            "the file is not valid UTF-8: invalid bytes are shown as U+FFFD; read it"
            " with encoding base64 for the exact bytes"
        )
    return text, notes


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def command_notes(
    exit: p.ExecExit,
    stdout: BoundedOutput,
    stderr: BoundedOutput,
    timed_out: bool,
    timeout_s: float,
) -> list[str]:
    """What a model should know about how a command ended, in words."""
    notes = []
    if timed_out:
        notes.append(f"timed out after {timeout_s:g} s: killed with SIGKILL")
    elif exit.signal is not None:
        notes.append(f"ended by {signal_name(exit.signal)}")
    if exit.oom_killed:
        notes.append("the out-of-memory killer killed it (or a process it started)")
    for output in (stdout, stderr):
        if (note := output.note()) is not None:
            notes.append(note)
    return notes


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


#: Failures a tool call may end in that are no bug of zoned-mcp.
EXPECTED_ERRORS = (ToolError, ZonedError, ClientError)


def error_text(exc: BaseException) -> str:
    """The message a model gets for a failed tool call (never a traceback)."""
    if isinstance(exc, ToolError):
        return exc.message
    if isinstance(exc, ZonedError):
        return f"{exc.message} ({exc.code})"
    if isinstance(exc, DaemonUnavailable):
        return exc.message
    if isinstance(exc, ConnectionLost):
        return (
            f"the connection to zoned was lost ({exc.message}): the zones of this session are"
            " gone; restart zoned-mcp to start a new session"
        )
    if isinstance(exc, ClientError):
        return f"zoned-mcp: {exc.message}"
    return "zoned-mcp: internal error (logged on its stderr)"


def summary(zone: p.ZoneInfo, short_name: str) -> ZoneSummary:
    return ZoneSummary(
        zone=zone.name,
        name=short_name,
        state=zone.state,
        vcpus=zone.vcpus,
        memory_mib=zone.memory_mib,
        kernel_release=zone.kernel_release,
        image=zone.image,
        image_id=zone.image_id,
        network=zone.net,
    )


def file_entry(entry: DirEntry) -> FileEntry:
    """A directory entry for the model: its name as valid text."""
    name = entry.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return FileEntry(
        name=name, type=entry.kind, size=entry.size, mode=f"{entry.mode:o}", mtime=entry.mtime
    )
