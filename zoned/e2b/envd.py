"""envd's messages, and how each becomes one of zoned's (pure).

envd is the agent E2B runs in its sandboxes; the SDK talks to it with the
Connect protocol (:mod:`zoned.e2b.connectrpc`) in protobuf's JSON mapping
(camelCase names, ``bytes`` as base64, ``int64`` as strings, enums by name)
and over plain HTTP for ``/files``. Here are the messages the endpoint
accepts (each a Struct: unknown fields are ignored, as protobuf's JSON
parsers do, wrong types refused) and the ones it sends, plus the
translations that have a rule of their own:

- **Users** (``Authorization: Basic base64("name:")``, or ``username=``
  on ``/files``): an account of the zone's image by name, resolved by the
  daemon in the image's ``/etc/passwd`` (a name it lacks is
  ``invalid_argument``); no header: the image's own ``User`` (E2B's
  template default user). Relative paths start at ``/root`` for root and
  the default, ``/home/NAME`` for others.
- **Paths**: absolute, or relative to the user's home; never with a ``..``
  component, a NUL or more than :data:`~zoned.protocol.MAX_PATH_CHARS`
  characters (``invalid_argument``, nothing done).
- **Commands**: the SDK always starts ``/bin/bash -l -c CMD``; a zone
  whose image has no bash (the built-in root is busybox) runs ``sh -c CMD``
  instead (:func:`command_argv`).
- **Exits**: as envd reports Go's ``ProcessState``: a process killed by a
  signal has ``exitCode`` -1 and ``status`` ``"signal: killed"``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import posixpath
import re
import signal
import stat
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from zoned import protocol as p
from zoned.e2b.connectrpc import RpcError

# ---------------------------------------------------------------------------
# Messages in
# ---------------------------------------------------------------------------


class _In(msgspec.Struct, frozen=True, rename="camel"):
    pass


class ProcessConfig(_In, frozen=True):
    cmd: str = ""
    args: list[str] = []
    envs: dict[str, str] = {}
    cwd: str | None = None


class ProcessSelector(_In, frozen=True):
    pid: int | None = None
    tag: str | None = None


class StartRequest(_In, frozen=True):
    process: ProcessConfig | None = None
    pty: dict[str, Any] | None = None
    tag: str | None = None
    stdin: bool | None = None


class SelectorRequest(_In, frozen=True):
    """Connect and CloseStdin name a process alone."""

    process: ProcessSelector | None = None


class ProcessInput(_In, frozen=True):
    stdin: str | None = None
    pty: str | None = None


class SendInputRequest(_In, frozen=True):
    process: ProcessSelector | None = None
    input: ProcessInput | None = None


class SendSignalRequest(_In, frozen=True):
    process: ProcessSelector | None = None
    signal: str | int | None = None


class PathRequest(_In, frozen=True):
    """Stat, MakeDir and Remove take a path alone."""

    path: str = ""


class ListDirRequest(_In, frozen=True):
    path: str = ""
    depth: int = 0


class MoveRequest(_In, frozen=True):
    source: str = ""
    destination: str = ""


class Empty(_In, frozen=True):
    pass


# ---------------------------------------------------------------------------
# Users, paths, commands
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """Who a call runs as: an account of the zone's image, by name ("": the
    image's own ``User``, E2B's "template default user")."""

    name: str
    #: Where relative paths start (the image's passwd is not read for it).
    home: str

    @property
    def spec(self) -> str | None:
        """The exec request's ``user`` (None: the image's)."""
        return self.name or None


DEFAULT_USER: Final = User("", "/root")
_USER_NAME: Final = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\Z")


def user_named(name: str) -> User:
    """An account of the image by name; its home is assumed ``/root`` or ``/home/NAME``."""
    if not name:
        return DEFAULT_USER
    if not _USER_NAME.fullmatch(name):
        raise RpcError("invalid_argument", f"invalid user name {name[:64]!r}")
    return User(name, "/root" if name == "root" else f"/home/{name}")


def user_from_authorization(header: str | None) -> User:
    """The user of ``Authorization: Basic base64("name:")``; the image's without one."""
    if not header:
        return DEFAULT_USER
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise RpcError("invalid_argument", "the Authorization header must be Basic name:")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise RpcError("invalid_argument", "the Authorization header is not base64") from None
    return user_named(decoded.partition(":")[0])


