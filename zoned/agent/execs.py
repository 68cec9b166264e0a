"""The processes the guest agent runs for the host: start, stdio with flow control, exit.

:class:`ExecEngine` is driven by :class:`zoned.agent.channel.AgentChannel`'s
single poll loop: the channel hands it the ``agent_exec_*`` messages it
decodes, lets it add its file descriptors to the loop's poll, passes it their
events and the exit statuses that the loop's ``waitpid(-1)`` collects, and
sends the messages it produces. It never blocks, except for the moment between
``fork`` and ``exec`` of a new process (:mod:`zoned.agent.spawn`). It is
imported lazily (after the hello, when the first exec message arrives), like
:mod:`zoned.protocol`, whose message classes it uses; each process's cgroup
is :mod:`zoned.agent.cgroups`' business.

Rules, per process (``exec_id``)
--------------------------------
- **Start.** As :func:`zoned.agent.spawn.spawn` says, with exactly ``env``
  plus :data:`DEFAULT_PATH` as ``PATH`` when ``env`` has none (``argv[0]``
  without a ``/`` is searched in that ``PATH``) and ``HOME``; confined
  (:class:`zoned.agent.sandbox.Confinement`) and, with a workload root, in
  its sandbox (made first if its init is gone). A process that cannot start
  yields one ``AgentExecExit`` with ``error`` (and ``errno`` when an OS call
  failed) and nothing else, as does a sandbox that cannot be made (nothing
  runs uncontained); one that starts yields ``AgentExecStarted`` with its pid
  as the workloads' PID namespace numbers it. A start reusing the id of a
  process still known, or beyond :data:`MAX_EXECS_PER_ZONE` known processes,
  is refused the same way.
- **Output.** The host lends ``EXEC_OUTPUT_WINDOW`` bytes of credit at the
  start (stdout and stderr together) and returns what it consumed with
  ``AgentExecCredit`` (more than the window is logged as a host bug and
  ignored). A pipe is read only while its process has credit and the
  channel's unsent output is below :data:`OUTPUT_BACKLOG_LIMIT`, at most
  ``min(credit, MAX_EXEC_CHUNK)`` bytes at a time. A process that writes
  faster than the host consumes blocks on its full pipe: the agent never
  buffers its output.
- **Input.** ``AgentExecInput`` data is buffered (at most
  ``EXEC_INPUT_WINDOW`` bytes not yet credited; beyond that it is a host bug,
  logged and dropped) and written to the stdin pipe when it accepts more. The
  bytes written are credited back with ``AgentExecInputCredit``, batched once
  per loop iteration. ``eof`` closes stdin once the buffer is drained. When
  the process closed its stdin (``EPIPE``), buffered and later input is
  discarded but still credited, so that the host never stalls. Both windows
  are :class:`zoned.credit.CreditWindow`, as on the host.
- **Signals.** ``AgentExecSignal`` goes to the process group, or to the
  process alone if it left its group; a process already reaped is not
  signalled (its pid may be reused).
- **Exit.** ``AgentExecExit`` (``exit_code`` or ``signal``, and the cgroup's
  figures) is sent once the process is reaped *and* its output is all sent:
  both pipes at end-of-file, or, since a background grandchild may keep them
  open forever, nothing left to read in them right now (what such a
  grandchild writes later is lost). It is the last message for that
  ``exec_id``; the id is then forgotten and may be reused. A pidfd per
  process wakes the poll loop when it exits.
- **Terminal** (``tty``). The master is read as the ``stdout`` stream (same
  credit rules; there is no ``stderr``) and input is written to it whatever
  ``stdin`` says (same input window); ``eof`` writes the terminal's EOF
  character (``^D``, not credited: the host never sent it) once the input
  before it is written, and the terminal stays open for more input. ``EIO``
  reading the master means the slave is closed everywhere: end of file; the
  master is then kept open, unwatched, until the process is reaped (closing
  it would hang the terminal up and ``SIGHUP`` a leader that is still
  exiting).
  ``AgentExecResize`` sets the size (the kernel sends ``SIGWINCH`` to the
  foreground group); for a process without a terminal, or an unknown one, it
  is ignored (logged once). Input pending when the slave side hangs up is
  discarded but credited.
- **Host gone.** :meth:`ExecEngine.kill_all` SIGKILLs every process group
  (and, with cgroups, every cgroup) and forgets them without a word: their
  clients left with the old connection.
"""

from __future__ import annotations

import os
import select

