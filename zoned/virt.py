"""Typed shell over libvirt-python: the only module in zoned that imports libvirt.

libvirt-python is untyped and blocking. This module gives the rest of the daemon
a small typed, trio-friendly surface:

- :func:`map_libvirt_error` is the one place where ``libvirt.libvirtError``
  becomes a :mod:`zoned.errors` exception. Every call below goes through it.
- :class:`EventLoopThread` runs libvirt's own event loop in one daemon thread:
  the only thread in zoned besides trio's and trio's worker threads.
- :class:`Hypervisor` is one libvirt connection. Its methods are async; each runs
  one blocking libvirt call sequence in ``trio.to_thread.run_sync`` behind the
  caller's ``CapacityLimiter``. Domain lifecycle events are forwarded into trio
  as :class:`DomainEvent` values; a lost connection is reported by
  :meth:`Hypervisor.wait_lost` and repaired by :meth:`Hypervisor.reconnect`.
- :func:`probe_accelerator` decides between KVM and TCG by booting a real
  kernel, because the existence of ``/dev/kvm`` proves nothing (see DESIGN.md).

Rules: sync helpers here never touch trio; async methods always checkpoint;
callers own timeouts (cancel scopes) except where a time window is part of a
function's meaning (the accelerator probe's boot window).
"""

from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, NoReturn, Self, TypeVar

import libvirt
import msgspec
import trio

from zoned.domain import add_static_label
from zoned.errors import Conflict, HypervisorError, NotFound, ZonedError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# --------------------------------------------------------------------------
# Typed values
# --------------------------------------------------------------------------

DomainRunState = Literal[
    "nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended"
]
LifecycleKind = Literal[
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "crashed",
    "pmsuspended",
]
Accelerator = Literal["kvm", "tcg"]
# libvirt's domain type for each accelerator.
VirtType = Literal["kvm", "qemu"]


class DomainEvent(msgspec.Struct, frozen=True):
    """One domain lifecycle event (``VIR_DOMAIN_EVENT_ID_LIFECYCLE``).

    ``detail`` is libvirt's detail for the kind, lower-cased (for ``stopped``:
    ``shutdown``, ``destroyed``, ``crashed``, ``failed``, ...), or
    ``unknown-<n>`` for a value this libvirt-python does not name.
    Events are hints that something changed; :meth:`Hypervisor.lookup` is the
    truth.
    """

    name: str
    uuid: str
    kind: LifecycleKind
    detail: str


class DomainState(msgspec.Struct, frozen=True):
    """libvirt's view of one domain at one moment.

    ``active`` means a QEMU process exists (running, paused, shutting down...).
    ``id`` is libvirt's run-time id, ``None`` while inactive. ``reason`` names
    why a shut-off or crashed domain is in that state (``destroyed``,
    ``shutdown``, ``crashed``, ``failed``, ``panicked``...), else is ``""``.
    """

    name: str
    uuid: str
    state: DomainRunState
    reason: str
    active: bool
    persistent: bool
    id: int | None


class DomainSummary(DomainState, frozen=True):
    """A domain found by :meth:`Hypervisor.list_domains`.

    ``metadata`` is the XML of the domain's ``<metadata>`` element in the
    namespace the caller asked for, or ``None`` if the domain has none. libvirt
    returns the element without its namespace (``<zone><name>a</name></zone>``).
    """

    metadata: str | None = None


class VcpuInfo(msgspec.Struct, frozen=True):
    """A running domain's vCPU as libvirt sees it (``virDomainGetVcpus``)."""

    number: int
    state: Literal["offline", "running", "blocked", "unknown"]
    cpu_time_ns: int
    # The host CPU the vCPU thread last ran on.
    host_cpu: int
    affinity: frozenset[int]


class DomainStats(msgspec.Struct, frozen=True):
    """CPU time and memory of one domain; run-time fields are ``None`` while inactive."""

    active: bool
    vcpus: int
    memory_kib: int
    max_memory_kib: int
    cpu_time_ns: int
    user_time_ns: int | None
    system_time_ns: int | None
    # Resident set size of the QEMU process, when the driver reports it.
    rss_kib: int | None


class BulkDomainStats(msgspec.Struct, frozen=True, kw_only=True):
    """One running domain's statistics from ``virConnectGetAllDomainStats``.

    Each figure is None when this libvirt or domain does not report it;
    block and interface figures are summed over the domain's disks and
    interfaces (absent when it has none).
    """

    name: str
    state: DomainRunState
    cpu_time_ns: int | None = None
    # Resident set size of the QEMU process.
    rss_kib: int | None = None
    block_read_bytes: int | None = None
    block_write_bytes: int | None = None
    block_read_requests: int | None = None
    block_write_requests: int | None = None
    interface_receive_bytes: int | None = None
    interface_transmit_bytes: int | None = None


class HypervisorVersion(msgspec.Struct, frozen=True):
    """Versions as dotted strings, e.g. libvirt ``9.0.0``, ``QEMU`` ``7.2.22``."""

    libvirt: str
    hypervisor_type: str
    hypervisor: str


