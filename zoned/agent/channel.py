"""The agent channel, guest side: the virtio-serial port, its handshake, its one poll loop.

Handshake
---------
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
  receive a hello, possibly two, all before that reply. Later heartbeats use
  ``seq >= 1``.
- Every other ``Heartbeat`` gets one ``HeartbeatReply`` with the same ``seq``.
- A frame that does not decode is logged to the console and ignored; a broken
  frame header resets the decoder (the host then stops hearing replies and
  reconnects).
- A channel that fails (an IO error, a bug) is re-opened by
  :func:`serve_forever`, whose new channel says hello again: the host takes
  that hello as the end of every process of the old one (they are killed).

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

Only what the hello needs is imported before it (this module,
:mod:`zoned.agent.system`, :mod:`zoned.agent.hello`). After the first hello,
once nothing is left to send, the channel imports :mod:`zoned.protocol`
(msgspec) and mounts the workload root
(:func:`~zoned.agent.system.workload_root`); :mod:`zoned.agent.metrics`
comes with the first heartbeat, :mod:`zoned.agent.execs` with the first
``agent_exec_*`` message.
"""

from __future__ import annotations

import os
import select
import sys
import time

from zoned.agent import AGENT_NAME, AGENT_PORT_NAME
from zoned.agent.hello import encode_hello_frame
from zoned.agent.system import (
    CGROUP_ROOT,
    console,
    log_exception,
    reap_children,
    uptime_s,
    workload_root,
)

# Not typing.TYPE_CHECKING (see zoned.agent.system).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from zoned.agent.execs import ExecEngine
    from zoned.agent.sandbox import WorkloadSandbox
    from zoned.protocol import AgentToHost, FrameDecoder

VIRTIO_PORTS_DIR = "/sys/class/virtio-ports"
#: Poll timeout while the host is connected; bounds how late an orphan is reaped.
CONNECTED_POLL_S = 1.0
#: Sleep between polls while the host is not connected (POLLHUP is level-triggered).
DISCONNECTED_POLL_S = 0.02
#: Sleep before re-trying after an error (no port yet, port vanished, a bug).
RETRY_S = 0.5
#: Unsent output kept for a host that does not read; beyond it, replies are dropped.
MAX_PENDING_OUTPUT = 1024 * 1024
_READ_SIZE = 64 * 1024


def hello_frame() -> bytes:
    """The frame of this agent's ``AgentHello``, built without msgspec."""
    return encode_hello_frame(
        agent=AGENT_NAME,
        kernel_release=os.uname().release,
        boot_s=uptime_s(),
        pid=os.getpid(),
    )


def import_protocol() -> None:
    """Import :mod:`zoned.protocol` (msgspec) if it is not yet, reporting how long it took."""
    if "zoned.protocol" not in sys.modules:
        started = time.monotonic()
        import zoned.protocol  # noqa: F401

        took = time.monotonic() - started
        console(f"protocol loaded at {time.monotonic():.3f}s ({took:.3f}s)")


class AgentChannel:
    """One open agent port: its connection state, frame decoder, unsent output and execs.

    ``cgroup_root`` is where the processes' cgroups go ("": none, as on a
    host); ``root`` the workload root they run in, in its sandbox ("": none,
    they run in the agent's root; None: the guest's workload root, mounted
    after the hello).
    """

    def __init__(self, fd: int, *, cgroup_root: str = "", root: str | None = "") -> None:
        self.fd = fd
        self._cgroup_root = cgroup_root
        self._root = root
        self.connected = False
        # None until the protocol is imported (after the first hello) or reset.
        self._decoder: FrameDecoder | None = None
        self._output = bytearray()
        # None until the first exec message (keeps zoned.agent.execs off the boot path).
        self._execs: ExecEngine | None = None
        # The workload root's sandbox, once the root is mounted (None: processes
        # run in the agent's root).
        self._sandbox: WorkloadSandbox | None = None
        self._started_up = False

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
            # After the exits are on their way: the ended processes' cgroups.
            self._execs.remove_stale_cgroups()
        if not self._started_up and not self._output:
            self._finish_start_up()

    def _finish_start_up(self) -> None:
        """What the hello did not wait for: the protocol, the workload root and its sandbox."""
        self._started_up = True
        import_protocol()
        if self._root is None:
            self._root = workload_root()
            if self._root:
                from zoned.agent.sandbox import SandboxError, sandbox_for

                self._sandbox = sandbox_for(self._root, console)
                try:
                    self._sandbox.ensure()
                except SandboxError as exc:
                    console(f"{exc.message} (tried again at the next process)")

    def _reap(self) -> None:
        reap_children(self._execs.child_exited if self._execs is not None else None)

    def execs(self) -> ExecEngine:
        """The exec engine, created on first use."""
        if self._execs is None:
            from zoned.agent.execs import ExecEngine

            if not self._started_up:
                self._finish_start_up()  # an exec before the idle loop got to it
            self._execs = ExecEngine(
                self.send,
                self._backlog,
                console,
                sandbox=self._sandbox,
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
        """The host went away: forget its connection, once.

        While no host was connected nothing is drained: the hang-up poll()
        reported can be over by the time the port is read, and what is there
        then is the new host's, sent as it connected (zoned's link sends
        ``Heartbeat(seq=0)`` at once). The price: a host that connects, sends
        and leaves between two polls (20 ms) leaves its bytes to the next
        host, whose connection gets them as its own.
        """
        if not self.connected:
            return
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
        # Said once its bytes are gone: a host that reconnects on seeing this
        # line (as the boot tests do) keeps everything it sends.
        console("host disconnected from the agent port")

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
        from zoned.agent.metrics import heartbeat_reply
        from zoned.errors import InvalidRequest
        from zoned.protocol import (
            AGENT_MAX_FRAME,
            AgentExecCredit,
            AgentExecInput,
            AgentExecResize,
            AgentExecSignal,
            AgentExecStart,
            AgentSetHostname,
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
                elif isinstance(message, AgentSetHostname):
                    self._set_hostname(message.hostname.encode())
        except FrameError as exc:
            console(f"broken frame from the host, decoder reset: {exc.message}")
            self._decoder = None

    def _set_hostname(self, name: bytes) -> None:
        """The zone's new name: the agent's hostname and the workloads'."""
        from zoned.agent.system import apply_hostname

        done = apply_hostname(name)
        if self._sandbox is not None:
            try:
                self._sandbox.set_hostname(name)
            except OSError as exc:
                console(f"cannot set the workloads' hostname: {exc}")
                done = False
        if done:
            console(f"hostname set to {name.decode()}")

    def _write(self) -> None:
        # A virtio-serial port takes at most 32 KiB per write: write until it would block.
        while self._output:
            try:
                written = os.write(self.fd, self._output)
            except (BlockingIOError, InterruptedError):
                return
            del self._output[:written]


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
            AgentChannel(fd, cgroup_root=CGROUP_ROOT, root=None).serve()
        except BaseException:
            log_exception("agent channel failed, re-opening")
        if fd >= 0:
            try:  # noqa: SIM105 (see zoned.agent.system.console)
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
    os.set_blocking(fd, False)
    AgentChannel(fd, cgroup_root=cgroup_root, root="").serve()
