"""The zoned wire protocol: framing, every message, every rule. One file, read top to bottom.

Two channels speak it:

- the **control socket** (``zonectl`` and other clients <-> the daemon), and
- the **agent channel** (the daemon <-> the guest agent inside one zone, over a
  virtio-serial port).

Framing
-------
A stream carries frames. A frame is a 4-byte big-endian unsigned length ``n``
followed by exactly ``n`` bytes holding one msgpack message. ``n`` is at least 1
and at most the channel's maximum (:data:`DEFAULT_MAX_FRAME` on the control
socket, :data:`AGENT_MAX_FRAME` on the agent channel). A header that breaks
either bound is a :class:`FrameError`; the stream cannot be resynchronised after
one, so the reader reports the error (if it can) and closes the connection.
:class:`FrameDecoder` is the sans-IO reader: the caller feeds it the bytes it
received and takes whole payloads out. It never holds more than one frame
(``max_frame + 4`` bytes) beyond what the caller fed since it last drained it.

Messages
--------
Every message is a frozen :class:`msgspec.Struct` encoded as a msgpack map whose
``"type"`` key holds the message's snake_case tag. Each direction of each
channel has one tagged union (:data:`Request`, :data:`Reply`,
:data:`AgentToHost`, :data:`HostToAgent`) and one decoder built once below.
Decoding validates everything: unknown types, unknown fields, wrong types and
out-of-range values are all :class:`~zoned.errors.InvalidRequest`. Clients and
guests may be hostile (an unprivileged caller, a compromised zone), so every
field they send is bounded here, not later; replies come from the daemon and
are bounded mostly by the frame size.

Control socket conversation
---------------------------
The client's first request is :class:`Hello` listing the protocol versions it
speaks; the server answers :class:`HelloReply` with the highest version both
speak (:func:`negotiate_version`) or an :class:`ErrorReply` with code
``unsupported_version``. Any other request before a successful hello is
answered ``invalid_request``.

Every request carries an ``id`` (uint32) chosen by the client; every reply to it
echoes that ``id``, so requests may be pipelined and answered out of order. A
request that fails to decode is answered with the ``id`` that
:func:`peek_request_id` can still recover from it, or ``0`` when none can.
Most requests get exactly one reply. Streams get many: :class:`WatchEvents`
yields :class:`EventReply` until the client closes the connection;
:class:`ConsoleLog` yields :class:`LogChunk` and, unless following, a final
:class:`StreamEnd`. Any request may instead end with one :class:`ErrorReply`.

Agent channel conversation
--------------------------
The guest agent speaks first: one :class:`AgentHello` as soon as it runs,
carrying :data:`AGENT_PROTOCOL_VERSION`. The host then sends :class:`Heartbeat`
periodically and the agent answers each with a :class:`HeartbeatReply` echoing
its ``seq``. Everything the agent reports is self-reported by an untrusted
guest: the host shows it, never relies on it for safety.

Versioning and evolution
------------------------
:data:`PROTOCOL_VERSION` (control socket) and :data:`AGENT_PROTOCOL_VERSION`
(agent channel) count incompatible revisions. Within one version, the
protocol only grows, in these ways:

- **new messages** (new tags in a union);
- **new fields, always with a default**; messages omit fields that hold their
  default (``omit_defaults``), so a peer that predates a field sees exactly the
  message it knows unless the new feature is actually used;
- **never** a changed type, a removed field, a renamed tag or a narrowed range.

Decoders reject unknown tags and fields, so a sender uses a new message or a
non-default new field only once the peer is known to understand it: through the
negotiated control version, or the version in :class:`AgentHello`. The same
holds for a new value in a ``Literal`` (error codes, states, event kinds).
Event kinds added after the first version (``exec_started``, ``exec_ended``)
go only to watchers that name them in :class:`WatchEvents`. The
``quarantined`` state is the exception to that rule: an older client that
meets a quarantined zone cannot decode it (the daemon and its clients ship
together; a zone is quarantined only by an operator's request).

Workload execution and file transfer (a later issue) arrive on the agent channel
as new messages (``exec_*``, ``file_*`` tags are reserved for them) and on the
control socket as new request/reply/stream messages, under the rules above.

This module imports only msgspec and :mod:`zoned.errors` (and ``typing`` and
``collections.abc``, which msgspec loads anyway): the guest agent imports it on
its boot path. For the same reason it does not use ``from __future__ import
annotations``: msgspec would then compile every field annotation from a string
at import time.
"""

from collections.abc import Iterable
from typing import Annotated, Any, Literal, NoReturn, TypeAlias, get_args

import msgspec
from msgspec import Meta

from zoned.errors import ErrorCode, InvalidRequest, UnsupportedVersion, ZonedError

# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------

#: Size of the length prefix in front of every payload.
FRAME_HEADER_SIZE = 4
#: Largest payload on the control socket (``Config.max_frame_bytes`` may change it).
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
#: Largest payload on the agent channel: the guest is hostile, keep it small.
AGENT_MAX_FRAME = 1024 * 1024
#: The length prefix is a uint32, so no channel can allow more than this.
_ABSOLUTE_MAX_FRAME = 2**32 - 1


class FrameError(InvalidRequest):
    """The byte stream is not a valid sequence of frames; the connection is beyond repair."""


def _check_max_frame(max_frame: int) -> None:
    if not 1 <= max_frame <= _ABSOLUTE_MAX_FRAME:
        raise ValueError(f"max_frame must be within 1..{_ABSOLUTE_MAX_FRAME}, got {max_frame}")


