"""The tools of zoned-mcp, pure: their arguments, schemas and limits.

Nothing here talks to zoned or to an MCP client. Each tool is a
:class:`ToolSpec`: its name, what it tells the model, the :mod:`msgspec`
Struct of its arguments and that of its result. From the argument Struct
come both its JSON Schema (what ``tools/list`` advertises) and its decoder
(what ``tools/call`` arguments go through), so the two cannot disagree.
Value types come from :mod:`zoned.protocol` where the field is a wire field
(paths, argv, env, vCPUs, memory), so a tool takes what the daemon would.

Rules:

- Arguments are checked twice, both times before anything is done: by the
  Struct (types, the protocol's bounds, unknown fields refused), then against
  the :class:`Limits` this server was started with (:func:`limited_fields`),
  which also overlay the advertised schema. Failures are
  :class:`~zoned.mcp.results.ToolInputError` with a message for the model.
- A new tool option is a new Struct field with a default: a client that
  does not send it keeps working, and the schema shows it at once.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

from zoned import protocol as p
from zoned.mcp.results import (
    CommandResult,
    DestroyResult,
    Encoding,
    ListResult,
    ReadResult,
    ToolInputError,
    ToolResult,
    WriteResult,
    ZoneListResult,
    ZoneSummary,
)

# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

#: A zone name this server makes: ``<prefix><session tag>-<short name>``.
SESSION_TAG_CHARS = 6
ZONE_PREFIX_PATTERN = r"^[a-z][a-z0-9-]{0,15}\Z"


@dataclass(frozen=True)
class Limits:
    """What one zoned-mcp allows a session (command-line options, see :mod:`zoned.mcp.options`)."""

    #: Zones of the session at once: its own plus the fresh zones of running ``run_code`` calls.
    max_zones: int = 4
    max_vcpus: int = 2
    max_memory_mib: int = 2048
    default_memory_mib: int = 512
    default_timeout_s: float = 60.0
    max_timeout_s: float = 600.0
    #: How long a zone may take to boot (not counted in a command's timeout).
    boot_timeout_s: float = 120.0
    #: Of each of stdout and stderr: the first and the last half of this are kept.
    max_output_bytes: int = 64 * 1024
    max_read_bytes: int = 256 * 1024
    max_write_bytes: int = 16 * 1024 * 1024
    max_list_entries: int = 1000
    zone_prefix: str = "mcp-"

    def __post_init__(self) -> None:
        if not re.match(ZONE_PREFIX_PATTERN, self.zone_prefix):
            raise ValueError(
                f"zone prefix {self.zone_prefix!r}: 1 to 16 of a-z, 0-9 and -, from a letter"
            )
        if not p.MIN_MEMORY_MIB <= self.default_memory_mib <= self.max_memory_mib:
            raise ValueError(
                f"the default memory ({self.default_memory_mib} MiB) must be within"
                f" {p.MIN_MEMORY_MIB}..{self.max_memory_mib} MiB (the maximum)"
            )
        if not 0 < self.default_timeout_s <= self.max_timeout_s:
            raise ValueError(
                f"the default timeout ({self.default_timeout_s:g} s) must be > 0 and at most"
                f" the maximum ({self.max_timeout_s:g} s)"
            )

    @property
    def max_short_name_chars(self) -> int:
        """Room left in a 63-character zone name after the prefix and the session tag."""
        return 63 - len(self.zone_prefix) - SESSION_TAG_CHARS - 1


class Bound(NamedTuple):
    """A limit on one argument: ``maximum`` for numbers, ``max_length`` for strings."""

    maximum: float | None = None
    max_length: int | None = None


def limited_fields(limits: Limits) -> dict[str, Bound]:
    """The argument fields :class:`Limits` bounds, by field name (the same in every tool)."""
    return {
        "timeout_s": Bound(maximum=limits.max_timeout_s),
        "vcpus": Bound(maximum=limits.max_vcpus),
        "memory_mib": Bound(maximum=limits.max_memory_mib),
        "max_bytes": Bound(maximum=limits.max_read_bytes),
        "name": Bound(max_length=limits.max_short_name_chars),
    }


def limited_defaults(limits: Limits) -> dict[str, float]:
    """Argument defaults that come from :class:`Limits` (None in the Structs)."""
    return {
        "timeout_s": limits.default_timeout_s,
        "memory_mib": limits.default_memory_mib,
        "max_bytes": limits.max_read_bytes,
    }


#: Largest ``stdin`` of ``run_command``: what the zone's agent takes before the
#: process reads any of it, so that input never holds up the session's
#: connection to zoned (which a process that does not read would do).
MAX_STDIN_BYTES = p.EXEC_INPUT_WINDOW


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

ZoneRef = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}\Z",
        description="a zone of this session: the name create_zone returned, or the short name"
        " it was given",
    ),
]
ShortName = Annotated[
    str,
    Meta(
        min_length=1,
        pattern=r"^[a-z0-9][a-z0-9-]*\Z",
        description="a short name for the zone (a-z, 0-9, -); the zone's name is made from it",
    ),
]
Timeout = Annotated[
    float,
    Meta(
        gt=0.0,
        le=p.MAX_RUN_TIMEOUT_S,
        description="seconds the command may run; then it is killed (SIGKILL) and the result"
        " says timed_out",
    ),
]
ZonePath = Annotated[
    p.GuestPath, Meta(description="an absolute path in the zone, e.g. /tmp/data.txt")
]
OctalMode = Annotated[
    str, Meta(pattern=r"^0?[0-7]{3,4}\Z", description="permission bits in octal, e.g. 644 or 755")
]
Code = Annotated[str, Meta(min_length=1, max_length=p.MAX_ARG_CHARS)]
ImageName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=p.MAX_IMAGE_REF_CHARS,
        pattern=r"^[!-~]+\Z",
        description="the zone's root filesystem: an image of the daemon's store (e.g."
        " python:3.12); left out: the daemon's default image (Debian bookworm with"
        f" python3); {p.BUILTIN_IMAGE}: a small busybox root",
    ),
]


Network = Annotated[
    p.NetRules,
    Meta(
        description="the zone's network, enforced on the host: an allow-list of rules such as"
        ' "pypi.org", "*.pythonhosted.org:443", "203.0.113.0/24:5432", or ["open"] for the'
        " internet (never the host's own networks); [] allows nothing but loopback; left out:"
        " no network at all"
    ),
]


class ToolArguments(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every tool's arguments: strict, unknown fields refused."""


