"""The guest agent's entry point: PID 1 of a zone.

The boot image's ``/init`` (written by :mod:`zoned.bootimage`) calls
:func:`main`, which never returns: if PID 1 exits, the kernel panics and the
zone is gone. Every failure is written to the console (the kernel gives init
``/dev/console`` as stdio, which is the zone's serial log) and retried.

Start-up, in order, with nothing imported that the step does not need
(under TCG every import costs tens of milliseconds of boot time):

1. write ``zoned-agent: starting`` to the console;
2. mount proc, sysfs, devtmpfs on /dev, devpts on /dev/pts, tmpfs on /tmp
   and /run, cgroup2 on /sys/fs/cgroup (Python 3.11 has no ``os.mount``: ctypes calls libc);
3. find the virtio-serial port named ``org.zoned.agent.0`` through
   ``/sys/class/virtio-ports/vport*/name`` and open its ``/dev/vportNpM``;
4. as soon as the host is connected, send ``AgentHello``, encoded by
   :mod:`zoned.agent.hello` without msgspec;
5. only then import :mod:`zoned.protocol` (msgspec: ~0.6 s under TCG) and
   serve the channel forever, reaping orphaned children as PID 1 must.

:mod:`zoned.agent.execs` (the processes the host runs in the zone) is
imported only when the first ``agent_exec_*`` message arrives.

Measured under TCG (6.12 strict kernel, q35): the interpreter starts running
/init, the agent module is imported ~0.1 s later, the hello leaves ~0.1 s
after that; the protocol import follows the hello.

Handshake on the agent channel
------------------------------
The host end of the port is a unix socket that the daemon may connect to
before or after the agent starts, and may drop and re-open (a daemon restart).
The guest sees the host's connection state on the port: while nobody is
connected, ``poll`` reports ``POLLHUP``, reads return end-of-file and writes
would block. So:

- Whenever the agent sees the host connected *afresh* (at start if the host is
  already there, else on the first poll without ``POLLHUP`` after one with
  it), it resets its frame decoder, drops any unsent output of the previous
  connection and sends :class:`~zoned.protocol.AgentHello` first. Bytes the
  host sends before the protocol is loaded wait in the port.
- A host that cannot tell whether the agent noticed its connection (it may
  have reconnected between two polls) sends ``Heartbeat(seq=0)``. The agent
  answers ``seq=0`` with an ``AgentHello`` followed by the ``HeartbeatReply``;
  so after connecting, the host sends ``Heartbeat(seq=0)`` and is sure to
  receive a hello, possibly two. Later heartbeats use ``seq >= 1``.
- Every other ``Heartbeat`` gets one ``HeartbeatReply`` with the same ``seq``.
- A frame that does not decode is logged to the console and ignored; a broken
  frame header resets the decoder (the host then stops hearing replies and
  reconnects).

All IO on the port is non-blocking: a host that stops reading must never
stall PID 1 (it still has to reap children). Unsent output is bounded:
heartbeat replies are dropped beyond :data:`MAX_PENDING_OUTPUT`; exec
messages are never dropped, but exec output is read from its pipes only while
less than :data:`zoned.agent.execs.OUTPUT_BACKLOG_LIMIT` is unsent, so the
rest waits in the processes' pipes (they block writing).

Processes
---------
One poll serves the port and every exec's pipes and pidfd (see
:mod:`zoned.agent.execs` for the rules). Each iteration: reap exited
children (``waitpid(-1)``; an exec's status goes to its engine, orphans are
just collected), poll, write pending output, serve the exec descriptors, read
and handle the host's messages, then let the engine send input credits and
exits. When the host disconnects (``POLLHUP``, or end-of-file on the port)
every exec's process group is killed and forgotten.

In the guest every process gets a cgroup of its own under the cgroup2 mount
(:data:`CGROUP_ROOT`), for its limits and usage figures; the agent itself
stays in the root cgroup. Processes with a terminal need ``fcntl`` and
``termios``, imported only then.

Every module the agent imports after start-up must be importable in the guest:
:data:`LATE_IMPORTS` names those imported lazily, so that the boot image
builder ships them too.
"""