def zone_path(path: str, user: User) -> str:
    """``path`` as an absolute path in the zone: relative ones from the user's home."""
    if not path:
        raise RpcError("invalid_argument", "the path is empty")
    if "\x00" in path:
        raise RpcError("invalid_argument", "the path contains a NUL character")
    if len(path) > p.MAX_PATH_CHARS:
        raise RpcError("invalid_argument", f"the path is longer than {p.MAX_PATH_CHARS}")
    if ".." in path.split("/"):
        raise RpcError(
            "invalid_argument", f"the path {path[:200]!r} has a '..' component: name it directly"
        )
    joined = posixpath.join(user.home, path)
    return posixpath.normpath(joined) if joined != "/" else "/"


#: The SDK runs every command as ``/bin/bash -l -c CMD``: with bash where the
#: zone has it, else ``sh -c CMD`` (the login option dropped).
_SHELL_FALLBACK: Final = (
    'if command -v bash >/dev/null 2>&1; then exec bash "$@"; fi;'
    ' if [ "$1" = -l ]; then shift; fi; exec sh "$@"'
)


def command_argv(config: ProcessConfig) -> list[str]:
    if not config.cmd:
        raise RpcError("invalid_argument", "process.cmd is empty")
    if config.cmd in ("/bin/bash", "bash"):
        return ["/bin/sh", "-c", _SHELL_FALLBACK, "e2b-shell", *config.args]
    return [config.cmd, *config.args]


def command_env(*layers: dict[str, str]) -> dict[str, str]:
    """The request's environment: each layer over the one before (the image's
    ``Env``, ``PATH`` and the user's ``HOME`` come under it, in the daemon)."""
    env: dict[str, str] = {}
    for layer in layers:
        env.update(layer)
    return env


def decode_bytes(value: str | None, what: str) -> bytes:
    if value is None:
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise RpcError("invalid_argument", f"{what} is not base64") from None


_SIGNALS: Final = {
    "SIGNAL_SIGKILL": signal.SIGKILL,
    "SIGNAL_SIGTERM": signal.SIGTERM,
    9: signal.SIGKILL,
    15: signal.SIGTERM,
}


def signal_number(value: str | int | None) -> int:
    found = _SIGNALS.get(value) if value is not None else None
    if found is None:
        raise RpcError("invalid_argument", f"unsupported signal {value!r}: SIGKILL or SIGTERM")
    return int(found)


# ---------------------------------------------------------------------------
# Messages out
# ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def start_event(pid: int) -> bytes:
    return msgspec.json.encode({"event": {"start": {"pid": pid}}})


def data_event(stream: Literal["stdout", "stderr", "pty"], data: bytes) -> bytes:
    return msgspec.json.encode({"event": {"data": {stream: _b64(data)}}})


KEEPALIVE_EVENT: Final = b'{"event":{"keepalive":{}}}'


def end_event(exit: p.ExecExit) -> bytes:
    """How a process ended, as envd (Go's ``ProcessState``) says it."""
    end: dict[str, Any]
    if exit.exit_code is not None:
        end = {
            "exitCode": exit.exit_code,
            "exited": True,
            "status": f"exit status {exit.exit_code}",
        }
    else:
        number = exit.signal or 0
        try:
            name = signal.Signals(number).name.removeprefix("SIG").lower()
        except ValueError:
            name = str(number)
        end = {
            "exitCode": -1,
            "exited": False,
            "status": f"signal: {_GO_SIGNAL_NAMES.get(name, name)}",
        }
    if exit.timed_out:
        end["error"] = "the process was killed: its time ran out"
    return msgspec.json.encode({"event": {"end": end}})


_GO_SIGNAL_NAMES: Final = {"kill": "killed", "term": "terminated", "int": "interrupt"}


@dataclass(frozen=True)
class ProcessRecord:
    """What List tells of a running process."""

    pid: int
    tag: str | None
    config: ProcessConfig


def list_response(processes: list[ProcessRecord]) -> bytes:
    items = []
    for process in processes:
        config: dict[str, Any] = {
            "cmd": process.config.cmd,
            "args": process.config.args,
            "envs": process.config.envs,
        }
        if process.config.cwd is not None:
            config["cwd"] = process.config.cwd
        item: dict[str, Any] = {"config": config, "pid": process.pid}
        if process.tag is not None:
            item["tag"] = process.tag
        items.append(item)
    return msgspec.json.encode({"processes": items})