class CreateZoneArgs(ToolArguments, frozen=True):
    """Boot a zone for this session (gone when the session ends)."""

    name: ShortName | None = None
    vcpus: Annotated[p.Vcpus, Meta(description="virtual CPUs")] = 1
    memory_mib: Annotated[p.MemoryMib, Meta(description="memory in MiB")] | None = None
    image: ImageName | None = None
    network: Network | None = None


class NoArgs(ToolArguments, frozen=True):
    """No arguments."""


class ZoneArgs(ToolArguments, frozen=True):
    """A zone of this session."""

    zone: ZoneRef


class RunCommandArgs(ToolArguments, frozen=True):
    """A command to run in a zone of this session."""

    zone: ZoneRef
    argv: Annotated[
        p.Argv,
        Meta(
            description="the program and its arguments, run directly (no shell): for a shell"
            ' line use ["sh", "-c", "..."]'
        ),
    ]
    timeout_s: Timeout | None = None
    cwd: Annotated[p.GuestPath, Meta(description="working directory (absolute)")] = "/"
    env: Annotated[p.Env, Meta(description="environment variables (PATH has a default)")] = (
        msgspec.field(default_factory=dict)
    )
    stdin: Annotated[str, Meta(description="text given to the command's standard input")] | None = (
        None
    )


class RunCodeArgs(ToolArguments, frozen=True):
    """Code to run: in a fresh zone of its own, or in a zone of this session."""

    language: Annotated[
        Literal["python", "shell"], Meta(description="python: python3 -c CODE; shell: sh -c CODE")
    ]
    code: Code
    timeout_s: Timeout | None = None
    zone: (
        Annotated[
            ZoneRef,
            Meta(
                description="run in this zone of the session (its files stay); left out: a fresh"
                " zone, destroyed afterwards"
            ),
        ]
        | None
    ) = None
    image: (
        Annotated[
            ImageName,
            Meta(description="the fresh zone's image (not with zone); left out: the default"),
        ]
        | None
    ) = None
    # For a fresh zone only (a zone of the session keeps the network it was created with).
    network: Network | None = None


class WriteFileArgs(ToolArguments, frozen=True):
    """A file to write (replaced whole, atomically)."""

    zone: ZoneRef
    path: ZonePath
    content: str
    encoding: Annotated[
        Encoding, Meta(description="utf-8: content is the text; base64: content is base64 bytes")
    ] = "utf-8"
    mode: OctalMode = "644"
    make_parents: Annotated[bool, Meta(description="create missing parent directories")] = True