class FrameDecoder:
    """Split a received byte stream into frame payloads (sans-IO).

    Feed it every chunk received, then call :meth:`next_frame` until it returns
    ``None``. A header announcing an empty or oversized frame raises
    :class:`FrameError` as soon as its 4 bytes have arrived, before any of the
    body is buffered; after that the decoder stays broken and raises the same
    error again on every call.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        _check_max_frame(max_frame)
        self.max_frame = max_frame
        self._buffer = bytearray()
        # Offset in _buffer of the first header not yet validated; everything
        # before it is a sequence of frames whose headers have been checked.
        self._unchecked = 0
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned; nonzero at EOF means a truncated frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; raises :class:`FrameError` on a bad header."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        self._check_headers()

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or ``None`` if more bytes are needed."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if len(buffer) < FRAME_HEADER_SIZE:
            return None
        end = FRAME_HEADER_SIZE + int.from_bytes(buffer[:FRAME_HEADER_SIZE], "big")
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:
            payload = bytes(view[FRAME_HEADER_SIZE:end])
        del buffer[:end]  # CPython trims a bytearray's front in O(1).
        self._unchecked -= end
        return payload

    def _check_headers(self) -> None:
        buffer = self._buffer
        while self._unchecked + FRAME_HEADER_SIZE <= len(buffer):
            start = self._unchecked
            length = int.from_bytes(buffer[start : start + FRAME_HEADER_SIZE], "big")
            if length == 0:
                self._fail(FrameError("invalid frame: length 0 (a frame holds one message)"))
            if length > self.max_frame:
                self._fail(
                    FrameError(
                        f"frame too large: header announces {length} bytes,"
                        f" the maximum is {self.max_frame} bytes"
                    )
                )
            self._unchecked = start + FRAME_HEADER_SIZE + length

    def _fail(self, error: FrameError) -> NoReturn:
        self._error = error
        self._buffer = bytearray()  # Never needed again: release it now.
        self._unchecked = 0
        raise error


# ---------------------------------------------------------------------------
# Shared value types and bounds
# ---------------------------------------------------------------------------
# Patterns end in \Z, not $: with re.search, "$" also matches before a
# trailing newline, which would let "name\n" through.

PROTOCOL_VERSION = 1
#: Control-protocol versions this build speaks, in any order.
SUPPORTED_VERSIONS: frozenset[int] = frozenset({PROTOCOL_VERSION})

ZONE_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}\Z"
MIN_VCPUS = 1
MAX_VCPUS = 256
#: The smallest zone any profile and machine boots in, with a margin
#: (zoned.sizes, measured by tools/min-memory); the daemon refuses less than
#: its profile's and machine's own minimum.
MIN_MEMORY_MIB = 96
MAX_MEMORY_MIB = 1024 * 1024
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 256
MAX_KERNEL_ARGS = 32
MAX_KERNEL_ARG_CHARS = 256
#: Sum of the extra kernel args' lengths (plus separating spaces); the kernel's
#: whole command line is limited to 2048 bytes on x86 and the hardened
#: arguments need the rest.
MAX_KERNEL_ARGS_TOTAL_CHARS = 1024
MAX_CLIENT_CHARS = 256
MAX_HELLO_VERSIONS = 16
#: Largest ``LogChunk.data``; the server splits longer output.
MAX_LOG_CHUNK = 64 * 1024
#: ``error_reply`` truncates messages to this many characters.
MAX_ERROR_MESSAGE_CHARS = 4096
#: Exec: bounds on what a process is started with.
MAX_ARGV = 4096
MAX_ARG_CHARS = 128 * 1024
MAX_ENV = 1024
MAX_PATH_CHARS = 4096
#: Largest piece of process input or output in one message, both channels.
MAX_EXEC_CHUNK = 64 * 1024
#: Bytes of output (stdout and stderr together) the agent may send for one
#: process before the host grants more with ExecCredit; and bytes of input the
#: host may send before the agent grants more with ExecInputCredit.
EXEC_OUTPUT_WINDOW = 512 * 1024
EXEC_INPUT_WINDOW = 256 * 1024
#: Processes running at once in one zone through the agent.
MAX_EXECS_PER_ZONE = 64
#: Largest ``pids_limit`` of one process's cgroup.
MAX_PIDS_LIMIT = 4 * 1024 * 1024
#: Longest ``RunZone.timeout_s``: a day.
MAX_RUN_TIMEOUT_S = 86400.0
#: Images: the longest reference, the most tags one import adds, the largest
#: piece of an uploaded archive, the largest writable layer (MiB), the most
#: supplementary groups a process gets.
MAX_IMAGE_REF_CHARS = 512
MAX_IMAGE_TAGS = 16
MAX_IMAGE_CHUNK = 1024 * 1024
MAX_WRITABLE_LAYER_MIB = 1024 * 1024
MAX_GROUPS = 256
#: Zone networks: rules and publishes travel in the syntax ``zonectl`` reads
#: (``zoned.net.policy``: ``pypi.org:443``, ``*.pythonhosted.org``,
#: ``10.0.0.0/8``, ``udp://203.0.113.5:123``, ``open``; ``127.0.0.1:8080:80``);
#: the daemon parses them, and a bad one is ``invalid_request`` naming it.
MAX_NET_RULES = 256
MAX_NET_RULE_CHARS = 300
MAX_PUBLISHES = 64
MAX_PUBLISH_CHARS = 64
#: Warm pools (docs/fast-start.md): at most this many templates, each with at
#: most this many booted, never-used zones.
MAX_POOLS = 32
MAX_POOL_SIZE = 64

_UINT32_MAX = 2**32 - 1
# msgspec bounds must fit an int64.
_INT64_MAX = 2**63 - 1

RequestId = Annotated[int, Meta(ge=0, le=_UINT32_MAX)]
ZoneName = Annotated[str, Meta(max_length=63, pattern=ZONE_NAME_PATTERN)]
PoolName = Annotated[str, Meta(max_length=32, pattern=r"^[a-z][a-z0-9-]{0,31}\Z")]
# A profile names a directory in the kernel store: the zone-name rules keep it
# a plain path component.
ProfileName = Annotated[str, Meta(max_length=63, pattern=ZONE_NAME_PATTERN)]
Vcpus = Annotated[int, Meta(ge=MIN_VCPUS, le=MAX_VCPUS)]
MemoryMib = Annotated[int, Meta(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)]
# A zone's memory as reported: zones made before a minimum was raised keep theirs.
ZoneMemoryMib = Annotated[int, Meta(ge=1, le=MAX_MEMORY_MIB)]
# Printable ASCII without spaces: the kernel splits its command line on
# whitespace and treats it as bytes; anything else is an argument-smuggling
# vector, never a real need.
KernelArg = Annotated[str, Meta(max_length=MAX_KERNEL_ARG_CHARS, pattern=r"^[!-~]+\Z")]
KernelArgs = Annotated[list[KernelArg], Meta(max_length=MAX_KERNEL_ARGS)]
LabelKey = Annotated[
    str,
    Meta(
        max_length=MAX_LABEL_KEY_CHARS,
        pattern=rf"^[A-Za-z0-9][A-Za-z0-9._/-]{{0,{MAX_LABEL_KEY_CHARS - 1}}}\Z",
    ),
]
# Labels are persisted in the domain's XML <metadata>, which cannot hold
# control characters or U+FFFE/U+FFFF; they also end up on terminals.
LabelValue = Annotated[
    str, Meta(max_length=MAX_LABEL_VALUE_CHARS, pattern=r"^[^\x00-\x1f\x7f\ufffe\uffff]*\Z")
]
Labels = Annotated[dict[LabelKey, LabelValue], Meta(max_length=MAX_LABELS)]
CpuId = Annotated[int, Meta(ge=0, le=_UINT32_MAX)]
# argv[0] must not be empty; NUL cannot pass execve.
ExecArg = Annotated[str, Meta(max_length=MAX_ARG_CHARS, pattern=r"^[^\x00]*\Z")]
Argv = Annotated[list[ExecArg], Meta(min_length=1, max_length=MAX_ARGV)]
# A command line that may be empty: the image's own command then (Exec, RunZone).
CommandLine = Annotated[list[ExecArg], Meta(max_length=MAX_ARGV)]
EnvName = Annotated[str, Meta(min_length=1, max_length=1024, pattern=r"^[^\x00=]+\Z")]
Env = Annotated[dict[EnvName, ExecArg], Meta(max_length=MAX_ENV)]
GuestPath = Annotated[str, Meta(min_length=1, max_length=MAX_PATH_CHARS, pattern=r"^/[^\x00]*\Z")]
GuestId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Signal = Annotated[int, Meta(ge=1, le=64)]
ExecChunk = Annotated[bytes, Meta(max_length=MAX_EXEC_CHUNK)]
TermSize = Annotated[int, Meta(ge=1, le=4096)]
OutputStream = Literal["stdout", "stderr"]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
NetRule = Annotated[str, Meta(min_length=1, max_length=MAX_NET_RULE_CHARS, pattern=r"^[!-~]+\Z")]
NetRules = Annotated[list[NetRule], Meta(max_length=MAX_NET_RULES)]
PublishSpec = Annotated[str, Meta(min_length=3, max_length=MAX_PUBLISH_CHARS, pattern=r"^[!-~]+\Z")]
Publishes = Annotated[list[PublishSpec], Meta(max_length=MAX_PUBLISHES)]
# Figures the guest reports (and the host passes on): finite and in range
# (ge/le also reject NaN and infinities).
_Seconds = Annotated[float, Meta(ge=0.0, le=1e10)]
_GuestCount = Annotated[int, Meta(ge=0, le=_INT64_MAX)]

# An image as the daemon's store names it: a tag, name@digest, an id or a 12+
# hex id prefix (the store parses it); printable ASCII without spaces.
ImageRef = Annotated[str, Meta(min_length=1, max_length=MAX_IMAGE_REF_CHARS, pattern=r"^[!-~]+\Z")]
ImageTags = Annotated[list[ImageRef], Meta(max_length=MAX_IMAGE_TAGS)]
# os/architecture[/variant], e.g. linux/amd64.
PlatformName = Annotated[str, Meta(max_length=64, pattern=r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?\Z")]
# user[:group], names (resolved in the image's /etc/passwd and /etc/group) or numbers.
UserSpec = Annotated[
    str, Meta(min_length=1, max_length=256, pattern=r"^[^:\x00-\x1f\x7f]+(:[^:\x00-\x1f\x7f]+)?\Z")
]
# Registry credentials (they go to skopeo, never to a log).
Credential = Annotated[str, Meta(min_length=1, max_length=8192, pattern=r"^[^\x00\n]*\Z")]
#: Where a zone's writes go: a size-limited tmpfs in its RAM, or a scratch disk of its own.
WritableLayer = Literal["tmpfs", "disk"]
WritableLayerMib = Annotated[int, Meta(ge=1, le=MAX_WRITABLE_LAYER_MIB)]
ImagePhase = Literal["upload", "fetch", "verify", "wait", "apply", "build", "publish", "done"]
#: The image name that stands for the daemon's small built-in workload root.
BUILTIN_IMAGE = "builtin"

Accelerator = Literal["kvm", "tcg"]
Machine = Literal["microvm", "q35"]
Placement = Literal["shared", "exclusive"]
ZoneState = Literal["creating", "booting", "ready", "stopping", "stopped", "failed", "quarantined"]
EventKind = Literal[
    "zone_state",
    "cpu_online",
    "cpu_offline",
    "daemon",
    "exec_started",
    "exec_ended",
    "net_refused",
    "net_status",
]
#: The kinds a watcher gets when it names none: those of the first version.
#: Later kinds go only to watchers that ask for them, so that a client never
#: receives a value it cannot decode.
DEFAULT_EVENT_KINDS: tuple[EventKind, ...] = ("zone_state", "cpu_online", "cpu_offline", "daemon")
#: The most records one ``AuditReply`` carries.
MAX_AUDIT_BATCH = 256
#: Zones and kinds a watch filter may name.
MAX_WATCH_FILTER = 64
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z"
NetStatus = Literal["up", "restarting", "failed"]


class _Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every value on the wire: immutable, strict, defaults left out.

    Fields with defaults come last (msgspec's rule); build messages with
    keyword arguments all the same, so field order never matters to callers.
    """