# --------------------------------------------------------------------------
# The one place where libvirt errors are mapped
# --------------------------------------------------------------------------


def map_libvirt_error(exc: libvirt.libvirtError) -> ZonedError:
    """Translate a libvirt error into the zoned error family.

    - no such domain -> :class:`NotFound`
    - operation invalid in the domain's state (e.g. destroying a domain that is
      not running) -> :class:`Conflict`
    - defining a name that exists -> :class:`Conflict`
    - connection errors and everything else -> :class:`HypervisorError`
      carrying libvirt's message.
    """
    code = exc.get_error_code()
    message = str(exc.get_error_message() or exc)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFound(message)
    if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_DOM_EXIST):
        return Conflict(message)
    if code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in message:
        return Conflict(message)
    return HypervisorError(message)


def _guarded(fn: Callable[[Any], _T], conn: Any) -> _T:
    """Run ``fn(conn)`` in a worker thread, mapping libvirt errors."""
    try:
        return fn(conn)
    except libvirt.libvirtError as exc:
        raise map_libvirt_error(exc) from exc


# --------------------------------------------------------------------------
# libvirt's event loop thread
# --------------------------------------------------------------------------


class EventLoopThread:
    """libvirt's default event loop, run in one daemon thread for the whole process.

    libvirt needs an event loop implementation registered *before the first
    connection is opened*: the remote driver uses it for keepalive pings and for
    receiving asynchronous events, and every driver (including
    ``test:///default``) dispatches domain event callbacks from it. We register
    libvirt's own poll-based implementation and run ``virEventRunDefaultImpl()``
    in a loop in one thread; libvirt callbacks therefore always run in that
    thread and hand their results to trio with ``trio.from_thread``.

    The thread is a daemon thread and is never stopped: libvirt offers no way to
    unregister its event implementation, and the loop holds no state worth
    flushing at exit. :meth:`ensure_running` is idempotent and thread-safe;
    :meth:`Hypervisor.connect` calls it. It also silences libvirt's default
    error handler, which would print every (already mapped) error to stderr.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _thread: ClassVar[threading.Thread | None] = None

    @classmethod
    def ensure_running(cls) -> None:
        with cls._lock:
            if cls._thread is not None:
                return
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            if libvirt.virEventRegisterDefaultImpl() < 0:
                raise HypervisorError("cannot register libvirt's default event loop")
            thread = threading.Thread(target=cls._run, name="libvirt-events", daemon=True)
            thread.start()
            cls._thread = thread

    @staticmethod
    def _run() -> NoReturn:
        while True:
            if libvirt.virEventRunDefaultImpl() < 0:
                # Not expected; keep the loop alive rather than losing every
                # event and keepalive for the rest of the process.
                log.error("libvirt event loop iteration failed")
                time.sleep(0.1)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


# --------------------------------------------------------------------------
# Tables from libvirt's numbers to names
# --------------------------------------------------------------------------

_RUN_STATES: Final[dict[int, DomainRunState]] = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

_STATE_REASONS: Final[dict[int, dict[int, str]]] = {
    libvirt.VIR_DOMAIN_SHUTOFF: {
        libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
        libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
        libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
        libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
        libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
        libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
        libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from_snapshot",
        libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
    },
    libvirt.VIR_DOMAIN_CRASHED: {
        libvirt.VIR_DOMAIN_CRASHED_UNKNOWN: "unknown",
        libvirt.VIR_DOMAIN_CRASHED_PANICKED: "panicked",
    },
}

_LIFECYCLE_KINDS: Final[dict[int, LifecycleKind]] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


def _detail_table(kind: str) -> dict[int, str]:
    # libvirt names every detail VIR_DOMAIN_EVENT_<KIND>_<DETAIL>; reading the
    # table from the bindings keeps it in step with the installed libvirt.
    prefix = f"VIR_DOMAIN_EVENT_{kind.upper()}_"
    return {
        int(getattr(libvirt, attr)): attr.removeprefix(prefix).lower()
        for attr in dir(libvirt)
        if attr.startswith(prefix) and not attr.endswith("_LAST")
    }


_LIFECYCLE_DETAILS: Final[dict[LifecycleKind, dict[int, str]]] = {
    kind: _detail_table(kind) for kind in _LIFECYCLE_KINDS.values()
}

_VCPU_STATES: Final[dict[int, Literal["offline", "running", "blocked"]]] = {
    libvirt.VIR_VCPU_OFFLINE: "offline",
    libvirt.VIR_VCPU_RUNNING: "running",
    libvirt.VIR_VCPU_BLOCKED: "blocked",
}

_CLOSE_REASONS: Final[dict[int, str]] = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


def lifecycle_event(name: str, uuid: str, event: int, detail: int) -> DomainEvent | None:
    """Build a :class:`DomainEvent` from libvirt's numbers; ``None`` for an unknown kind."""
    kind = _LIFECYCLE_KINDS.get(event)
    if kind is None:
        return None
    detail_name = _LIFECYCLE_DETAILS[kind].get(detail, f"unknown-{detail}")
    return DomainEvent(name=name, uuid=uuid, kind=kind, detail=detail_name)