class ReadFileArgs(ToolArguments, frozen=True):
    """A file to read."""

    zone: ZoneRef
    path: ZonePath
    encoding: Annotated[
        Encoding,
        Meta(description="utf-8: text (invalid bytes replaced); base64: the exact bytes"),
    ] = "utf-8"
    max_bytes: Annotated[int, Meta(ge=1, description="read at most this many bytes")] | None = None


class ListFilesArgs(ToolArguments, frozen=True):
    """A directory to list."""

    zone: ZoneRef
    path: ZonePath


# ---------------------------------------------------------------------------
# The tools
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    arguments: type[ToolArguments]
    result: type[ToolResult]
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "create_zone",
        "Create a zone",
        "Boot a zone: a small virtual machine with its own kernel, for running untrusted"
        " code. Returns its name, which the other tools take. It is destroyed when this"
        " session ends (or with destroy_zone). Its root filesystem is an image: the"
        " daemon's default (Debian bookworm with python3, bash and coreutils) unless"
        " image names another; processes run as the image's user (root in the default);"
        " writes go to the zone's memory and vanish with it; there is no network.",
        CreateZoneArgs,
        ZoneSummary,
    ),
    ToolSpec(
        "list_zones",
        "List zones",
        "The zones of this session.",
        NoArgs,
        ZoneListResult,
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "destroy_zone",
        "Destroy a zone",
        "Destroy a zone of this session, with everything in it.",
        ZoneArgs,
        DestroyResult,
        destructive=True,
        idempotent=True,
    ),
    ToolSpec(
        "run_command",
        "Run a command",
        "Run a program in a zone of this session and wait for it, up to timeout_s. Returns"
        " its exit code (or the signal that ended it), stdout and stderr (long output is"
        " cut in the middle; notes say so), and whether the timeout or the OOM killer"
        " ended it.",
        RunCommandArgs,
        CommandResult,
        destructive=True,
    ),
    ToolSpec(
        "run_code",
        "Run code",
        "Run a Python or shell snippet and wait for it, up to timeout_s. Without zone it"
        " runs in a fresh zone of its own that is destroyed afterwards (nothing carries"
        " over between calls; the boot takes a few seconds and is not counted in"
        " timeout_s); with zone it runs in that zone of this session. Returns what"
        " run_command returns.",
        RunCodeArgs,
        CommandResult,
        destructive=True,
    ),
    ToolSpec(
        "write_file",
        "Write a file",
        "Write a file in a zone of this session: created or replaced whole, atomically.",
        WriteFileArgs,
        WriteResult,
        destructive=True,
        idempotent=True,
    ),
    ToolSpec(
        "read_file",
        "Read a file",
        "Read a file of a zone of this session: its start, up to max_bytes; notes say when"
        " it was cut.",
        ReadFileArgs,
        ReadResult,
        read_only=True,
        idempotent=True,
    ),
    ToolSpec(
        "list_files",
        "List a directory",
        "The entries of a directory in a zone of this session: name, type, size, mode and"
        " modification time (unix seconds), sorted by name.",
        ListFilesArgs,
        ListResult,
        read_only=True,
        idempotent=True,
    ),
)

TOOLS_BY_NAME: dict[str, ToolSpec] = {tool.name: tool for tool in TOOLS}


# ---------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------