class _Message(_Record, tag_field="type", frozen=True):
    """Base of every top-level message: tagged with its snake_case type."""


# ---------------------------------------------------------------------------
# Control socket: requests (client -> server)
# ---------------------------------------------------------------------------


class Hello(_Message, tag="hello", frozen=True):
    """First request on a connection: the protocol versions the client speaks."""

    id: RequestId
    versions: Annotated[
        list[Annotated[int, Meta(ge=1, le=_UINT32_MAX)]],
        Meta(min_length=1, max_length=MAX_HELLO_VERSIONS),
    ]
    client: Annotated[str, Meta(max_length=MAX_CLIENT_CHARS)] = ""


class HostInfo(_Message, tag="host_info", frozen=True):
    """Describe the host: accelerator, topology, capacity, kernels."""

    id: RequestId


class CreateZone(_Message, tag="create_zone", frozen=True):
    """Create and boot a zone; the reply comes once it is ready (or has failed)."""

    id: RequestId
    name: ZoneName
    vcpus: Vcpus = 1
    memory_mib: MemoryMib = 256
    profile: ProfileName = "strict"
    # Appended to the profile's hardened command line.
    kernel_args: KernelArgs = []
    placement: Placement = "shared"
    labels: Labels = {}
    # None: the daemon's configured default.
    machine: Machine | None = None
    # The zone's workload root (docs/images.md): an image of the daemon's
    # store, "builtin" for the small built-in root, "" for the default image;
    # its writable layer and that layer's size (None: the kind's default).
    image: Annotated[str, Meta(max_length=MAX_IMAGE_REF_CHARS, pattern=r"^[!-~]*\Z")] = ""
    writable_layer: WritableLayer = "tmpfs"
    writable_layer_mib: WritableLayerMib | None = None
    # The zone's network. None: none at all (no NIC), unless it publishes a
    # port; a list: its egress allow-list (empty: nothing beyond its own
    # resolver, which refuses every name). ``publishes``: its TCP ports on
    # host addresses, ``[ADDRESS:]HOST_PORT:ZONE_PORT`` (127.0.0.1 default).
    net: NetRules | None = None
    publishes: Publishes = []

    def __post_init__(self) -> None:
        total = sum(len(arg) + 1 for arg in self.kernel_args)
        if total > MAX_KERNEL_ARGS_TOTAL_CHARS:
            raise ValueError(
                f"kernel_args too long: {total} characters in total,"
                f" the maximum is {MAX_KERNEL_ARGS_TOTAL_CHARS}"
            )


class GetZone(_Message, tag="get_zone", frozen=True):
    id: RequestId
    name: ZoneName


class ListZones(_Message, tag="list_zones", frozen=True):
    """List zones carrying every given label (all zones when empty)."""

    id: RequestId
    labels: Labels = {}


class DestroyZone(_Message, tag="destroy_zone", frozen=True):
    """Stop a zone for good; the reply is its final record (state ``stopped``)."""

    id: RequestId
    name: ZoneName


class WatchEvents(_Message, tag="watch_events", frozen=True):
    """Stream :class:`EventReply` from now until the client closes the connection.

    ``zones``: only events of these zones (and none of the host's); empty:
    every zone's and the host's. ``kinds``: only these kinds; empty: the
    kinds of :data:`DEFAULT_EVENT_KINDS` (exec and network events only to
    those who ask).
    """

    id: RequestId
    zones: Annotated[list[ZoneName], Meta(max_length=MAX_WATCH_FILTER)] = []
    kinds: Annotated[list[EventKind], Meta(max_length=MAX_WATCH_FILTER)] = []


class ConsoleLog(_Message, tag="console_log", frozen=True):
    """Stream a zone's serial console log as :class:`LogChunk` messages.

    Without ``follow`` the stream ends with :class:`StreamEnd` at the current
    end of the log; with it, new output keeps coming until the client closes.
    ``tail_bytes`` starts that many bytes before the end (None: from the start).

    A destroyed zone's log is kept for the daemon's log retention: the zone
    of that name now, else the newest destroyed zone of that name, else (with
    ``uuid``) exactly that zone. A kept log is the whole console output,
    virtlogd's rotated copies first.
    """

    id: RequestId
    name: ZoneName
    follow: bool = False
    tail_bytes: Annotated[int, Meta(ge=0, le=_UINT32_MAX)] | None = None
    uuid: Annotated[str, Meta(pattern=UUID_PATTERN)] | None = None


class _ExecFields(_Message, frozen=True, kw_only=True):
    """What to run: a process started directly (no shell), as in execve.

    ``argv`` may be empty in :class:`Exec` and :class:`RunZone` only (the
    image's command; daemons before images require it); the agent always
    gets one.
    """

    argv: CommandLine = []
    # The process's whole environment (nothing is inherited from the agent).
    env: Env = {}
    cwd: GuestPath = "/"
    uid: GuestId = 0
    gid: GuestId = 0
    # True: the client sends input with ExecInput; False: stdin is /dev/null.
    stdin: bool = False
    # A pseudo-terminal of rows x cols as the process's stdin, stdout and
    # stderr (its controlling terminal; output all arrives as "stdout").
    tty: bool = False
    rows: TermSize = 24
    cols: TermSize = 80
    # Limits of the process's own cgroup (with everything it starts); None: none.
    memory_limit_mib: Annotated[int, Meta(ge=1, le=MAX_MEMORY_MIB)] | None = None
    pids_limit: Annotated[int, Meta(ge=1, le=MAX_PIDS_LIMIT)] | None = None
    # -- Confinement (docs/workloads.md: what a process can and cannot touch).
    # True: the process and all it runs can never gain privileges (setuid and
    # setgid bits and file capabilities do nothing: prctl PR_SET_NO_NEW_PRIVS).
    no_new_privs: bool = False
    # True: argv runs with the agent's own tools (its static busybox; argv[0]
    # names the applet, "sh" runs busybox's applets first) instead of the
    # workload root's programs, which may be missing or replaced: for file transfer.
    agent_tools: bool = False

    def __post_init__(self) -> None:
        if self.argv and not self.argv[0]:
            raise ValueError("argv[0] must not be empty")
        total = sum(len(a) + 1 for a in self.argv) + sum(
            len(k) + len(v) + 2 for k, v in self.env.items()
        )
        if total > MAX_ARG_CHARS * 4:
            raise ValueError(
                f"argv and env too long: {total} characters, the maximum is {MAX_ARG_CHARS * 4}"
            )


class _ImageProcessFields(_ExecFields, frozen=True, kw_only=True):
    """How the zone's image shapes the process, as a container runtime does
    (:mod:`zoned.images.imageconfig`; ``builtin`` zones have a small config).

    ``env`` is merged over the image's ``Env``. ``workdir`` replaces the
    image's ``WorkingDir``, ``user`` its ``User`` (``user[:group]``, names
    from the image's ``/etc/passwd`` and ``/etc/group``); left out, the
    image's apply, unless the older ``cwd``/``uid``/``gid`` hold something
    other than their defaults. ``entrypoint`` replaces the image's
    ``Entrypoint`` (and drops its ``Cmd``; ``[]`` clears it). For
    :class:`RunZone`, ``argv`` replaces the image's ``Cmd`` (``docker run
    IMAGE ARGS``); for :class:`Exec` it is the whole command (``docker
    exec``), after ``entrypoint`` when one is given. An empty ``argv``
    runs the image's command.
    """

    entrypoint: CommandLine | None = None
    user: UserSpec | None = None
    workdir: GuestPath | None = None