def _format_version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _cpu_set(cpumap: Iterable[bool]) -> frozenset[int]:
    return frozenset(cpu for cpu, usable in enumerate(cpumap) if usable)


# --------------------------------------------------------------------------
# Blocking operations, run in worker threads (conn is a virConnect)
# --------------------------------------------------------------------------

# Undefine must not leave a domain behind because of metadata it happens to
# have; both flags are understood by the qemu and test drivers.
_UNDEFINE_FLAGS: Final = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)


def _state_of(dom: Any) -> DomainState:
    state, reason = dom.state()
    active = bool(dom.isActive())
    dom_id = int(dom.ID())
    return DomainState(
        name=str(dom.name()),
        uuid=str(dom.UUIDString()),
        state=_RUN_STATES.get(state, "nostate"),
        reason=_STATE_REASONS.get(state, {}).get(reason, ""),
        active=active,
        persistent=bool(dom.isPersistent()),
        id=dom_id if active and dom_id >= 0 else None,
    )


def _summary_of(dom: Any, metadata_uri: str | None) -> DomainSummary:
    state = _state_of(dom)
    metadata: str | None = None
    if metadata_uri is not None:
        try:
            metadata = str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata_uri, 0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                raise
    return DomainSummary(**msgspec.structs.asdict(state), metadata=metadata)


def _list_domains(conn: Any, prefix: str, metadata_uri: str | None) -> list[DomainSummary]:
    found = []
    for dom in conn.listAllDomains(0):
        if not str(dom.name()).startswith(prefix):
            continue
        try:
            found.append(_summary_of(dom, metadata_uri))
        except libvirt.libvirtError as exc:
            # Undefined between listing and asking: it is simply not there.
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return sorted(found, key=lambda summary: summary.name)


def _lookup(conn: Any, name: str) -> DomainState | None:
    try:
        return _state_of(conn.lookupByName(name))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _start(conn: Any, name: str) -> DomainState:
    dom = conn.lookupByName(name)
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        # qemu says "operation invalid", the test driver "internal error":
        # starting a running domain is a conflict either way.
        if dom.isActive():
            raise Conflict(f"domain '{name}' is already running") from exc
        raise
    return _state_of(dom)


def _destroy(conn: Any, name: str, not_running_ok: bool) -> None:
    dom = conn.lookupByName(name)
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if not_running_ok and exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
            return
        raise


# Errors that mean "already done" while removing a domain: a transient domain
# vanishes once destroyed, and another caller may stop or undefine it between
# our question and our action.
_ALREADY_GONE: Final = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


def _remove(conn: Any, name: str) -> bool:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in _ALREADY_GONE:
            raise
    try:
        if dom.isPersistent():
            dom.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in _ALREADY_GONE:
            raise
    return True


def _vcpus(conn: Any, name: str) -> list[VcpuInfo]:
    infos, cpumaps = conn.lookupByName(name).vcpus()
    return [
        VcpuInfo(
            number=int(number),
            state=_VCPU_STATES.get(state, "unknown"),
            cpu_time_ns=int(cpu_time),
            host_cpu=int(host_cpu),
            affinity=_cpu_set(cpumap),
        )
        for (number, state, cpu_time, host_cpu), cpumap in zip(infos, cpumaps, strict=True)
    ]


def _host_cpumap(conn: Any, cpus: Iterable[int]) -> tuple[bool, ...]:
    host_cpus, _map, _online = conn.getCPUMap()
    wanted = set(cpus)
    unknown = wanted - set(range(int(host_cpus)))
    if unknown:
        raise Conflict(f"host has no CPUs {sorted(unknown)}")
    return tuple(cpu in wanted for cpu in range(int(host_cpus)))


def _stats(conn: Any, name: str) -> DomainStats:
    dom = conn.lookupByName(name)
    _state, max_kib, kib, vcpus, cpu_time = dom.info()
    active = bool(dom.isActive())
    user_ns: int | None = None
    system_ns: int | None = None
    rss_kib: int | None = None
    if active:
        totals = dom.getCPUStats(True)[0]
        # The cgroup's figure, in ns (info()'s is in clock ticks): the one
        # virConnectGetAllDomainStats reports too, so that both agree.
        cpu_time = int(totals.get("cpu_time", cpu_time))
        user_ns = int(totals["user_time"]) if "user_time" in totals else None
        system_ns = int(totals["system_time"]) if "system_time" in totals else None
        try:
            memory = dom.memoryStats()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            memory = {}
        rss_kib = int(memory["rss"]) if "rss" in memory else None
    return DomainStats(
        active=active,
        vcpus=int(vcpus),
        memory_kib=int(kib),
        max_memory_kib=int(max_kib),
        cpu_time_ns=int(cpu_time),
        user_time_ns=user_ns,
        system_time_ns=system_ns,
        rss_kib=rss_kib,
    )