def _ecma_patterns(node: Any) -> Any:
    """JSON Schema patterns are ECMA-262 regexes, which have no ``\\Z``.

    The protocol's patterns end in ``\\Z`` (Python's true end of string); in
    ECMA-262 ``$`` without the multiline flag means just that.
    """
    if isinstance(node, dict):
        return {
            key: (
                value[:-2] + "$"
                if key == "pattern" and isinstance(value, str) and value.endswith("\\Z")
                else _ecma_patterns(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_ecma_patterns(item) for item in node]
    return node


def _struct_schema(kind: type[msgspec.Struct]) -> dict[str, Any]:
    """``kind``'s JSON Schema with an object at its root (MCP wants ``type: object`` there)."""
    _, components = msgspec.json.schema_components([kind], ref_template="#/$defs/{name}")
    schema: dict[str, Any] = dict(components.pop(kind.__name__))
    schema.pop("title", None)
    if components:
        schema["$defs"] = components
    result: dict[str, Any] = _ecma_patterns(schema)
    return result


def _overlay(prop: dict[str, Any], bound: Bound, default: float | None) -> None:
    """Apply a limit (and its default) to one property's schema, ``T | null`` included."""
    targets = [prop, *prop.get("anyOf", [])]
    for target in targets:
        if bound.maximum is not None and target.get("type") in ("number", "integer"):
            target["maximum"] = bound.maximum
        if bound.max_length is not None and target.get("type") == "string":
            target["maxLength"] = bound.max_length
    if default is not None:
        prop["default"] = default


def input_schema(tool: ToolSpec, limits: Limits) -> dict[str, Any]:
    """The ``inputSchema`` of ``tool`` as this server enforces it."""
    schema = _struct_schema(tool.arguments)
    bounds = limited_fields(limits)
    defaults = limited_defaults(limits)
    for name, prop in schema.get("properties", {}).items():
        if name in bounds:
            _overlay(prop, bounds[name], defaults.get(name))
    return schema


def output_schema(tool: ToolSpec) -> dict[str, Any]:
    return _struct_schema(tool.result)


# ---------------------------------------------------------------------------
# Decoding arguments
# ---------------------------------------------------------------------------

#: Said after a decoding error at ``$.<field>``: what the field wants, in words.
_FIELD_HINTS = {
    "zone": "a zone name, as create_zone returned it",
    "name": "a-z, 0-9 and -, starting with a letter or digit",
    "path": "an absolute path in the zone, starting with /",
    "cwd": "an absolute path in the zone, starting with /",
    "argv": 'a non-empty list of strings, e.g. ["ls", "-l", "/"]',
    "env": "an object of NAME: value strings",
    "mode": "octal permission bits such as 644 or 0755",
    "timeout_s": "seconds, a number > 0",
}


def parse_arguments(tool: ToolSpec, arguments: Mapping[str, Any] | None, limits: Limits) -> Any:
    """``arguments`` as ``tool``'s Struct, checked against ``limits``; or ToolInputError."""
    try:
        args = msgspec.convert(dict(arguments or {}), tool.arguments)
    except msgspec.ValidationError as exc:
        message = f"invalid arguments for {tool.name}: {exc}"
        found = re.search(r"at `\$\.([a-z_]+)", message)
        if found is not None and found[1] in _FIELD_HINTS:
            message += f" ({found[1]}: {_FIELD_HINTS[found[1]]})"
        raise ToolInputError(message) from None
    bounds = limited_fields(limits)
    for name, bound in bounds.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if bound.maximum is not None and value > bound.maximum:
            raise ToolInputError(
                f"invalid arguments for {tool.name}: {name} is {value:g}, this server allows at"
                f" most {bound.maximum:g}"
            )
        if bound.max_length is not None and len(value) > bound.max_length:
            raise ToolInputError(
                f"invalid arguments for {tool.name}: {name} is {len(value)} characters long,"
                f" this server allows at most {bound.max_length}"
            )
    return args


def decode_content(args: WriteFileArgs, limits: Limits) -> bytes:
    """The bytes a ``write_file`` call writes; :class:`ToolInputError` if bad or too big."""
    if args.encoding == "base64":
        # Refuse before decoding what could only be too big.
        if len(args.content) > math.ceil(limits.max_write_bytes / 3) * 4 + 4:
            raise _too_big_to_write(None, limits)
        try:
            data = base64.b64decode(args.content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ToolInputError(
                f"invalid arguments for write_file: content is not base64: {exc}"
            ) from None
    else:
        if len(args.content) > limits.max_write_bytes:
            raise _too_big_to_write(None, limits)
        data = args.content.encode()
    if len(data) > limits.max_write_bytes:
        raise _too_big_to_write(len(data), limits)
    return data


def _too_big_to_write(size: int | None, limits: Limits) -> ToolInputError:
    what = f"{size} bytes" if size is not None else "more than that"
    return ToolInputError(
        f"invalid arguments for write_file: content is {what}; this server writes at most"
        f" {limits.max_write_bytes} bytes per call (write the rest with more calls, or send"
        " a tar archive in parts and unpack it with run_command)"
    )


def stdin_bytes(args: RunCommandArgs) -> bytes | None:
    if args.stdin is None:
        return None
    data = args.stdin.encode()
    if len(data) > MAX_STDIN_BYTES:
        raise ToolInputError(
            f"invalid arguments for run_command: stdin is {len(data)} bytes, at most"
            f" {MAX_STDIN_BYTES} are taken (write the input to a file with write_file and"
            ' redirect it: ["sh", "-c", "cmd < /tmp/input"])'
        )
    return data


def octal_mode(text: str) -> int:
    return int(text, 8)