class Exec(_ImageProcessFields, tag="exec", frozen=True):
    """Run a process in a ready zone and stream it: :class:`ExecStarted`, then
    :class:`ExecOutput` pieces, then :class:`ExecExit` (or an error).

    While it runs, the client may send :class:`ExecInput` and
    :class:`ExecSignal` carrying this request's ``id``. A client that goes
    away (disconnects, cancels) before the end hangs the process up: its
    process group gets SIGHUP, and SIGKILL 2 s later if it is still there.
    """

    id: RequestId
    zone: ZoneName


class RunZone(_ImageProcessFields, tag="run_zone", frozen=True):
    """Create a zone, run one process in it, destroy the zone.

    Replies: :class:`ZoneReply` once the zone is ready, then the same stream as
    :class:`Exec`. ``timeout_s`` is how long the process may run, counted from
    its start: the boot is not counted (the daemon's boot timeout bounds it;
    a zone that does not boot fails the request with ``hypervisor``). The
    zone is destroyed whatever happens: the process ends, ``timeout_s``
    passes (the process is killed; ``ExecExit.timed_out``), the client
    disconnects. Its name is generated when ``name`` is empty; a name that
    is taken fails the request with ``conflict`` (that zone is left alone).
    """

    id: RequestId
    name: Annotated[str, Meta(max_length=63, pattern=r"^([a-z][a-z0-9-]{0,62})?\Z")] = ""
    vcpus: Vcpus = 1
    memory_mib: MemoryMib = 256
    profile: ProfileName = "strict"
    placement: Placement = "shared"
    labels: Labels = {}
    machine: Machine | None = None
    timeout_s: Annotated[float, Meta(gt=0.0, le=MAX_RUN_TIMEOUT_S)] | None = None
    # As in CreateZone.
    image: Annotated[str, Meta(max_length=MAX_IMAGE_REF_CHARS, pattern=r"^[!-~]*\Z")] = ""
    writable_layer: WritableLayer = "tmpfs"
    writable_layer_mib: WritableLayerMib | None = None
    net: NetRules | None = None
    publishes: Publishes = []


class ZoneMetrics(_Message, tag="zone_metrics", frozen=True):
    """A zone's resource figures now: the host's view (libvirt) and the guest's report."""

    id: RequestId
    name: ZoneName


class AuditQuery(_Message, tag="audit_query", frozen=True):
    """Stream the audit trail's records as :class:`AuditReply` batches, oldest
    first, then :class:`StreamEnd`.

    ``zone``: only that zone's records (of every zone of that name); ``since``:
    only records from that Unix time on. A caller sees the records of its own
    requests and of its own zones; root and administrators see every record.
    """

    id: RequestId
    zone: Annotated[str, Meta(max_length=63, pattern=r"^([a-z][a-z0-9-]{0,62})?\Z")] = ""
    since: Annotated[float, Meta(ge=0.0, le=1e10)] | None = None


class QuarantineZone(_Message, tag="quarantine_zone", frozen=True):
    """Freeze a running zone at once and collect its evidence.

    The zone's vCPUs are paused (state ``quarantined``: it runs no processes,
    its running ones are cut off), then its evidence is written to a bundle
    on the host (:class:`EvidenceBundle`). With ``destroy`` the zone is
    destroyed afterwards, else it stays paused for inspection until it is
    destroyed. A zone that is not running (``stopped``, ``failed``,
    ``stopping``) or still booting is refused (``conflict``), changing nothing.
    """

    id: RequestId
    name: ZoneName
    destroy: bool = False


class SetZoneNet(_Message, tag="set_zone_net", frozen=True):
    """Change a running networked zone's policy and/or publishes without restarting it.

    ``net`` None keeps the policy, ``publishes`` None keeps the publishes.
    In force for new connections and names when :class:`ZoneNetReply` comes;
    open connections the new policy no longer allows are closed. A zone
    created without a network is ``conflict`` (its NIC exists only from the
    start); bad rules, overlapping publishes or a taken host port change
    nothing.
    """

    id: RequestId
    name: ZoneName
    net: NetRules | None = None
    publishes: Publishes | None = None


class ExecInput(_Message, tag="exec_input", frozen=True):
    """Standard input for the running Exec/RunZone request ``id`` (no reply).

    ``eof`` closes the process's stdin after ``data``. Sending blocks (the
    server stops reading the connection) while the process does not read.
    """

    id: RequestId
    data: ExecChunk = b""
    eof: bool = False


class ExecResize(_Message, tag="exec_resize", frozen=True):
    """The terminal of the running Exec/RunZone request ``id`` (``tty``) changed size (no reply)."""

    id: RequestId
    rows: TermSize
    cols: TermSize


class ExecSignal(_Message, tag="exec_signal", frozen=True):
    """Send a signal to the process of the running Exec/RunZone request ``id`` (no reply)."""

    id: RequestId
    signal: Signal


# Images (docs/images.md). Every one answers for the daemon's one store; tags
# are shared by every caller. Imports and pulls are streams: ImageProgress
# replies while they run (advisory, at most a few a second), then one
# ImageReply; a client that goes away cancels its import and nothing of it is
# kept.


class PullImage(_Message, tag="pull_image", frozen=True):
    """Fetch ``reference`` from its registry, verify and convert it; tagged with
    the reference (when it has a tag) and ``tags``.

    ``platform`` defaults to the host's (the only one zones here run).
    Credentials: a user name and password, or a bearer token. ``tls_verify``
    may be off only for a registry on loopback.
    """

    id: RequestId
    reference: ImageRef
    platform: PlatformName | None = None
    tags: ImageTags = []
    username: Credential | None = None
    password: Credential | None = None
    registry_token: Credential | None = None
    tls_verify: bool = True


class ImportImage(_Message, tag="import_image", frozen=True):
    """Import an image whose archive the client sends: a ``docker save``
    archive, or an OCI image layout as a tar (an OCI archive).

    The daemon never reads a client's path: the client sends the archive's
    ``size`` bytes as :class:`ImageData` pieces carrying this request's id,
    the last with ``eof``; then the import runs. ``reference`` picks one
    image of an archive that holds several (an OCI ``ref.name``, a docker
    ``repo:tag``).
    """

    id: RequestId
    size: Annotated[int, Meta(ge=1, le=_INT64_MAX)]
    reference: ImageRef | None = None
    platform: PlatformName | None = None
    tags: ImageTags = []


class ImageData(_Message, tag="image_data", frozen=True):
    """A piece of the archive of the running ImportImage request ``id`` (no reply)."""

    id: RequestId
    data: Annotated[bytes, Meta(max_length=MAX_IMAGE_CHUNK)] = b""
    eof: bool = False


class ListImages(_Message, tag="list_images", frozen=True):
    id: RequestId


class InspectImage(_Message, tag="inspect_image", frozen=True):
    id: RequestId
    reference: ImageRef


class RemoveImage(_Message, tag="remove_image", frozen=True):
    """Untag ``reference`` if its image has other tags, else remove the image;
    refused (``conflict``) while a zone uses it, and for the default image."""

    id: RequestId
    reference: ImageRef


class PruneImages(_Message, tag="prune_images", frozen=True):
    """Remove every image no zone uses, except the default image."""

    id: RequestId


class ImageSizes(_Message, tag="image_sizes", frozen=True):
    """Disk use of the image store, per image and in all."""

    id: RequestId


class PoolSpec(_Record, frozen=True, kw_only=True):
    """A warm pool's template: what its zones are, and how many to keep booted.

    A ``create_zone`` or ``run_zone`` matches it when it asks for the same
    image (as written; "" and the daemon's default image are one), profile,
    vCPUs, memory, machine (None: the daemon's default), writable layer and
    its size, shared placement, no extra kernel arguments and no network
    (``net`` None, no ``publishes``: pool zones have none).
    """

    image: Annotated[str, Meta(max_length=MAX_IMAGE_REF_CHARS, pattern=r"^[!-~]*\Z")] = ""
    profile: ProfileName = "strict"
    vcpus: Vcpus = 1
    memory_mib: MemoryMib = 256
    machine: Machine | None = None
    writable_layer: WritableLayer = "tmpfs"
    writable_layer_mib: WritableLayerMib | None = None
    # Booted, never-used zones to keep ready; 0 keeps the template, no zones.
    size: Annotated[int, Meta(ge=0, le=MAX_POOL_SIZE)] = 1