from zoned.agent.cgroups import Cgroups, why
from zoned.agent.sandbox import Confinement, SandboxError, WorkloadSandbox
from zoned.agent.spawn import StartError, set_terminal_size, signal_group, spawn
from zoned.credit import CreditWindow

# Not typing.TYPE_CHECKING (see zoned.agent.system).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

    from zoned.protocol import (
        AgentExecCredit,
        AgentExecInput,
        AgentExecResize,
        AgentExecSignal,
        AgentExecStart,
        AgentToHost,
        HostToAgent,
    )

#: ``PATH`` of a process whose environment has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Exec output is read only while the channel holds fewer unsent bytes than this.
OUTPUT_BACKLOG_LIMIT = 256 * 1024
#: Poll timeout while a process is watched without a pidfd (kernel without pidfd_open).
NO_PIDFD_POLL_MS = 50
#: Longest ``AgentExecExit.error`` (the protocol's bound).
MAX_ERROR_CHARS = 1024
_SIGKILL = 9
_EIO = 5

_STDOUT = "stdout"
#: The kind of a terminal master at end of file, kept open while its process runs.
_HELD = "held"
#: What a terminal's input gets for ``eof`` (the default ``VEOF``, ^D).
TTY_EOF = b"\x04"


def sanitize(text: str) -> str:
    """``text`` as the protocol's agent text: printable ASCII, at most 1024 characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[: MAX_ERROR_CHARS * 2])
    return cleaned[:MAX_ERROR_CHARS]


class _Exec:
    """One process's state: its pipes (or terminal), credit windows, input buffer, cgroup."""

    __slots__ = (
        "cgroup",
        "eof_marks",
        "exec_id",
        "input",
        "input_eof",
        "input_window",
        "output_window",
        "outputs",
        "pid",
        "pidfd",
        "status",
        "stdin_fd",
        "tty",
        "tty_fd",
    )

    def __init__(self, exec_id: int, pid: int, cgroup: str) -> None:
        from zoned.protocol import EXEC_INPUT_WINDOW, EXEC_OUTPUT_WINDOW

        self.exec_id = exec_id
        self.pid = pid
        #: Where its input is written: the write end of its stdin pipe, or its
        #: terminal's master; -1 without one, once closed or broken.
        self.stdin_fd = -1
        #: Open read ends of its stdout and stderr pipes (or its terminal) -> stream name.
        self.outputs: dict[int, str] = {}
        self.tty = False
        #: Its terminal's master while open; -1 without a terminal.
        self.tty_fd = -1
        #: Its cgroup directory; "" without one.
        self.cgroup = cgroup
        self.pidfd = -1
        #: waitpid status once reaped.
        self.status: int | None = None
        #: Output the host still accepts (we send).
        self.output_window = CreditWindow(EXEC_OUTPUT_WINDOW)
        #: Input the host may still send (we receive); ``due``: written, not yet credited.
        self.input_window = CreditWindow(EXEC_INPUT_WINDOW)
        self.input = bytearray()
        #: Offsets in ``input`` of the EOF characters the agent put there (never credited).
        self.eof_marks: list[int] = []
        self.input_eof = False