_BULK_STATS: Final = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)


def _summed(record: dict[str, Any], kind: str, field: str) -> int | None:
    count = record.get(f"{kind}.count")
    if not isinstance(count, int):
        return None
    values = [record.get(f"{kind}.{index}.{field}") for index in range(count)]
    numbers = [int(value) for value in values if isinstance(value, int)]
    return sum(numbers) if numbers else None


def _bulk_stats(conn: Any, prefix: str) -> list[BulkDomainStats]:
    found = []
    for dom, record in conn.getAllDomainStats(
        _BULK_STATS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    ):
        name = str(dom.name())
        if not name.startswith(prefix):
            continue
        cpu = record.get("cpu.time")
        rss = record.get("balloon.rss")
        found.append(
            BulkDomainStats(
                name=name,
                state=_RUN_STATES.get(int(record.get("state.state", 0)), "nostate"),
                cpu_time_ns=int(cpu) if isinstance(cpu, int) else None,
                rss_kib=int(rss) if isinstance(rss, int) else None,
                block_read_bytes=_summed(record, "block", "rd.bytes"),
                block_write_bytes=_summed(record, "block", "wr.bytes"),
                block_read_requests=_summed(record, "block", "rd.reqs"),
                block_write_requests=_summed(record, "block", "wr.reqs"),
                interface_receive_bytes=_summed(record, "net", "rx.bytes"),
                interface_transmit_bytes=_summed(record, "net", "tx.bytes"),
            )
        )
    return found


def _version(conn: Any) -> HypervisorVersion:
    return HypervisorVersion(
        libvirt=_format_version(int(conn.getLibVersion())),
        hypervisor_type=str(conn.getType()),
        hypervisor=_format_version(int(conn.getVersion())),
    )


#: Where qemu:///system's libvirtd writes each running domain's QEMU pid.
QEMU_PID_DIR: Final = Path("/run/libvirt/qemu")