class SetPool(_Message, tag="set_pool", frozen=True):
    """Create or change the pool ``name`` (root and administrators only).

    Refused, changing nothing, when the template names an unknown image or
    profile, is beyond the host's limits, or when all pools together would
    hold more memory than the host has for zones. The reply comes at once;
    the pool fills (or shrinks) in the background.
    """

    id: RequestId
    name: PoolName
    spec: PoolSpec


class ListPools(_Message, tag="list_pools", frozen=True):
    id: RequestId


class RemovePool(_Message, tag="remove_pool", frozen=True):
    """Remove the pool ``name``; its unused zones are destroyed."""

    id: RequestId
    name: PoolName


Request: TypeAlias = (
    Hello
    | HostInfo
    | CreateZone
    | GetZone
    | ListZones
    | DestroyZone
    | WatchEvents
    | ConsoleLog
    | Exec
    | RunZone
    | ZoneMetrics
    | ExecInput
    | ExecSignal
    | ExecResize
    | AuditQuery
    | QuarantineZone
    | PullImage
    | ImportImage
    | ImageData
    | ListImages
    | InspectImage
    | RemoveImage
    | PruneImages
    | ImageSizes
    | SetZoneNet
    | SetPool
    | ListPools
    | RemovePool
)
#: Requests that feed a running stream rather than start one.
StreamInput: TypeAlias = ExecInput | ExecSignal | ExecResize | ImageData


# ---------------------------------------------------------------------------
# Control socket: records carried by replies
# ---------------------------------------------------------------------------


class CpuInfo(_Record, frozen=True):
    """One host CPU as the placement allocator sees it."""

    id: CpuId
    # None while the CPU is offline: the kernel hides its topology then.
    core: int | None
    package: int | None
    node: int
    online: bool
    # Kept for the host and for QEMU emulator threads; never given to a zone.
    reserved: bool
    # The zone holding this CPU exclusively, if any.
    allocated_to: str | None = None


class NumaNode(_Record, frozen=True):
    id: int
    cpus: list[CpuId]
    memory_mib: NonNegativeInt


class KernelInfo(_Record, frozen=True):
    """One guest kernel profile available in the kernel store."""

    profile: str
    kernel_release: str
    image_sha256: Sha256Hex
    # sha256 of the config the image was built from ("" when unknown).
    config_sha256: str = ""


class SharedImageInfo(_Record, frozen=True):
    """A file every zone boots from: root-owned, read-only, its hash checked at each start."""

    # "kernel <profile>", "boot image", "workload root".
    kind: str
    path: str
    sha256: Sha256Hex


class HostIsolation(_Record, frozen=True):
    """What keeps zones apart on this host (see docs/security.md)."""

    # Each zone's QEMU runs as a uid and gid of its own from this range; the
    # first is the accelerator probe's.
    qemu_uid_base: NonNegativeInt
    qemu_uid_count: NonNegativeInt
    qemu_uids_in_use: NonNegativeInt
    # libvirt's security label for zones, in words.
    seclabel: str
    # QEMU's cgroup limits: the zone's memory plus this much, and its tasks.
    memory_overhead_mib: NonNegativeInt
    pids_limit: NonNegativeInt
    # Which cgroup controller holds the pids limit ("" when none can).
    pids_controller: str = ""
    # The group whose members see every zone ("" for none: root only).
    admin_group: str = ""
    # Whether the caller sees every zone (root or administrator) or only its own.
    caller_sees_all: bool = False
    shared_images: list[SharedImageInfo] = []


class HostInfoData(_Record, frozen=True):
    accelerator: Accelerator
    # The machine type a CreateZone without ``machine`` gets.
    machine: Machine
    cpus: list[CpuInfo]
    numa_nodes: list[NumaNode]
    memory_total_mib: NonNegativeInt
    memory_reserved_mib: NonNegativeInt
    # Memory still available to new zones.
    memory_free_mib: NonNegativeInt
    # CPUs an ``exclusive`` zone could be given right now.
    cpus_free_exclusive: list[CpuId]
    # CPUs that ``shared`` zones float over.
    shared_pool: list[CpuId]
    zone_count: NonNegativeInt
    kernels: list[KernelInfo]
    isolation: HostIsolation | None = None


class ZoneInfo(_Record, frozen=True):
    """Everything a client may know about one zone."""

    name: ZoneName
    uuid: str
    state: ZoneState
    vcpus: Vcpus
    memory_mib: ZoneMemoryMib
    profile: str
    machine: Machine
    accelerator: Accelerator
    placement: Placement
    # Host CPU each vCPU is pinned to, by vCPU index (empty: not pinned).
    cpus: list[CpuId]
    emulator_cpus: list[CpuId]
    numa_node: int | None
    labels: Labels
    # Unix times (seconds).
    created_at: float
    ready_at: float | None
    # Guest kernel start to agent hello, as reported by the (untrusted) guest.
    guest_boot_s: float | None
    # Host path of the serial console log.
    console_log: str
    # Why the zone is in its state (mostly for failed/stopped); free text.
    reason: str = ""
    # Empty until the agent has said hello.
    kernel_release: str = ""
    # The uid that created the zone: it (with root and administrators) may act on it.
    owner_uid: int | None = None
    # What isolates the zone on the host: its QEMU's uid and gid (None: the
    # shared libvirt-qemu user of zones created before per-zone uids), libvirt's
    # security label in words, its QEMU's cgroup limits (None: not set).
    qemu_uid: int | None = None
    qemu_gid: int | None = None
    seclabel: str = ""
    memory_hard_limit_mib: int | None = None
    pids_limit: int | None = None
    # The hashes of what it booted, checked before its start ("" when unknown).
    kernel_sha256: str = ""
    kernel_config_sha256: str = ""
    boot_image_sha256: str = ""
    rootfs_sha256: str = ""
    # The workload root: the image as the request named it ("" for the
    # default), its id (sha256:<config digest>; "builtin" for the built-in
    # root), and where the zone's writes go.
    image: str = ""
    image_id: str = ""
    writable_layer: str = ""
    writable_layer_mib: int | None = None
    # The zone's network (see CreateZone.net): its policy as rules (None: no
    # network), its publishes, its addresses, and its helper's state: "up",
    # "restarting" (nothing flows meanwhile), "failed" (no network: it never
    # falls open).
    net: list[str] | None = None
    publishes: list[str] = []
    net_address: str = ""
    net_address6: str = ""
    net_status: NetStatus | None = None
    # Why a failed zone failed, as a word ("" otherwise): host_oom, agent_died,
    # guest_oom, guest_panic, qemu_crashed, guest_stopped, vanished,
    # agent_silent, agent_misbehaved, boot_timeout (zoned.failures; more may
    # come). ``reason`` says it in words.
    failure: str = ""
    # The warm pool the zone was taken from ("" when it was booted for its
    # request): the reply to create_zone and run_zone says which.
    from_pool: str = ""


class PoolInfo(_Record, frozen=True, kw_only=True):
    """One warm pool: its template and how it is doing."""

    name: str
    spec: PoolSpec
    # Zones booted and never used, and zones booting for it now.
    ready: int = 0
    booting: int = 0
    # Matching requests that took a ready zone, and those that found none.
    hits: int = 0
    misses: int = 0
    # Refills that failed since the daemon started; the last one's reason;
    # until when (Unix time) refilling waits after failures in a row.
    refill_failures: int = 0
    last_failure: str = ""
    backoff_until: float | None = None
    # Taking a ready zone (identity and record written), in seconds.
    acquire_last_s: float | None = None
    acquire_mean_s: float | None = None


class ImageInfo(_Record, frozen=True):
    """One image of the daemon's store."""

    # sha256:<config digest>, the image's identity.
    id: str
    tags: list[str]
    # name@manifest-digest for each registry it was pulled from.
    repo_digests: list[str]
    # os/architecture[/variant].
    platform: str
    created: str | None
    imported_at: float
    layers: NonNegativeInt
    # The converted root file system (what zones attach), in bytes.
    rootfs_bytes: NonNegativeInt
    # The image's run settings (its OCI config).
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: list[str] = []
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = {}
    # Zones that use it now.
    zones: NonNegativeInt = 0
    # Whether it is the daemon's default image.
    default: bool = False