from __future__ import annotations

import ctypes
import os
import select
import sys
import time

from zoned.agent import AGENT_NAME, AGENT_PORT_NAME
from zoned.agent.hello import encode_hello_frame

# Not typing.TYPE_CHECKING: typing alone costs ~0.3 s of guest boot under TCG
# (mypy treats any name TYPE_CHECKING as true).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

    from zoned.agent.execs import ExecEngine
    from zoned.protocol import AgentToHost, FrameDecoder, HeartbeatReply

#: Modules imported lazily (after the hello, or on error paths); the boot
#: image builder imports them too when it computes the image's module set.
LATE_IMPORTS = ("zoned.protocol", "zoned.agent.execs", "traceback", "fcntl", "termios")

VIRTIO_PORTS_DIR = "/sys/class/virtio-ports"
#: The cgroup2 mount (see MOUNTS) under which every process gets its own cgroup.
CGROUP_ROOT = "/sys/fs/cgroup"

# mount(2) flags (linux/mount.h).
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8

#: (source, target, fstype, flags, data), mounted in order.
MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755"),
    # Terminals of the processes that ask for one (devtmpfs's /dev/ptmx opens this instance).
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
)

#: Poll timeout while the host is connected; bounds how late an orphan is reaped.
CONNECTED_POLL_S = 1.0
#: Sleep between polls while the host is not connected (POLLHUP is level-triggered).
DISCONNECTED_POLL_S = 0.02
#: Sleep before re-trying after an error (no port yet, port vanished, a bug).
RETRY_S = 0.5
#: Unsent output kept for a host that does not read; beyond it, replies are dropped.
MAX_PENDING_OUTPUT = 1024 * 1024
_READ_SIZE = 64 * 1024


def console(message: str) -> None:
    """One line on the console; never raises (the console may be absent or broken)."""
    # Not contextlib.suppress: contextlib costs ~0.2 s of guest boot under TCG.
    try:  # noqa: SIM105
        os.write(1, f"zoned-agent: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def log_exception(context: str) -> None:
    """Write the exception being handled, with its traceback, to the console."""
    try:
        import traceback

        text = traceback.format_exc()
    except BaseException:
        exc = sys.exc_info()[1]
        text = f"{type(exc).__name__}: {exc}"
    console(f"{context}:\n{text.rstrip()}")


# ---------------------------------------------------------------------------
# System set-up
# ---------------------------------------------------------------------------


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once, with the prototypes the agent calls."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = (
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        )
        _libc.mount.restype = ctypes.c_int
    return _libc


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) through libc; :class:`OSError` on failure."""
    result = libc().mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {fstype} on {target}: {os.strerror(errno)}")


def mount_filesystems() -> None:
    """Mount everything in :data:`MOUNTS`; a failure is logged and the rest still mounted."""
    for source, target, fstype, flags, data in MOUNTS:
        try:
            os.makedirs(target, exist_ok=True)
            mount(source, target, fstype, flags, data)
        except OSError as exc:
            console(f"cannot mount {fstype} on {target}: {exc}")


def ensure_stdio() -> None:
    """Give PID 1 the console as stdio if the kernel could not (no /dev/console node)."""
    try:
        os.fstat(1)
        return
    except OSError:
        pass
    try:
        fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return
    for target in (0, 1, 2):
        if fd != target:
            os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def reap_children(on_exit: Callable[[int, int], object] | None = None) -> None:
    """Collect every exited child (PID 1 inherits all orphans).

    ``on_exit(pid, status)`` is called for each, so that the exec engine
    learns the status of its processes; nobody else may wait for them.
    """
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        if on_exit is not None:
            on_exit(pid, status)


# ---------------------------------------------------------------------------
# Guest facts
# ---------------------------------------------------------------------------


def uptime_s() -> float:
    """Seconds since the guest kernel started."""
    with open("/proc/uptime", "rb") as f:
        return float(f.read().split()[0])


def load1() -> float:
    with open("/proc/loadavg", "rb") as f:
        return float(f.read().split()[0])


def meminfo_kib() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in KiB."""
    total = available = 0
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            if key == b"MemTotal":
                total = int(rest.split()[0])
            elif key == b"MemAvailable":
                available = int(rest.split()[0])
    return total, available