class ExecEngine:
    """Every process the host started through one agent channel (see the module rules)."""

    def __init__(
        self,
        send: Callable[[AgentToHost], None],
        backlog: Callable[[], int],
        log: Callable[[str], None],
        *,
        sandbox: WorkloadSandbox | None = None,
        cgroup_root: str = "",
    ) -> None:
        """``send`` queues a message for the host (never dropped); ``backlog`` is the
        number of bytes the channel has not sent yet; ``log`` writes to the console;
        ``sandbox`` is the workload root's, which processes run in (None: the agent's
        root, as on a host); ``cgroup_root`` the cgroup2 directory their cgroups go
        in ("": no cgroups)."""
        from zoned import protocol

        self._protocol = protocol
        self._send = send
        self._backlog = backlog
        self._log = log
        self._sandbox = sandbox
        self._confinement = Confinement()
        self._cgroups = Cgroups(cgroup_root, log)
        self._resize_ignored_logged = False
        self._execs: dict[int, _Exec] = {}
        self._by_pid: dict[int, _Exec] = {}
        #: fd -> (its process, "stdin" | "stdout" | "stderr" | "tty" | "pid" | "held").
        self._fds: dict[int, tuple[_Exec, str]] = {}

    def __len__(self) -> int:
        return len(self._execs)

    # -- messages from the host ---------------------------------------------

    def handle(self, message: HostToAgent) -> None:
        """Act on one exec message from the host (others are ignored)."""
        p = self._protocol
        if isinstance(message, p.AgentExecStart):
            self.start(message)
        elif isinstance(message, p.AgentExecInput):
            self.add_input(message)
        elif isinstance(message, p.AgentExecCredit):
            self.add_credit(message)
        elif isinstance(message, p.AgentExecSignal):
            self.signal(message)
        elif isinstance(message, p.AgentExecResize):
            self.resize(message)

    def start(self, request: AgentExecStart) -> None:
        p = self._protocol
        exec_id = request.exec_id
        if exec_id in self._execs:
            self._refuse(exec_id, f"exec id {exec_id} is already in use")
            return
        if len(self._execs) >= p.MAX_EXECS_PER_ZONE:
            self._refuse(exec_id, f"too many processes: {p.MAX_EXECS_PER_ZONE} are running already")
            return
        refusal = self._cgroups.refusal(request.memory_limit_mib, request.pids_limit)
        if refusal:
            self._refuse(exec_id, refusal)
            return
        if self._sandbox is not None:
            try:
                self._sandbox.ensure()
            except SandboxError as exc:
                self._log(exc.message)
                self._refuse(exec_id, f"cannot run {request.argv[0]!r}: {exc.message}", exc.errno)
                return
        env = dict(request.env)
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOME", "/root" if request.uid == 0 else "/tmp")
        try:
            cgroup = self._cgroups.create(exec_id, request.memory_limit_mib, request.pids_limit)
        except OSError as exc:
            self._refuse(
                exec_id,
                f"cannot run {request.argv[0]!r}: cannot set up its cgroup: {why(exc)}",
                exc.errno,
            )
            return
        try:
            pid, visible_pid, stdio = spawn(
                request, env, confinement=self._confinement, sandbox=self._sandbox, cgroup=cgroup
            )
        except StartError as exc:
            self._cgroups.remove(cgroup)
            self._refuse(exec_id, exc.message, exc.errno)
            return
        process = _Exec(exec_id, pid, cgroup)
        for fd, kind in stdio.items():
            self._fds[fd] = (process, kind)
            if kind == "stdin":
                process.stdin_fd = fd
            elif kind == "tty":
                process.tty = True
                process.tty_fd = process.stdin_fd = fd
                process.outputs[fd] = _STDOUT
            else:
                process.outputs[fd] = kind
        try:
            process.pidfd = os.pidfd_open(pid)
        except OSError:
            process.pidfd = -1  # no pidfd_open: the loop polls with a short timeout instead
        if process.pidfd >= 0:
            self._fds[process.pidfd] = (process, "pid")
        self._execs[exec_id] = process
        self._by_pid[pid] = process
        self._send(p.AgentExecStarted(exec_id=exec_id, pid=visible_pid))

    def add_input(self, message: AgentExecInput) -> None:
        process = self._execs.get(message.exec_id)
        if process is None:
            return  # it has ended: the host learns it from the AgentExecExit
        data = message.data
        beyond = process.input_window.spend(len(data))
        if beyond:
            self._log(
                f"exec {process.exec_id}: the host sent {beyond} bytes of input"
                " beyond the window; dropped"
            )
            data = data[: len(data) - beyond]
        if process.stdin_fd < 0:
            process.input_window.consume(len(data))  # stdin is gone: discard, but credit
        else:
            process.input += data
        if message.eof:
            if not process.tty:
                process.input_eof = True
            elif process.stdin_fd >= 0:
                process.eof_marks.append(len(process.input))
                process.input += TTY_EOF

    def add_credit(self, message: AgentExecCredit) -> None:
        process = self._execs.get(message.exec_id)
        if process is None:
            return  # it has ended meanwhile
        beyond = process.output_window.grant(message.bytes)
        if beyond:
            self._log(
                f"exec {process.exec_id}: the host granted {beyond} bytes"
                " of credit beyond the window (a host bug)"
            )

    def signal(self, message: AgentExecSignal) -> None:
        process = self._execs.get(message.exec_id)
        if process is None or process.status is not None:
            return  # reaped already: its pid may belong to someone else by now
        signal_group(process.pid, message.signal)

    def resize(self, message: AgentExecResize) -> None:
        process = self._execs.get(message.exec_id)
        if process is None or not process.tty:
            if not self._resize_ignored_logged:
                self._resize_ignored_logged = True
                self._log(
                    f"exec {message.exec_id}: resize ignored, no such process with a terminal"
                    " (logged once)"
                )
            return
        if process.tty_fd < 0:
            return  # its terminal is gone already
        try:
            set_terminal_size(process.tty_fd, message.rows, message.cols)
        except OSError as exc:
            self._log(f"exec {process.exec_id}: cannot resize its terminal: {exc}")

    # -- the poll loop ----------------------------------------------------------

    def register(self, poll: select.poll) -> None:
        """Add the descriptors that have something to do to ``poll``."""
        backlog_ok = self._backlog() < OUTPUT_BACKLOG_LIMIT
        for fd, (process, kind) in self._fds.items():
            may_read = process.output_window.available > 0 and backlog_ok
            if kind == "pid":
                poll.register(fd, select.POLLIN)
            elif kind == "stdin":
                if process.input:
                    poll.register(fd, select.POLLOUT)
            elif kind == "tty":
                events = 0
                if may_read:
                    events |= select.POLLIN
                if process.input and process.stdin_fd >= 0:
                    events |= select.POLLOUT
                if events:
                    poll.register(fd, events)
            elif kind != _HELD and may_read:
                poll.register(fd, select.POLLIN)

    def owns(self, fd: int) -> bool:
        return fd in self._fds

    def needs_short_timeout(self) -> bool:
        """Whether a running process has no pidfd, so that only polling notices its exit."""
        return any(p.pidfd < 0 and p.status is None for p in self._execs.values())

    def handle_events(self, events: list[tuple[int, int]]) -> bool:
        """Serve the ready descriptors; True if a process exited (the caller should reap)."""
        exited = False
        for fd, revents in events:
            entry = self._fds.get(fd)
            if entry is None:
                continue
            process, kind = entry
            if kind == "pid":
                exited = True
            elif kind == "stdin":
                self._write_input(process)
            elif kind == "tty":
                if revents & select.POLLOUT:
                    self._write_input(process)
                if revents & select.POLLHUP:
                    # The slave side is closed everywhere: nobody will read input again.
                    self._drop_input(process)
                if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read_output(process, fd, _STDOUT)
            elif revents:
                self._read_output(process, fd, kind)
        return exited

    def child_exited(self, pid: int, status: int) -> bool:
        """Record a reaped child's status; False if it is not one of these processes."""
        process = self._by_pid.pop(pid, None)
        if process is None:
            return False
        process.status = status
        if process.pidfd >= 0:
            self._close(process.pidfd)
            process.pidfd = -1
        if process.cgroup:
            # The leader is gone: so is everything it left in its cgroup. Its
            # pipes then reach end of file (a fork bomb's survivors would
            # otherwise keep them readable forever).
            self._cgroups.kill_leftovers(process.cgroup)
        return True

    def settle(self) -> None:
        """After each loop iteration: close drained stdins, send input credits and exits
        (the ended processes' cgroups are removed by :meth:`remove_stale_cgroups`,
        which the loop calls once the exits are written)."""
        p = self._protocol
        for process in list(self._execs.values()):
            if process.stdin_fd >= 0 and process.input_eof and not process.input:
                self._drop_input(process)
            if process.status is not None and self._output_done(process):
                self._drop_input(process)
                self._close_held_terminal(process)
                self._flush_input_credit(process)
                cgroup, process.cgroup = process.cgroup, ""
                oom_killed, cpu_time_s, memory_peak_kib = self._cgroups.finish(cgroup)
                if oom_killed:
                    from zoned.agent.metrics import memory_report

                    self._log(memory_report(f"exec {process.exec_id}"))
                status = process.status
                signaled = os.WIFSIGNALED(status)
                message = p.AgentExecExit(
                    exec_id=process.exec_id,
                    exit_code=None if signaled else os.WEXITSTATUS(status) & 0xFF,
                    signal=os.WTERMSIG(status) if signaled else None,
                    oom_killed=oom_killed,
                    cpu_time_s=cpu_time_s,
                    memory_peak_kib=memory_peak_kib,
                )
                del self._execs[process.exec_id]
                self._send(message)
            else:
                self._flush_input_credit(process)

    def remove_stale_cgroups(self) -> None:
        """Retry removing the cgroups of ended processes that were not empty yet."""
        self._cgroups.remove_stale()

    def kill_all(self) -> int:
        """SIGKILL every process (group, and cgroup) and forget them all, silently;
        returns how many."""
        count = len(self._execs)
        for process in self._execs.values():
            # A reaped leader whose pipes are still open left a group behind.
            if process.status is None or process.outputs:
                signal_group(process.pid, _SIGKILL)
            self._cgroups.remove(process.cgroup)
        for fd in list(self._fds):
            self._close(fd)
        self._execs.clear()
        self._by_pid.clear()
        return count

    # -- internals ----------------------------------------------------------------

    def _refuse(self, exec_id: int, error: str, errno: int | None = None) -> None:
        self._send(
            self._protocol.AgentExecExit(exec_id=exec_id, error=sanitize(error), errno=errno)
        )

    def _close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        try:  # noqa: SIM105 (contextlib costs boot time in the guest)
            os.close(fd)
        except OSError:
            pass

    def _close_output(self, process: _Exec, fd: int) -> None:
        """Close one output (at end of file); a terminal's input goes with it.

        A terminal's master stays open (unwatched) until its process is reaped:
        closing it hangs the terminal up, and the kernel sends ``SIGHUP`` to the
        session's leader, which may still be running after closing its side
        (GNU ``cat`` closes stdin, stdout and stderr before it exits).
        """
        process.outputs.pop(fd, None)
        if fd == process.tty_fd:
            self._drop_input(process)
            if process.status is None:
                self._fds[fd] = (process, _HELD)
                return
            process.tty_fd = -1
        self._close(fd)

    def _close_held_terminal(self, process: _Exec) -> None:
        """Close a reaped process's terminal master kept open by :meth:`_close_output`."""
        if process.tty_fd >= 0 and process.tty_fd not in process.outputs:
            self._close(process.tty_fd)
            process.tty_fd = -1

    def _read_output(self, process: _Exec, fd: int, stream: str) -> None:
        if fd not in process.outputs:
            return
        credit = process.output_window.available
        if credit <= 0 or self._backlog() >= OUTPUT_BACKLOG_LIMIT:
            return  # the backlog grew earlier in this iteration: next time
        try:
            data = os.read(fd, min(credit, self._protocol.MAX_EXEC_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EIO from a terminal's master: its slave side is closed everywhere (end of file).
            if not (fd == process.tty_fd and exc.errno == _EIO):
                self._log(f"exec {process.exec_id}: reading its {stream}: {exc}")
            data = b""
        if not data:
            self._close_output(process, fd)
            return
        process.output_window.spend(len(data))
        self._send(
            self._protocol.AgentExecOutput(
                exec_id=process.exec_id,
                stream="stdout" if stream == _STDOUT else "stderr",
                data=data,
            )
        )

    def _write_input(self, process: _Exec) -> None:
        if process.stdin_fd < 0 or not process.input:
            return
        try:
            written = os.write(process.stdin_fd, process.input)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if not isinstance(exc, BrokenPipeError) and exc.errno != _EIO:
                self._log(f"exec {process.exec_id}: writing its stdin: {exc}")
            # The process closed its stdin: what it will never read is still credited.
            self._drop_input(process)
            return
        self._consume_input(process, written)

    def _consume_input(self, process: _Exec, count: int) -> None:
        """Take ``count`` bytes off the input buffer, crediting all but the agent's EOF marks."""
        marks = process.eof_marks
        if marks:
            process.eof_marks = [m - count for m in marks if m >= count]
            process.input_window.consume(count - (len(marks) - len(process.eof_marks)))
        else:
            process.input_window.consume(count)
        del process.input[:count]

    def _drop_input(self, process: _Exec) -> None:
        """Nobody will read input any more: close stdin, discard (and credit) the buffer."""
        if process.stdin_fd >= 0:
            if process.stdin_fd != process.tty_fd:
                self._close(process.stdin_fd)
            process.stdin_fd = -1
        self._consume_input(process, len(process.input))

    def _flush_input_credit(self, process: _Exec) -> None:
        credit = process.input_window.release()
        if credit:
            self._send(self._protocol.AgentExecInputCredit(exec_id=process.exec_id, bytes=credit))

    def _output_done(self, process: _Exec) -> bool:
        """Whether a reaped process's output is all sent; closes its pipes if so."""
        if not process.outputs:
            return True
        probe = select.poll()
        for fd in process.outputs:
            probe.register(fd, select.POLLIN)
        readable = False
        for fd, revents in probe.poll(0):
            if revents & select.POLLIN:
                readable = True
            elif revents & (select.POLLHUP | select.POLLERR):
                # End of file: no writer is left.
                self._close_output(process, fd)
        if readable:
            return False
        # Whoever still holds the pipes (a background grandchild) has nothing to say now.
        for fd in list(process.outputs):
            self._close_output(process, fd)
        return True