class ImageSizeInfo(_Record, frozen=True):
    id: str
    tags: list[str]
    rootfs_bytes: NonNegativeInt
    # Manifests, config and layers of this image, of which shared with another.
    blob_bytes: NonNegativeInt
    shared_blob_bytes: NonNegativeInt


class ImageStoreSizes(_Record, frozen=True):
    """Allocated bytes of the store: per image, and in all."""

    images: list[ImageSizeInfo]
    rootfs_bytes: NonNegativeInt
    blob_bytes: NonNegativeInt
    scratch_bytes: NonNegativeInt
    total_bytes: NonNegativeInt


class _GuestFigures(_Record, frozen=True, kw_only=True):
    """What the agent reports about its guest with every :class:`HeartbeatReply`,
    and the host passes on in :class:`GuestMetrics` (self-reported, advisory)."""

    uptime_s: _Seconds
    load1: Annotated[float, Meta(ge=0.0, le=1e6)]
    mem_total_kib: _GuestCount
    mem_available_kib: _GuestCount
    # Processes in the guest (the agent included).
    processes: _GuestCount = 0


class GuestMetrics(_GuestFigures, frozen=True, kw_only=True, omit_defaults=False):
    """What the zone's agent last reported about itself (advisory: the guest is untrusted).

    Every field is always encoded (clients before ``processes`` had a
    default require it).
    """

    # Host time (unix seconds) the report arrived.
    reported_at: float


class NetMetrics(_Record, frozen=True, kw_only=True):
    """A zone's network, counted on the host (zoned's resolver and proxy).

    Bytes are payload through the proxy plus forwarded UDP; refused
    connections and names are also each an event (``net_refused``) unless
    the rate limit suppressed them (``events_suppressed``).
    """

    status: NetStatus
    bytes_out: NonNegativeInt = 0
    bytes_in: NonNegativeInt = 0
    connections_allowed: NonNegativeInt = 0
    connections_refused: NonNegativeInt = 0
    connections_active: NonNegativeInt = 0
    dns_answered: NonNegativeInt = 0
    dns_refused: NonNegativeInt = 0
    # Garbage or over the rate limit: not answered at all.
    dns_dropped: NonNegativeInt = 0
    events_suppressed: NonNegativeInt = 0


class ZoneMetricsData(_Record, frozen=True):
    """One zone's figures at ``sampled_at`` (unix seconds), side by side."""

    name: ZoneName
    state: ZoneState
    sampled_at: float
    vcpus: Vcpus
    memory_mib: ZoneMemoryMib
    # Host side, from libvirt; None while QEMU does not run.
    cpu_time_s: float | None = None
    host_rss_kib: int | None = None
    # Processes the zone runs for clients right now.
    execs_running: NonNegativeInt = 0
    guest: GuestMetrics | None = None
    # A networked zone's traffic as the host counted it (None: no network).
    net: NetMetrics | None = None


class NetRefusal(_Record, frozen=True, kw_only=True):
    """A connection or a name a zone's policy refused (``net_refused`` events).

    ``kind``: ``connect`` (destination not allowed), ``dns`` (name not
    allowed), ``rebinding`` (an allowed name's answer pointed into a refused
    range), ``sni`` (TLS SNI / HTTP Host not an allowed name pinned to the
    destination), ``limit`` (a per-zone bound). ``rule``: why, e.g.
    ``name-not-allowed``, ``rfc1918``, ``sni-mismatch``.
    ``suppressed_before``: refusals the rate limit kept off the stream since
    the last event.
    """

    kind: str
    destination: str = ""
    port: NonNegativeInt = 0
    protocol: str = ""
    name: str = ""
    rule: str = ""
    suppressed_before: NonNegativeInt = 0


class CallerInfo(_Record, frozen=True):
    """Who sent a request: ``SO_PEERCRED`` and ``/proc/<pid>/exe``, read when it connected."""

    uid: int
    gid: int
    pid: int
    # The caller's executable ("" when it could not be read).
    exe: str = ""


class ExecRecord(_Record, frozen=True):
    """One process run for a client, as the audit trail and the events keep it.

    No secrets: the environment by variable name only, nothing of stdin or
    output. argv is kept up to :data:`MAX_AUDIT_ARGV_CHARS` characters in all
    (``argv_truncated`` says when more was cut).
    """

    argv: list[str]
    cwd: str
    uid: int
    gid: int
    tty: bool
    stdin: bool
    env_names: list[str] = []
    argv_truncated: bool = False
    memory_limit_mib: int | None = None
    pids_limit: int | None = None
    # The image settings the request gave (None: the image's own): its user
    # by name or number and its entrypoint (bounded as argv is); an empty
    # argv runs the image's Cmd. cwd is the request's workdir when it gave one.
    user: str | None = None
    entrypoint: list[str] | None = None
    # The process in the zone, once it started.
    pid: int | None = None
    # How it ended (exec_ended and the audit line): as in ExecExit.
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    # The guest's figures (advisory).
    cpu_time_s: float | None = None
    memory_peak_kib: int | None = None
    # Host time from the request to its end.
    duration_s: float | None = None
    # Why it could not start, or why its end is unknown.
    error: str = ""


#: argv characters an audit record keeps, in all.
MAX_AUDIT_ARGV_CHARS = 16 * 1024

AuditOutcome = Literal["ok", "error", "denied"]


class AuditRecord(_Record, frozen=True):
    """One line of the audit trail: a request that changed or ran something.

    ``op`` is the request's type (``create_zone``, ``exec``, ...). ``outcome``
    is ``ok``, ``error`` (``error_code`` and ``error`` say which) or
    ``denied`` (``permission_denied``: the caller may not use zoned).
    """

    time: float
    op: str
    outcome: AuditOutcome
    caller: CallerInfo
    zone: str = ""
    zone_uuid: str = ""
    # The uid owning the zone, where zones have owners.
    owner_uid: int | None = None
    error_code: str = ""
    error: str = ""
    exec: ExecRecord | None = None
    # Quarantine: where its evidence went.
    bundle: str = ""


class Event(_Record, frozen=True):
    """Something that happened on the host; ``seq`` increases by one per event."""

    seq: NonNegativeInt
    time: float
    kind: EventKind
    # zone_state: the zone, its new and previous state, and why.
    zone: str = ""
    state: str = ""
    previous: str = ""
    reason: str = ""
    # cpu_online / cpu_offline: the host CPU.
    cpu: int | None = None
    # exec_started / exec_ended: the process (as its audit record has it),
    # and who asked for it.
    exec: ExecRecord | None = None
    caller: CallerInfo | None = None
    # net_refused: what was refused. (net_status: ``state`` is the network's
    # new status, ``reason`` why.)
    refused: NetRefusal | None = None


# ---------------------------------------------------------------------------
# Control socket: replies (server -> client)
# ---------------------------------------------------------------------------


class HelloReply(_Message, tag="hello_reply", frozen=True):
    id: RequestId
    version: int
    server: str


class HostInfoReply(_Message, tag="host_info_reply", frozen=True):
    id: RequestId
    host: HostInfoData


class ZoneReply(_Message, tag="zone_reply", frozen=True):
    """Reply to CreateZone, GetZone and DestroyZone."""

    id: RequestId
    zone: ZoneInfo


class ZoneListReply(_Message, tag="zone_list_reply", frozen=True):
    id: RequestId
    zones: list[ZoneInfo]


class EventReply(_Message, tag="event_reply", frozen=True):
    """One event of a WatchEvents stream."""

    id: RequestId
    event: Event


class LogChunk(_Message, tag="log_chunk", frozen=True):
    """A piece of a ConsoleLog stream: raw bytes, not necessarily whole lines or UTF-8."""

    id: RequestId
    data: Annotated[bytes, Meta(max_length=MAX_LOG_CHUNK)]


class StreamEnd(_Message, tag="stream_end", frozen=True):
    """The stream for request ``id`` is complete."""

    id: RequestId


class AuditReply(_Message, tag="audit_reply", frozen=True):
    """A batch of an AuditQuery stream (at most :data:`MAX_AUDIT_BATCH` records)."""

    id: RequestId
    records: list[AuditRecord]


class EvidenceFile(_Record, frozen=True):
    """One file of an evidence bundle, relative to the bundle's directory."""

    name: str
    size_bytes: NonNegativeInt
    sha256: Sha256Hex