def hello_frame() -> bytes:
    """The frame of this agent's ``AgentHello``, built without msgspec."""
    return encode_hello_frame(
        agent=AGENT_NAME,
        kernel_release=os.uname().release,
        boot_s=uptime_s(),
        pid=os.getpid(),
    )


def heartbeat_reply(seq: int) -> HeartbeatReply:
    from zoned.protocol import HeartbeatReply

    total, available = meminfo_kib()
    return HeartbeatReply(
        seq=seq,
        uptime_s=uptime_s(),
        load1=load1(),
        mem_total_kib=total,
        mem_available_kib=available,
        processes=process_count(),
    )


def process_count() -> int:
    """Processes in the guest (numeric entries of /proc); 0 when /proc is absent."""
    try:
        return sum(1 for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return 0


def set_hostname(cmdline_path: str = "/proc/cmdline") -> None:
    """Name the guest after its zone (``zoned.zone=`` on the kernel command line)."""
    try:
        with open(cmdline_path, "rb") as f:
            words = f.read().split()
    except OSError:
        return
    names = [w.split(b"=", 1)[1] for w in words if w.startswith(b"zoned.zone=")]
    if not names or not names[-1] or len(names[-1]) > 63:
        return
    if libc().sethostname(names[-1], len(names[-1])) != 0:
        console(f"cannot set the hostname: errno {ctypes.get_errno()}")


# ---------------------------------------------------------------------------
# The agent channel
# ---------------------------------------------------------------------------


def find_port(name: str = AGENT_PORT_NAME) -> str | None:
    """The device path of the virtio-serial port called ``name``, or None if absent.

    Creates the device node from sysfs if devtmpfs did not (it could not be mounted).
    """
    try:
        entries = sorted(os.listdir(VIRTIO_PORTS_DIR))
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(f"{VIRTIO_PORTS_DIR}/{entry}/name", "rb") as f:
                if f.read().strip() != name.encode():
                    continue
            path = f"/dev/{entry}"
            if not os.path.exists(path):
                with open(f"{VIRTIO_PORTS_DIR}/{entry}/dev", "rb") as f:
                    major, minor = (int(n) for n in f.read().split(b":"))
                os.mknod(path, 0o600 | 0o020000, os.makedev(major, minor))
            return path
        except OSError:
            continue
    return None


class AgentChannel:
    """One open agent port: its connection state, frame decoder, unsent output and execs.

    ``cgroup_root`` is where the processes' cgroups go ("": none, as on a host).
    """

    def __init__(self, fd: int, *, cgroup_root: str = "") -> None:
        self.fd = fd
        self._cgroup_root = cgroup_root
        self.connected = False
        # None until the protocol is imported (after the first hello) or reset.
        self._decoder: FrameDecoder | None = None
        self._output = bytearray()
        # None until the first exec message (keeps zoned.agent.execs off the boot path).
        self._execs: ExecEngine | None = None

    def serve(self) -> None:
        """Serve the port until an IO error (the caller re-opens it).

        Whatever ends it, the processes started through this channel are killed.
        """
        try:
            while True:
                self._serve_once()
        finally:
            if self._execs is not None:
                self._execs.kill_all()

    def _serve_once(self) -> None:
        self._reap()
        poll = select.poll()
        poll.register(self.fd, select.POLLIN | (select.POLLOUT if self._output else 0))
        timeout_ms = int(CONNECTED_POLL_S * 1000) if self.connected else 0
        execs = self._execs
        if execs is not None and len(execs):
            execs.register(poll)
            if execs.needs_short_timeout():
                from zoned.agent.execs import NO_PIDFD_POLL_MS

                timeout_ms = min(timeout_ms, NO_PIDFD_POLL_MS)
        events = poll.poll(timeout_ms)
        revents = 0
        exec_events: list[tuple[int, int]] = []
        for fd, fd_events in events:
            if fd == self.fd:
                revents = fd_events
            else:
                exec_events.append((fd, fd_events))
        if revents & select.POLLNVAL:
            raise OSError("agent port: poll reports POLLNVAL")
        if revents & select.POLLHUP:
            self._disconnected()
            if self._execs is not None:
                self._execs.remove_stale_cgroups()
            time.sleep(DISCONNECTED_POLL_S)
            return
        if not self.connected:
            self._connected()
        if self._output:
            self._write()
        if execs is not None and exec_events and execs.handle_events(exec_events):
            self._reap()
        if revents & select.POLLIN:
            self._read()
        if self._execs is not None:
            self._execs.settle()
            if self._output:
                self._write()
        if WORKLOAD_ROOT is None and not self._output:
            load_protocol()

    def _reap(self) -> None:
        reap_children(self._execs.child_exited if self._execs is not None else None)

    def execs(self) -> ExecEngine:
        """The exec engine, created on first use."""
        if self._execs is None:
            from zoned.agent.execs import ExecEngine

            if WORKLOAD_ROOT is None:
                load_protocol()  # an exec before the idle loop got to it

            self._execs = ExecEngine(
                self.send,
                self._backlog,
                console,
                root=WORKLOAD_ROOT or "",
                cgroup_root=self._cgroup_root,
            )
        return self._execs

    def _backlog(self) -> int:
        return len(self._output)

    def _connected(self) -> None:
        self.connected = True
        self._reset()
        self.queue(hello_frame())
        console(f"host connected, hello at {time.monotonic():.3f}s")

    def _disconnected(self) -> None:
        if self.connected:
            console("host disconnected from the agent port")
        self.connected = False
        self._reset()
        # The processes' clients left with the old connection.
        if self._execs is not None and (killed := self._execs.kill_all()):
            console(f"killed {killed} process(es) of the old host connection")
        # Bytes the old host sent but never saw answered belong to it, not to the next one.
        try:
            while os.read(self.fd, _READ_SIZE):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _reset(self) -> None:
        self._decoder = None
        self._output.clear()

    def queue(self, frame: bytes, *, droppable: bool = True) -> None:
        """Queue one whole frame for the host.

        A ``droppable`` frame (a heartbeat reply) is dropped if the host
        stopped reading; others (exec messages, bounded by the exec engine's
        backlog rule) never are.
        """
        if droppable and len(self._output) + len(frame) > MAX_PENDING_OUTPUT:
            console("host is not reading: dropped a message")
            return
        self._output += frame

    def send(self, message: AgentToHost) -> None:
        """Queue a message that must not be dropped."""
        from zoned.protocol import AGENT_MAX_FRAME, encode_frame

        self.queue(encode_frame(message, AGENT_MAX_FRAME), droppable=False)

    def pending_output(self) -> bytes:
        """Queued bytes not yet written to the port."""
        return bytes(self._output)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            # End of file: the host went away between poll and read.
            self._disconnected()
            return
        self.handle_bytes(data)

    def handle_bytes(self, data: bytes) -> None:
        """Feed received bytes and queue the answer to every whole message (no IO)."""
        from zoned.errors import InvalidRequest
        from zoned.protocol import (
            AGENT_MAX_FRAME,
            AgentExecCredit,
            AgentExecInput,
            AgentExecResize,
            AgentExecSignal,
            AgentExecStart,
            FrameDecoder,
            FrameError,
            Heartbeat,
            decode_to_agent,
            encode_frame,
        )

        if self._decoder is None:
            self._decoder = FrameDecoder(AGENT_MAX_FRAME)
        try:
            self._decoder.feed(data)
            while (payload := self._decoder.next_frame()) is not None:
                try:
                    message = decode_to_agent(payload)
                except InvalidRequest as exc:
                    console(f"ignored a message from the host: {exc.message}")
                    continue
                if isinstance(message, Heartbeat):
                    if message.seq == 0:
                        self.queue(hello_frame())
                    self.queue(encode_frame(heartbeat_reply(message.seq), AGENT_MAX_FRAME))
                elif isinstance(
                    message,
                    AgentExecStart
                    | AgentExecInput
                    | AgentExecCredit
                    | AgentExecSignal
                    | AgentExecResize,
                ):
                    self.execs().handle(message)
        except FrameError as exc:
            console(f"broken frame from the host, decoder reset: {exc.message}")
            self._decoder = None

    def _write(self) -> None:
        # A virtio-serial port takes at most 32 KiB per write: write until it would block.
        while self._output:
            try:
                written = os.write(self.fd, self._output)
            except (BlockingIOError, InterruptedError):
                return
            del self._output[:written]


def load_protocol() -> None:
    """Import the protocol (msgspec), reporting how long it took; then mount the
    workload root (both after the hello: neither is on the boot's critical path)."""
    global WORKLOAD_ROOT
    if "zoned.protocol" not in sys.modules:
        started = time.monotonic()
        import zoned.protocol  # noqa: F401

        took = time.monotonic() - started
        console(f"protocol loaded at {time.monotonic():.3f}s ({took:.3f}s)")
    if WORKLOAD_ROOT is None:
        try:
            WORKLOAD_ROOT = prepare_workload_root()
        except BaseException:
            log_exception("workload root set-up failed; processes run in the agent's root")
            WORKLOAD_ROOT = ""


# ---------------------------------------------------------------------------
# The workload root
# ---------------------------------------------------------------------------

#: The read-only workload image (zoned.rootfs), the zone's first virtio disk.
WORKLOAD_DEVICE = "/dev/vda"
#: Where it is assembled: the image below, a tmpfs for writes above, merged.
WORKLOAD_BASE = "/run/workload"
#: The merged root processes are chrooted into: None until set up, "" when
#: there is none (no disk: processes run in the agent's own root).
WORKLOAD_ROOT: str | None = None
MS_RDONLY = 0x1
MS_BIND = 0x1000


def prepare_workload_root(device: str = WORKLOAD_DEVICE, base: str = WORKLOAD_BASE) -> str:
    """Mount the workload image under a tmpfs overlay; returns the root, or "" without a disk.

    Inside the root: a fresh proc, sysfs (read-only), devtmpfs, the agent's
    devpts bound on /dev/pts (the processes' terminals), and a tmpfs on /tmp.
    Writes anywhere land in guest RAM and die with the zone.
    """
    if not os.path.exists(device):
        console(f"no workload disk at {device}: processes run in the agent's root")
        return ""
    lower, rw, root = f"{base}/lower", f"{base}/rw", f"{base}/root"
    for path in (lower, rw, root):
        os.makedirs(path, exist_ok=True)
    mount(device, lower, "erofs", MS_RDONLY, "")
    mount("tmpfs", rw, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.makedirs(f"{rw}/upper", exist_ok=True)
    os.makedirs(f"{rw}/work", exist_ok=True)
    mount(
        "overlay",
        root,
        "overlay",
        0,
        f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work",
    )
    for source, target, fstype, flags, data in (
        ("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
        ("sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, ""),
        ("devtmpfs", "dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755"),
        ("tmpfs", "tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ):
        os.makedirs(f"{root}/{target}", exist_ok=True)
        mount(source, f"{root}/{target}", fstype, flags, data)
    # The agent's own terminals (a devpts mount of its own would be another instance).
    os.makedirs(f"{root}/dev/pts", exist_ok=True)
    mount("/dev/pts", f"{root}/dev/pts", "", MS_BIND, "")
    console(f"workload root {device} mounted at {root} at {time.monotonic():.3f}s")
    return root


def open_port() -> int:
    """Wait for the agent port to appear, then open it (non-blocking)."""
    waiting_logged = False
    while True:
        path = find_port()
        if path is not None:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            console(f"agent port {AGENT_PORT_NAME} is {path}")
            return fd
        if not waiting_logged:
            console(f"waiting for the virtio-serial port {AGENT_PORT_NAME}")
            waiting_logged = True
        reap_children()
        time.sleep(RETRY_S)


def serve_forever() -> None:
    """Open the port and serve it; on any failure log it, wait and start again."""
    while True:
        fd = -1
        try:
            fd = open_port()
            AgentChannel(fd, cgroup_root=CGROUP_ROOT).serve()
        except BaseException:
            log_exception("agent channel failed, re-opening")
        if fd >= 0:
            try:  # noqa: SIM105 (see console())
                os.close(fd)
            except OSError:
                pass
        reap_children()
        time.sleep(RETRY_S)


def serve_fd(fd: int, *, cgroup_root: str = "") -> None:
    """Serve the agent protocol on an open stream ``fd`` (not a port) until it fails.

    For tests and tools on the host: one end of a socketpair stands in for the
    virtio-serial port (its peer closing looks like the host disconnecting).
    Reaps every child of the calling process, so run it in a process of its own.
    Processes run in the host's root: the workload disk is never looked for here.
    They get no cgroups unless ``cgroup_root`` names a cgroup2 directory of the
    caller's own (never the host's root cgroup).
    """
    global WORKLOAD_ROOT
    WORKLOAD_ROOT = ""
    os.set_blocking(fd, False)
    AgentChannel(fd, cgroup_root=cgroup_root).serve()


def main(python_started: float | None = None) -> None:
    """Run as PID 1: set the system up and serve the agent channel; never returns.

    ``python_started`` is ``time.monotonic()`` (seconds since boot) as the
    interpreter began running /init, for the boot timeline on the console.
    """
    started = f" (python at {python_started:.3f}s)" if python_started is not None else ""
    console(f"starting at {time.monotonic():.3f}s{started}")
    try:
        mount_filesystems()
        ensure_stdio()
        set_hostname()
    except BaseException:
        log_exception("system set-up failed")
    while True:
        try:
            serve_forever()
        except BaseException:
            # Only reachable through an exception inside the handler itself.
            time.sleep(RETRY_S)


def warm_up() -> None:
    """Exercise the protocol without IO, so that an import trace sees every lazy import.

    Used by :mod:`zoned.bootimage` on the host; not called in the guest.
    """
    from zoned.agent.execs import sanitize
    from zoned.protocol import (
        AGENT_MAX_FRAME,
        PROTOCOL_VERSION,
        AgentExecExit,
        AgentExecOutput,
        AgentExecResize,
        AgentExecStart,
        AgentHello,
        FrameDecoder,
        Heartbeat,
        HeartbeatReply,
        decode_to_agent,
        encode_frame,
    )

    decoder = FrameDecoder(AGENT_MAX_FRAME)
    decoder.feed(encode_frame(Heartbeat(seq=PROTOCOL_VERSION), AGENT_MAX_FRAME))
    decoder.feed(encode_frame(AgentExecStart(exec_id=1, argv=["true"]), AGENT_MAX_FRAME))
    decoder.feed(encode_frame(AgentExecResize(exec_id=1, rows=24, cols=80), AGENT_MAX_FRAME))
    while (payload := decoder.next_frame()) is not None:
        decode_to_agent(payload)
    encode_frame(AgentExecOutput(exec_id=1, stream="stdout", data=b"x"), AGENT_MAX_FRAME)
    encode_frame(AgentExecExit(exec_id=1, error=sanitize("x")), AGENT_MAX_FRAME)
    encode_frame(
        AgentExecExit(exec_id=1, signal=9, oom_killed=True, cpu_time_s=0.5, memory_peak_kib=1),
        AGENT_MAX_FRAME,
    )
    encode_frame(
        AgentHello(version=1, agent=AGENT_NAME, kernel_release="x", boot_s=0.0, pid=1),
        AGENT_MAX_FRAME,
    )
    encode_frame(
        HeartbeatReply(seq=1, uptime_s=0.0, load1=0.0, mem_total_kib=0, mem_available_kib=0),
        AGENT_MAX_FRAME,
    )