def qemu_pid_of(name: str, pid_dir: Path = QEMU_PID_DIR) -> int | None:
    """The pid libvirtd recorded for domain ``name``, if that process is its QEMU.

    The pid file may be stale (the domain stopped): the process is checked to
    be a QEMU started for this guest (``-name guest=<name>,...``).
    """
    try:
        pid = int((pid_dir / f"{name}.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    guest = f"guest={name},".encode()
    return pid if any(arg.startswith(guest) for arg in argv) else None


# --------------------------------------------------------------------------
# Reconnection policy
# --------------------------------------------------------------------------


def backoff_delays(
    first: float = 0.5, maximum: float = 10.0, factor: float = 2.0
) -> Iterator[float]:
    """Delays between reconnection attempts: 0.5, 1, 2, 4, 8, 10, 10, ... seconds.

    Infinite; the caller decides when to give up (by cancelling).
    """
    delay = first
    while True:
        yield min(delay, maximum)
        delay = min(delay * factor, maximum)


# --------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------

# Suggested buffer for the events channel. Events are dropped (and logged)
# when the buffer is full; see Hypervisor.
EVENT_BUFFER: Final = 1024


def open_event_channel() -> tuple[
    trio.MemorySendChannel[DomainEvent], trio.MemoryReceiveChannel[DomainEvent]
]:
    """A channel for :meth:`Hypervisor.connect` with :data:`EVENT_BUFFER` slots."""
    return trio.open_memory_channel[DomainEvent](EVENT_BUFFER)


class _Link:
    """One open virConnect and the callbacks registered on it."""

    def __init__(self, conn: Any, generation: int) -> None:
        self.conn = conn
        self.generation = generation
        self.lifecycle_id: int | None = None
        self.close_registered = False


class _OpenAttempt:
    """Hand-over between a connecting worker thread and a caller who may give up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.link: _Link | None = None


class Hypervisor:
    """One libvirt connection, used from trio.

    Every method runs its blocking libvirt calls in one
    ``trio.to_thread.run_sync`` call behind the limiter given to
    :meth:`connect`, and raises only :mod:`zoned.errors` exceptions
    (:class:`NotFound`, :class:`Conflict`, :class:`HypervisorError`). Those calls
    are not abandoned on cancellation: libvirt cannot interrupt them, and
    keepalive bounds how long a dead daemon can hold one. Opening a connection
    is the exception (see :meth:`connect`).

    Events: lifecycle events of every domain on the connection are sent to the
    ``events`` channel with ``send_nowait`` from libvirt's event thread through
    ``trio.from_thread.run_sync``. If the channel is full or closed the event is
    dropped with a log message instead: libvirt's event thread must never raise
    or wait on the daemon, and an event is only a hint to look again (after a
    reconnect the caller resynchronises with :meth:`list_domains` anyway). Use a
    buffer of :data:`EVENT_BUFFER` (see :func:`open_event_channel`).

    Connection loss: libvirt's close callback (EOF, keepalive timeout, error)
    marks the connection lost; :meth:`wait_lost` returns then, and calls fail
    with :class:`HypervisorError` until :meth:`reconnect` succeeds.
    """

    def __init__(
        self,
        uri: str,
        limiter: trio.CapacityLimiter,
        events: trio.MemorySendChannel[DomainEvent],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        # Use Hypervisor.connect(); this only stores its arguments.
        self._uri = uri
        self._limiter = limiter
        self._events = events
        self._token = token
        self._link: _Link | None = None
        self._generation = 0
        self._lost = trio.Event()
        self._lost_reason: str | None = None
        self._closed = False

    # ---- opening and closing ----

    @classmethod
    async def connect(
        cls,
        uri: str,
        limiter: trio.CapacityLimiter,
        events: trio.MemorySendChannel[DomainEvent],
    ) -> Hypervisor:
        """Open ``uri`` and subscribe to lifecycle and close events.

        The first connection to a fresh qemu:///system takes seconds while
        libvirt probes QEMU. A hung libvirtd makes this wait forever; it is
        cancellable (the worker thread is abandoned and closes the connection
        if it ever gets one).
        """
        hv = cls(uri, limiter, events, trio.lowlevel.current_trio_token())
        await hv._open()
        return hv

    async def _open(self) -> None:
        EventLoopThread.ensure_running()
        # Fresh loss state before opening: the new connection's close callback
        # may already fire while we wait for the worker thread.
        self._generation += 1
        self._lost = trio.Event()
        self._lost_reason = None
        # virConnectOpen has no timeout and no keepalive yet: against a hung
        # libvirtd it blocks forever. It is the one call we abandon on
        # cancellation, so that a daemon told to stop can stop.
        attempt = _OpenAttempt()
        try:
            self._link = await trio.to_thread.run_sync(
                self._open_link,
                self._generation,
                attempt,
                abandon_on_cancel=True,
                limiter=self._limiter,
            )
        except trio.Cancelled:
            with attempt.lock:
                attempt.abandoned = True
                finished, attempt.link = attempt.link, None
            if finished is not None:
                # It completed just as we gave up on it.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._close_link, finished)
            raise

    def _open_link(self, generation: int, attempt: _OpenAttempt) -> _Link:
        link = self._open_link_blocking(generation)
        with attempt.lock:
            if not attempt.abandoned:
                attempt.link = link
                return link
        self._close_link(link)
        raise HypervisorError("connection attempt abandoned")

    def _open_link_blocking(self, generation: int) -> _Link:
        try:
            conn = libvirt.open(self._uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot connect to {self._uri}: {exc.get_error_message() or exc}"
            ) from exc
        link = _Link(conn, generation)
        try:
            link.lifecycle_id = int(
                conn.domainEventRegisterAny(
                    None,
                    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    self._on_lifecycle,
                    generation,
                )
            )
            conn.registerCloseCallback(self._on_close, generation)
            link.close_registered = True
            try:
                # Notice a hung or vanished libvirtd within ~20 s.
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError as exc:
                # In-process drivers (test:///) have no keepalive to set.
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
        except libvirt.libvirtError as exc:
            self._close_link(link)
            raise map_libvirt_error(exc) from exc
        return link

    @staticmethod
    def _close_link(link: _Link) -> None:
        # Best effort: on a lost connection each step may fail.
        try:
            if link.lifecycle_id is not None:
                link.conn.domainEventDeregisterAny(link.lifecycle_id)
            if link.close_registered:
                link.conn.unregisterCloseCallback()
        except libvirt.libvirtError as exc:
            log.debug("deregistering libvirt callbacks: %s", exc)
        try:
            link.conn.close()
        except libvirt.libvirtError as exc:
            log.debug("closing libvirt connection: %s", exc)

    async def close(self) -> None:
        """Close the connection; further calls raise :class:`HypervisorError`."""
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            await trio.to_thread.run_sync(self._close_link, link, limiter=self._limiter)
        else:
            await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.close()

    @property
    def uri(self) -> str:
        return self._uri

    # ---- connection loss and reconnection ----

    async def wait_lost(self) -> str:
        """Wait until libvirt reports the connection closed; return why.

        The reason is ``eof``, ``keepalive``, ``error`` or ``client``.
        """
        await self._lost.wait()
        return self._lost_reason or "unknown"

    async def reconnect(self, delays: Iterable[float] | None = None) -> None:
        """Replace the connection, retrying with :func:`backoff_delays` until it works.

        Never gives up by itself: bound it with a cancel scope. After it returns
        the caller must resynchronise with :meth:`list_domains`, because events
        were missed while disconnected.
        """
        if self._closed:
            raise HypervisorError("connection was closed")
        old, self._link = self._link, None
        if old is not None:
            await trio.to_thread.run_sync(self._close_link, old, limiter=self._limiter)
        for attempt, delay in enumerate(backoff_delays() if delays is None else delays, 1):
            try:
                await self._open()
            except HypervisorError as exc:
                log.warning(
                    "reconnecting to %s (attempt %d) failed: %s; retrying in %.1f s",
                    self._uri,
                    attempt,
                    exc.message,
                    delay,
                )
                await trio.sleep(delay)
            else:
                log.info("reconnected to %s", self._uri)
                return
        raise HypervisorError(f"could not reconnect to {self._uri}")

    async def keep_connected(
        self, on_lost: Callable[[str], None], on_reconnect: Callable[[], Awaitable[None]]
    ) -> NoReturn:
        """Forever: wait for loss and tell ``on_lost(reason)``, reconnect, then
        await ``on_reconnect()`` (the caller's resynchronisation)."""
        while True:
            reason = await self.wait_lost()
            log.warning("lost libvirt connection to %s (%s); reconnecting", self._uri, reason)
            on_lost(reason)
            await self.reconnect()
            await on_reconnect()

    # ---- callbacks: run in libvirt's event thread, must never raise ----

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, generation: int) -> None:
        try:
            domain_event = lifecycle_event(str(dom.name()), str(dom.UUIDString()), event, detail)
            if domain_event is not None:
                self._to_trio(self._deliver_event, generation, domain_event)
        except BaseException:
            log.exception("dropping a libvirt lifecycle event")

    def _on_close(self, _conn: Any, reason: int, generation: int) -> None:
        try:
            self._to_trio(self._mark_lost, generation, _CLOSE_REASONS.get(reason, str(reason)))
        except BaseException:
            log.exception("handling libvirt connection close")

    def _to_trio(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            log.debug("trio has finished; dropping libvirt callback %s", fn.__name__)

    # ---- their trio halves ----

    def _deliver_event(self, generation: int, event: DomainEvent) -> None:
        if generation != self._generation:
            return  # from a connection being replaced
        try:
            self._events.send_nowait(event)
        except trio.WouldBlock:
            log.warning("domain event buffer full; dropped %s", event)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            log.debug("domain event channel closed; dropped %s", event)

    def _mark_lost(self, generation: int, reason: str) -> None:
        if generation != self._generation or self._closed:
            return  # an old connection, replaced or closed on purpose
        self._lost_reason = reason
        self._lost.set()

    # ---- calls ----

    async def _call(self, fn: Callable[[Any], _T]) -> _T:
        link = self._link
        if link is None:
            await trio.lowlevel.checkpoint()
            raise HypervisorError(f"not connected to {self._uri}")
        return await trio.to_thread.run_sync(_guarded, fn, link.conn, limiter=self._limiter)

    async def define(self, xml: str) -> DomainState:
        """Define a persistent domain; :class:`Conflict` if the name exists."""
        return await self._call(lambda conn: _state_of(conn.defineXML(xml)))

    async def create_transient(
        self, xml: str, *, autodestroy: bool = False, paused: bool = False
    ) -> DomainState:
        """Create and start a transient domain (gone once stopped).

        With ``autodestroy`` libvirt also destroys it when this connection
        closes, so a crashed daemon leaves nothing behind (qemu driver only).
        With ``paused`` QEMU runs but its vCPUs wait for :meth:`resume`
        (libvirt's test driver cannot start paused; it has no QEMU to hold back,
        so it starts running).
        """
        flags = libvirt.VIR_DOMAIN_START_AUTODESTROY if autodestroy else 0
        if paused and not self._uri.startswith("test:"):
            flags |= libvirt.VIR_DOMAIN_START_PAUSED
        return await self._call(lambda conn: _state_of(conn.createXML(xml, flags)))

    async def resume(self, name: str) -> None:
        """Let a paused domain's vCPUs run (a running one is left as it is)."""

        def resume(conn: Any) -> None:
            dom = conn.lookupByName(name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

        await self._call(resume)

    async def start(self, name: str) -> DomainState:
        """Start a defined domain; :class:`Conflict` if it is running."""
        return await self._call(lambda conn: _start(conn, name))

    async def destroy(self, name: str, *, not_running_ok: bool = False) -> None:
        """Hard-stop a domain (kill QEMU).

        A domain that is not running is a :class:`Conflict` unless
        ``not_running_ok``; a missing domain is :class:`NotFound`.
        """
        await self._call(lambda conn: _destroy(conn, name, not_running_ok))

    async def undefine(self, name: str) -> None:
        """Remove a persistent domain's definition.

        A running domain keeps running as a transient one (libvirt semantics);
        destroy it first to get rid of it.
        """
        await self._call(lambda conn: conn.lookupByName(name).undefineFlags(_UNDEFINE_FLAGS))

    async def remove(self, name: str) -> bool:
        """Destroy if running and undefine if persistent; ``False`` if it did not exist."""
        return await self._call(lambda conn: _remove(conn, name))

    async def lookup(self, name: str) -> DomainState | None:
        """The domain's state, or ``None`` if there is no such domain."""
        return await self._call(lambda conn: _lookup(conn, name))

    async def xml(self, name: str, *, inactive: bool = False) -> str:
        """The domain's XML: live if running, or the persistent config if ``inactive``."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self._call(lambda conn: str(conn.lookupByName(name).XMLDesc(flags)))

    async def list_domains(
        self, prefix: str = "zoned-", *, metadata_uri: str | None = None
    ) -> list[DomainSummary]:
        """All domains (active or not) whose name starts with ``prefix``, by name.

        With ``metadata_uri``, each summary carries the domain's
        ``<metadata>`` element in that namespace (``None`` if absent).
        """
        return await self._call(lambda conn: _list_domains(conn, prefix, metadata_uri))

    async def set_metadata(self, name: str, element_xml: str, prefix: str, uri: str) -> None:
        """Replace the running domain's ``<metadata>`` element in namespace ``uri``."""

        def update(conn: Any) -> None:
            conn.lookupByName(name).setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                element_xml,
                prefix,
                uri,
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )

        await self._call(update)

    async def vcpus(self, name: str) -> list[VcpuInfo]:
        """A running domain's vCPUs: state, CPU time, host CPU, affinity."""
        return await self._call(lambda conn: _vcpus(conn, name))

    async def pin_vcpu(self, name: str, vcpu: int, cpus: Iterable[int]) -> None:
        """Pin one vCPU to ``cpus`` (live if running, else in the config)."""
        wanted = frozenset(cpus)
        await self._call(
            lambda conn: conn.lookupByName(name).pinVcpuFlags(
                vcpu, _host_cpumap(conn, wanted), libvirt.VIR_DOMAIN_AFFECT_CURRENT
            )
        )

    async def pin_emulator(self, name: str, cpus: Iterable[int]) -> None:
        """Pin the emulator threads to ``cpus`` (live if running, else in the config)."""
        wanted = frozenset(cpus)
        await self._call(
            lambda conn: conn.lookupByName(name).pinEmulator(
                _host_cpumap(conn, wanted), libvirt.VIR_DOMAIN_AFFECT_CURRENT
            )
        )

    async def stats(self, name: str) -> DomainStats:
        """CPU time and memory of the domain."""
        return await self._call(lambda conn: _stats(conn, name))

    async def set_memory_hard_limit(self, name: str, mib: int) -> None:
        """Cap the running domain's QEMU (its memory cgroup) at ``mib`` MiB.

        libvirt's memtune ``hard_limit``, set live: at define time it fails
        on a host where libvirtd lacks CAP_SYS_RESOURCE (docs/host-notes.md).
        """
        await self._call(
            lambda conn: conn.lookupByName(name).setMemoryParameters(
                {"hard_limit": mib * 1024}, libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
        )

    async def qemu_pid(self, name: str) -> int | None:
        """The pid of the running domain's QEMU; None where the driver has none
        (``test:///``) or libvirt keeps it elsewhere than qemu:///system does."""
        if not self._uri.startswith("qemu:///system"):
            await trio.lowlevel.checkpoint()
            return None
        return await trio.to_thread.run_sync(qemu_pid_of, name)

    async def all_domain_stats(self, prefix: str) -> list[BulkDomainStats]:
        """Statistics of every running domain whose name starts with ``prefix``, in one call."""
        return await self._call(lambda conn: _bulk_stats(conn, prefix))

    async def suspend(self, name: str) -> None:
        """Pause the domain's vCPUs (it keeps its memory and devices)."""
        await self._call(lambda conn: conn.lookupByName(name).suspend())

    async def dump_memory(self, name: str, path: Path) -> None:
        """Write the guest's memory to ``path`` as an ELF core (``virDomainCoreDumpWithFormat``,
        memory only; libvirtd, root, writes the file, mode 0600). The domain keeps its
        run state (a paused one stays paused)."""
        await self._call(
            lambda conn: conn.lookupByName(name).coreDumpWithFormat(
                str(path), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY
            )
        )

    async def capabilities(self) -> str:
        """The host capabilities XML (``virConnectGetCapabilities``)."""
        return await self._call(lambda conn: str(conn.getCapabilities()))

    async def version(self) -> HypervisorVersion:
        return await self._call(_version)


# --------------------------------------------------------------------------
# Accelerator probe
# --------------------------------------------------------------------------

# "_" cannot occur in a zone name, and the prefix is not the zones' "zoned-",
# so the probe never collides with a zone's domain.
PROBE_DOMAIN_NAME: Final = "zoned_probe-kvm"


def probe_domain_name(domain_prefix: str) -> str:
    """The probe domain of the daemon whose zones are named ``<domain_prefix><zone>``."""
    return domain_prefix.removesuffix("-") + "_probe-kvm"


# How long a KVM guest kernel gets to reach init. A working KVM boot takes
# well under a second; this window is what "KVM works" means, not a timeout.
PROBE_BOOT_WINDOW_S: Final = 10.0
PROBE_MEMORY_MIB: Final = 128
_PROBE_POLL_S: Final = 0.2

# Console lines that only a kernel that ran through its initcalls prints
# (the last two when there is no usable initramfs).
LATE_BOOT_MARKERS: Final = (
    b"Run /init as init process",
    b"Freeing unused kernel image",
    b"VFS: Unable to mount root fs",
    b"No working init found",
)


def console_shows_late_boot(console: bytes) -> bool:
    """Did the kernel whose serial console this is get as far as starting init?"""
    return any(marker in console for marker in LATE_BOOT_MARKERS)


def render_probe_xml(
    *,
    name: str,
    virt_type: VirtType,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    console_log: Path,
    qemu_uid: int | None = None,
) -> str:
    """Domain XML of a minimal q35 probe guest: 1 vCPU, direct kernel boot, serial to a file.

    q35 rather than microvm: the probe must not depend on microvm's quirks
    (tsc_early_khz, a console without an IRQ); it asks only whether the
    accelerator runs a guest kernel. With ``qemu_uid`` QEMU runs as that uid
    and gid, as zones do, and libvirt relabels nothing (:mod:`zoned.domain`):
    the probe then also finds out whether a zone's QEMU may open ``/dev/kvm``.
    """
    # The probe reads the console, so it must go to ttyS0 and carry the
    # KERN_INFO lines it looks for, whatever loglevel/quiet the caller's
    # (zone) command line sets: a later loglevel= wins.
    args = cmdline.split()
    if "console=ttyS0" not in args:
        args.append("console=ttyS0")
    args.append("loglevel=7")
    cmdline = " ".join(args)
    domain = ET.Element("domain", type=virt_type)
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = str(PROBE_MEMORY_MIB)
    ET.SubElement(domain, "vcpu").text = "1"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_element, "kernel").text = str(kernel)
    if initrd is not None:
        ET.SubElement(os_element, "initrd").text = str(initrd)
    ET.SubElement(os_element, "cmdline").text = cmdline
    ET.SubElement(ET.SubElement(domain, "features"), "acpi")
    ET.SubElement(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    devices = ET.SubElement(domain, "devices")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console_log), append="off")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    if qemu_uid is not None:
        add_static_label(domain, qemu_uid)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


async def boot_reaches_init(
    hv: Hypervisor,
    *,
    name: str,
    virt_type: VirtType,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    workdir: Path,
    qemu_uid: int | None = None,
) -> bool:
    """Boot a throw-away guest and report whether its kernel got as far as init.

    Returns ``True`` as soon as the console shows a late boot message, ``False``
    if the domain cannot start or stops first (the console log stays in
    ``workdir`` as ``<name>.console.log``); raises :class:`HypervisorError` if
    libvirt itself fails. Waits as long as the guest runs:
    bound it with a cancel scope. The domain (transient, autodestroyed with the
    connection) is removed on every exit, also on cancellation; a leftover of
    the same name from an earlier run is removed first.
    """
    console_log = workdir / f"{name}.console.log"
    xml = render_probe_xml(
        name=name,
        virt_type=virt_type,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        console_log=console_log,
        qemu_uid=qemu_uid,
    )
    await hv.remove(name)
    try:
        try:
            await hv.create_transient(xml, autodestroy=True)
        except HypervisorError as exc:
            # Only the domain's failure is an answer; a failing connection
            # must not be cached as "this accelerator does not work".
            await hv.version()
            log.info("probe domain %s (%s) did not start: %s", name, virt_type, exc.message)
            return False
        log_file = trio.Path(console_log)
        while True:
            state = await hv.lookup(name)
            console = await log_file.read_bytes() if await log_file.exists() else b""
            if console_shows_late_boot(console):
                return True
            if state is None or not state.active:
                return False
            await trio.sleep(_PROBE_POLL_S)
    finally:
        with trio.CancelScope(shield=True):
            await hv.remove(name)


async def probe_accelerator(
    hv: Hypervisor,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    workdir: Path,
    *,
    name: str = PROBE_DOMAIN_NAME,
    qemu_uid: int | None = None,
) -> Accelerator:
    """``"kvm"`` if a KVM guest reaches init within :data:`PROBE_BOOT_WINDOW_S`, else ``"tcg"``.

    Boots ``kernel`` (with ``initrd`` if given; without one the kernel's
    "cannot mount root" panic also counts as reaching init) in a 1-vCPU q35
    domain of type ``kvm``, its console in ``workdir``. Takes up to the boot
    window; the result describes the host, so the caller may cache it. On a
    nested PVM ``/dev/kvm`` like this machine's, guest kernels do not run and
    the answer is ``"tcg"``.
    """
    with trio.move_on_after(PROBE_BOOT_WINDOW_S):
        if await boot_reaches_init(
            hv,
            name=name,
            virt_type="kvm",
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            workdir=workdir,
            qemu_uid=qemu_uid,
        ):
            return "kvm"
    return "tcg"