class EvidenceBundle(_Record, frozen=True):
    """What a quarantine collected: a directory on the host, and its manifest.

    ``partial``: something could not be collected (``errors`` says what; a
    full disk, a memory dump that failed); the files listed are whole.
    """

    path: str
    size_bytes: NonNegativeInt
    partial: bool
    files: list[EvidenceFile]
    errors: list[str] = []


class QuarantineReply(_Message, tag="quarantine_reply", frozen=True):
    """Reply to QuarantineZone: the zone now (``quarantined``, or ``stopped``
    with ``destroy``) and its evidence."""

    id: RequestId
    zone: ZoneInfo
    bundle: EvidenceBundle


class ZoneNetReply(_Message, tag="zone_net_reply", frozen=True):
    """Reply to SetZoneNet: the zone as it is now, and how many open
    connections the new policy closed."""

    id: RequestId
    zone: ZoneInfo
    connections_closed: NonNegativeInt = 0


class ZoneMetricsReply(_Message, tag="zone_metrics_reply", frozen=True):
    id: RequestId
    metrics: ZoneMetricsData


class ExecStarted(_Message, tag="exec_started", frozen=True):
    """The process of request ``id`` runs, as ``pid`` in the zone."""

    id: RequestId
    pid: GuestId


class ExecOutput(_Message, tag="exec_output", frozen=True):
    """A piece of the process's stdout or stderr (raw bytes), in order per stream."""

    id: RequestId
    stream: OutputStream
    data: ExecChunk


class _ProcessExit(_Message, frozen=True, kw_only=True):
    """How a process ended: what the agent reports in :class:`AgentExecExit` and
    the daemon passes on in :class:`ExecExit` (:func:`exec_exit_reply`).

    A field added here reaches the client without another line of code. Its
    fields come after those of the message itself (msgspec orders keyword-only
    fields last), which keeps both messages' encodings as they were.
    """

    exit_code: Annotated[int, Meta(ge=0, le=255)] | None = None
    signal: Signal | None = None
    # A RunZone's timeout killed it (set by the daemon; the agent never does).
    timed_out: bool = False
    # The kernel's OOM killer killed a process of its cgroup (memory_limit_mib).
    oom_killed: bool = False
    # What the process and everything it started used, per its cgroup (the
    # guest's report: advisory); None where the guest could not tell.
    cpu_time_s: _Seconds | None = None
    memory_peak_kib: _GuestCount | None = None


class ExecExit(_ProcessExit, tag="exec_exit", frozen=True):
    """The process ended; the last message of its stream.

    Exactly one of ``exit_code`` and ``signal`` is set. A process that could
    not start ends with ``exit_code`` 127 (not found) or 126 (anything else),
    as in a shell, after its reason on stderr.
    """

    id: RequestId


class ImageProgress(_Message, tag="image_progress", frozen=True):
    """Where the import or pull of request ``id`` is (advisory). ``bytes_total``
    0: not known yet."""

    id: RequestId
    image: str
    phase: ImagePhase
    layers_done: NonNegativeInt = 0
    layers_total: NonNegativeInt = 0
    bytes_done: NonNegativeInt = 0
    bytes_total: NonNegativeInt = 0


class ImageReply(_Message, tag="image_reply", frozen=True):
    """Reply to InspectImage; the last message of a PullImage or ImportImage stream."""

    id: RequestId
    image: ImageInfo
    # Pull/import: False when the image was converted already (by this or another import).
    converted: bool = False


class ImageListReply(_Message, tag="image_list_reply", frozen=True):
    id: RequestId
    images: list[ImageInfo]


class ImageRemoveReply(_Message, tag="image_remove_reply", frozen=True):
    """Reply to RemoveImage and PruneImages."""

    id: RequestId
    untagged: list[str]
    removed: list[str]
    freed_bytes: NonNegativeInt


class ImageSizesReply(_Message, tag="image_sizes_reply", frozen=True):
    id: RequestId
    sizes: ImageStoreSizes


# ---------------------------------------------------------------------------
# Control socket: errors
# ---------------------------------------------------------------------------
# The codes are zoned.errors.ErrorCode; each ZonedError subclass carries one
# and zoned.errors.error_from_code() turns a received code back into it.


class PoolReply(_Message, tag="pool_reply", frozen=True):
    """Reply to SetPool and RemovePool: the pool as it is now."""

    id: RequestId
    pool: PoolInfo


class PoolListReply(_Message, tag="pool_list_reply", frozen=True):
    id: RequestId
    pools: list[PoolInfo]


class ErrorReply(_Message, tag="error_reply", frozen=True):
    """Request ``id`` failed; ends any stream it had started."""

    id: RequestId
    code: ErrorCode
    message: str


Reply: TypeAlias = (
    HelloReply
    | HostInfoReply
    | ZoneReply
    | ZoneListReply
    | EventReply
    | LogChunk
    | StreamEnd
    | ZoneMetricsReply
    | ExecStarted
    | ExecOutput
    | ExecExit
    | ImageProgress
    | ImageReply
    | ImageListReply
    | ImageRemoveReply
    | ImageSizesReply
    | ErrorReply
    | AuditReply
    | QuarantineReply
    | ZoneNetReply
    | PoolReply
    | PoolListReply
)


def error_reply(id: int, exc: ZonedError) -> ErrorReply:
    """The reply reporting ``exc`` to the caller of request ``id``."""
    message = exc.message
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    return ErrorReply(id=id, code=exc.code, message=message)


def negotiate_version(offered: Iterable[int]) -> int:
    """The highest version both sides speak; :class:`UnsupportedVersion` if none."""
    offered = list(offered)
    common = SUPPORTED_VERSIONS.intersection(offered)
    if not common:
        raise UnsupportedVersion(
            f"no common protocol version: the client offers {sorted(set(offered))},"
            f" this server speaks {sorted(SUPPORTED_VERSIONS)}"
        )
    return max(common)


# ---------------------------------------------------------------------------
# Agent channel (daemon <-> guest agent)
# ---------------------------------------------------------------------------
# Tags exec_* and file_* are reserved for workload execution and file
# transfer. Everything the agent sends is hostile input: every string is
# bounded printable ASCII (it reaches logs and terminals), every number finite
# and in range.

AGENT_PROTOCOL_VERSION = 1

_AgentToken = Annotated[str, Meta(max_length=64, pattern=r"^[!-~]{1,64}\Z")]


class AgentHello(_Message, tag="agent_hello", frozen=True):
    """The agent's first message, sent as soon as it runs."""

    version: Annotated[int, Meta(ge=1, le=_UINT32_MAX)]
    # The agent's name and build, e.g. "zoned-agent/0.1.0".
    agent: _AgentToken
    # uname -r of the guest kernel.
    kernel_release: _AgentToken
    # Seconds since the guest kernel started, when the agent said hello.
    boot_s: _Seconds
    pid: Annotated[int, Meta(ge=1, le=2**31 - 1)]


class Heartbeat(_Message, tag="heartbeat", frozen=True):
    """Host -> agent: are you alive? The agent answers with the same ``seq``."""

    seq: Annotated[int, Meta(ge=0, le=_INT64_MAX)]


class HeartbeatReply(_Message, _GuestFigures, tag="heartbeat_reply", frozen=True):
    """Agent -> host: alive, with guest-side metrics (self-reported, advisory)."""

    seq: Annotated[int, Meta(ge=0, le=_INT64_MAX)]


ExecId = Annotated[int, Meta(ge=1, le=_UINT32_MAX)]
# Printable text from the guest (it reaches logs and terminals), bounded.
_AgentText = Annotated[str, Meta(max_length=1024, pattern=r"^[ -~]*\Z")]


class AgentExecStart(_ExecFields, tag="agent_exec_start", frozen=True):
    """Host -> agent: start a process. The agent answers AgentExecStarted or
    AgentExecExit (with ``error`` when it could not start it).

    ``argv`` is never empty here (the daemon resolved the image's command);
    ``groups`` are the process's supplementary groups (from the image's
    ``/etc/group``).
    """

    exec_id: ExecId
    groups: Annotated[list[GuestId], Meta(max_length=MAX_GROUPS)] = []

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must not be empty: the program, then its arguments")
        super().__post_init__()


class AgentExecInput(_Message, tag="agent_exec_input", frozen=True):
    """Host -> agent: stdin bytes, within the input window; ``eof`` closes stdin."""

    exec_id: ExecId
    data: ExecChunk = b""
    eof: bool = False