@dataclass(frozen=True)
class Entry:
    """A file's facts as the zone's ``stat`` told them (advisory: the zone is hostile)."""

    path: str
    raw_mode: int
    size: int
    mtime: int
    owner: str = ""
    group: str = ""
    symlink_target: str | None = None

    @property
    def file_type(self) -> str:
        kind = stat.S_IFMT(self.raw_mode)
        if kind == stat.S_IFDIR:
            return "FILE_TYPE_DIRECTORY"
        if kind == stat.S_IFLNK:
            return "FILE_TYPE_SYMLINK"
        return "FILE_TYPE_FILE"

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": posixpath.basename(self.path) or "/",
            "type": self.file_type,
            "path": self.path,
            "size": str(self.size),
            "mode": stat.S_IMODE(self.raw_mode),
            "permissions": stat.filemode(self.raw_mode),
            "owner": self.owner,
            "group": self.group,
            "modifiedTime": _rfc3339(self.mtime),
        }
        if self.symlink_target is not None:
            info["symlinkTarget"] = self.symlink_target
            info["isSymlink"] = True
        return info


def _rfc3339(unix: int) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        moment = datetime.datetime.fromtimestamp(0, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def entry_response(entry: Entry) -> bytes:
    return msgspec.json.encode({"entry": entry.to_json()})


def entries_response(entries: list[Entry]) -> bytes:
    return msgspec.json.encode({"entries": [entry.to_json() for entry in entries]})


#: One line of :data:`STAT_SCRIPT`'s output: raw mode (hex), size, mtime,
#: owner, group; then, for a link, its target on the next line.
STAT_SCRIPT: Final = (
    '[ -e "$1" ] || [ -L "$1" ] || exit 44; stat -c "%f %s %Y %U %G" -- "$1" || exit 1;'
    ' if [ -L "$1" ]; then readlink -- "$1"; fi'
)
#: STAT_SCRIPT's status for a path that does not exist.
STAT_MISSING: Final = 44
_STAT_LINE = re.compile(rb"([0-9a-f]{1,8}) ([0-9]{1,18}) (-?[0-9]{1,18}) (\S{1,64}) (\S{1,64})")


def parse_stat(path: str, output: bytes) -> Entry:
    """STAT_SCRIPT's output for ``path``; ``internal`` if it makes no sense."""
    first, _, rest = output.partition(b"\n")
    found = _STAT_LINE.fullmatch(first)
    if found is None:
        raise RpcError("internal", f"the zone's stat of {path[:200]!r} cannot be read")
    target = rest.rstrip(b"\n").decode("utf-8", "replace")[: p.MAX_PATH_CHARS]
    raw_mode = int(found[1], 16)
    return Entry(
        path=path,
        raw_mode=raw_mode,
        size=int(found[2]),
        mtime=int(found[3]),
        owner=found[4].decode("utf-8", "replace"),
        group=found[5].decode("utf-8", "replace"),
        symlink_target=target if stat.S_ISLNK(raw_mode) else None,
    )


# ---------------------------------------------------------------------------
# /files uploads
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadPart:
    #: The part's file name (``filename=`` of its Content-Disposition), "" if none.
    filename: str
    data: bytes


_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^;\s]{1,70}))', re.I)
_DISPOSITION_FILENAME = re.compile(rb'filename="([^"]*)"', re.I)
MAX_PARTS: Final = 1000


def multipart_parts(content_type: str, body: bytes) -> list[UploadPart]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), read without trust."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise RpcError("invalid_argument", "multipart/form-data without a boundary")
    delimiter = b"--" + (found[1] or found[2]).encode("latin-1")
    pieces = body.split(b"\r\n" + delimiter)
    first = pieces[0]
    if first.startswith(delimiter):
        pieces[0] = first[len(delimiter) :]
    else:
        raise RpcError("invalid_argument", "the multipart body does not start with its boundary")
    parts: list[UploadPart] = []
    closed = False
    for piece in pieces:
        if piece.startswith(b"--"):
            closed = True
            break
        if not piece.startswith(b"\r\n"):
            raise RpcError("invalid_argument", "a multipart boundary is not followed by CRLF")
        head, sep, data = piece[2:].partition(b"\r\n\r\n")
        if not sep:
            raise RpcError("invalid_argument", "a multipart part has no header end")
        name = b""
        for line in head.split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-disposition":
                match = _DISPOSITION_FILENAME.search(value)
                name = match[1] if match else b""
        parts.append(UploadPart(name.decode("utf-8", "replace"), data))
        if len(parts) > MAX_PARTS:
            raise RpcError("invalid_argument", f"more than {MAX_PARTS} parts in one upload")
    if not closed:
        raise RpcError("invalid_argument", "the multipart body has no closing boundary")
    return parts


def write_info(path: str) -> dict[str, str]:
    """One file an upload wrote, as ``WriteInfo`` has it."""
    return {"name": posixpath.basename(path), "type": "file", "path": path}