class AgentExecCredit(_Message, tag="agent_exec_credit", frozen=True):
    """Host -> agent: the host consumed ``bytes`` of output; the agent may send as many more."""

    exec_id: ExecId
    bytes: Annotated[int, Meta(ge=1, le=EXEC_OUTPUT_WINDOW)]


class AgentExecSignal(_Message, tag="agent_exec_signal", frozen=True):
    """Host -> agent: send ``signal`` to the process (its process group)."""

    exec_id: ExecId
    signal: Signal


class AgentExecResize(_Message, tag="agent_exec_resize", frozen=True):
    """Host -> agent: set the process's terminal size (tty processes only)."""

    exec_id: ExecId
    rows: TermSize
    cols: TermSize


class AgentSetHostname(_Message, tag="agent_set_hostname", frozen=True):
    """Host -> agent: the zone's hostname is now ``hostname`` (a pool zone was
    acquired under that name): the agent's and the workloads' (their UTS
    namespace), before any process the host starts after it. Not answered;
    the agent reports a failure on its console."""

    hostname: ZoneName


class AgentExecStarted(_Message, tag="agent_exec_started", frozen=True):
    exec_id: ExecId
    pid: Annotated[int, Meta(ge=1, le=2**31 - 1)]


class AgentExecOutput(_Message, tag="agent_exec_output", frozen=True):
    """Agent -> host: output, never more in total than the host has credited."""

    exec_id: ExecId
    stream: OutputStream
    data: Annotated[bytes, Meta(min_length=1, max_length=MAX_EXEC_CHUNK)]


class AgentExecInputCredit(_Message, tag="agent_exec_input_credit", frozen=True):
    """Agent -> host: ``bytes`` of input were written to the process; send as many more."""

    exec_id: ExecId
    bytes: Annotated[int, Meta(ge=1, le=EXEC_INPUT_WINDOW)]


class AgentExecExit(_ProcessExit, tag="agent_exec_exit", frozen=True):
    """Agent -> host: the process ended (after all its output), or never started (``error``).

    A process that never started has ``error`` and neither ``exit_code`` nor
    ``signal``; ``errno`` is the error number of the step that failed, when
    one did (``ENOENT``: no such program, or directory).
    """

    exec_id: ExecId
    error: _AgentText = ""
    errno: Annotated[int, Meta(ge=1, le=4095)] | None = None


AgentToHost: TypeAlias = (
    AgentHello
    | HeartbeatReply
    | AgentExecStarted
    | AgentExecOutput
    | AgentExecInputCredit
    | AgentExecExit
)
HostToAgent: TypeAlias = (
    Heartbeat
    | AgentExecStart
    | AgentExecInput
    | AgentExecCredit
    | AgentExecSignal
    | AgentExecResize
    | AgentSetHostname
)

Message: TypeAlias = Request | Reply | AgentToHost | HostToAgent


# ---------------------------------------------------------------------------
# From the agent channel to the control socket
# ---------------------------------------------------------------------------
# What the agent reports and the daemon passes on is declared once (the
# shared bases above) and copied here by field name, never field by field.


def _shared(base: type[msgspec.Struct], value: msgspec.Struct) -> dict[str, Any]:
    return {name: getattr(value, name) for name in base.__struct_fields__}


def exec_exit_reply(id: int, end: AgentExecExit, *, timed_out: bool = False) -> ExecExit:
    """The client's :class:`ExecExit` for request ``id`` of a process that ran and ended.

    ``timed_out`` is the daemon's own word (the agent's is ignored).
    """
    fields = _shared(_ProcessExit, end)
    fields["timed_out"] = timed_out
    return ExecExit(id=id, **fields)


def guest_metrics(reply: HeartbeatReply, reported_at: float) -> GuestMetrics:
    """The guest's figures of ``reply``, as clients see them."""
    return GuestMetrics(reported_at=reported_at, **_shared(_GuestFigures, reply))


# ---------------------------------------------------------------------------
# Encoding and decoding
# ---------------------------------------------------------------------------

_ENCODER = msgspec.msgpack.Encoder()


def encode(msg: Message) -> bytes:
    """The msgpack payload of one message (no frame header)."""
    return _ENCODER.encode(msg)


def encode_frame(msg: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One whole frame: length header and payload.

    Raises :class:`FrameError` if the payload would exceed ``max_frame``: the
    peer would reject it and drop the connection, so it must not be sent.
    """
    payload = _ENCODER.encode(msg)
    if len(payload) > max_frame:
        raise FrameError(
            f"frame too large: {type(msg).__name__} encodes to {len(payload)} bytes,"
            f" the maximum is {max_frame} bytes"
        )
    return len(payload).to_bytes(FRAME_HEADER_SIZE, "big") + payload


_REQUEST_DECODER: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_REPLY_DECODER: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
_FROM_AGENT_DECODER: msgspec.msgpack.Decoder[AgentToHost] = msgspec.msgpack.Decoder(AgentToHost)
_TO_AGENT_DECODER: msgspec.msgpack.Decoder[HostToAgent] = msgspec.msgpack.Decoder(HostToAgent)


class _RequestIdOnly(msgspec.Struct):
    id: RequestId


_REQUEST_ID_DECODER = msgspec.msgpack.Decoder(_RequestIdOnly)


def _tags(union: object) -> str:
    members = get_args(union) or (union,)
    return ", ".join(str(member.__struct_config__.tag) for member in members)


# What msgspec raises on hostile bytes: DecodeError (and its ValidationError)
# for bad msgpack or a bad value, UnicodeDecodeError (a ValueError) for a
# string that is not UTF-8, RecursionError for absurdly nested containers.
_DECODE_FAILURES = (msgspec.DecodeError, ValueError, RecursionError)


def _invalid(what: str, tags: str, exc: Exception) -> InvalidRequest:
    if isinstance(exc, msgspec.ValidationError):
        detail = str(exc)
        if detail.endswith("`$.type`") or detail == "Object missing required field `type`":
            detail += f" (known types: {tags})"
        return InvalidRequest(f"invalid {what}: {detail}")
    # msgspec reports a string that is not UTF-8 as UnicodeDecodeError up to
    # 0.19 and as a DecodeError naming UTF-8 since: both get our own words.
    if isinstance(exc, UnicodeDecodeError) or (
        isinstance(exc, msgspec.DecodeError) and "utf-8" in str(exc).lower()
    ):
        return InvalidRequest(f"malformed {what}: a string is not valid UTF-8 ({exc})")
    if isinstance(exc, msgspec.DecodeError):
        return InvalidRequest(f"malformed {what}: not one msgpack message ({exc})")
    if isinstance(exc, RecursionError):
        return InvalidRequest(f"malformed {what}: containers nested too deeply")
    return InvalidRequest(f"malformed {what}: {exc}")


_REQUEST_TAGS = _tags(Request)
_REPLY_TAGS = _tags(Reply)
_FROM_AGENT_TAGS = _tags(AgentToHost)
_TO_AGENT_TAGS = _tags(HostToAgent)


def decode_request(payload: bytes) -> Request:
    """Decode and validate one client request; :class:`InvalidRequest` if it is not one."""
    try:
        return _REQUEST_DECODER.decode(payload)
    except _DECODE_FAILURES as exc:
        raise _invalid("request", _REQUEST_TAGS, exc) from None


def decode_reply(payload: bytes) -> Reply:
    """Decode and validate one server reply; :class:`InvalidRequest` if it is not one."""
    try:
        return _REPLY_DECODER.decode(payload)
    except _DECODE_FAILURES as exc:
        raise _invalid("reply", _REPLY_TAGS, exc) from None


def decode_from_agent(payload: bytes) -> AgentToHost:
    """Decode and validate one message from a (hostile) guest agent."""
    try:
        return _FROM_AGENT_DECODER.decode(payload)
    except _DECODE_FAILURES as exc:
        raise _invalid("agent message", _FROM_AGENT_TAGS, exc) from None


def decode_to_agent(payload: bytes) -> HostToAgent:
    """Decode and validate one message from the host, on the agent's side."""
    try:
        return _TO_AGENT_DECODER.decode(payload)
    except _DECODE_FAILURES as exc:
        raise _invalid("host message", _TO_AGENT_TAGS, exc) from None


def peek_request_id(payload: bytes) -> int | None:
    """The ``id`` of a request that failed to decode, when it can still be read."""
    try:
        return _REQUEST_ID_DECODER.decode(payload).id
    except _DECODE_FAILURES:
        return None
