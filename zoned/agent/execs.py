"""The processes the guest agent runs for the host: start, stdio with flow control, exit.

:class:`ExecEngine` is driven by :class:`zoned.agent.init.AgentChannel`'s
single poll loop: the channel hands it the ``agent_exec_*`` messages it
decodes, lets it add its file descriptors to the loop's poll, passes it their
events and the exit statuses that the loop's ``waitpid(-1)`` collects, and
sends the messages it produces. It never blocks, except for the moment between
``fork`` and ``exec`` of a new process. It is imported lazily (after the
hello, when the first exec message arrives), like :mod:`zoned.protocol`, whose
message classes it uses.

Rules, per process (``exec_id``)
--------------------------------
- **Start.** ``argv`` is run directly (no shell) by ``fork`` + ``execvpe``, as
  the leader of a new session and process group, with exactly ``env`` (plus
  :data:`DEFAULT_PATH` as ``PATH`` when ``env`` has none; ``argv[0]`` without
  a ``/`` is searched in that ``PATH``), in ``cwd``, and unless both are 0
  with no supplementary groups, ``gid`` and ``uid``. stdin is a pipe when the
  host asked for one, else ``/dev/null``; stdout and stderr are two pipes;
  every other descriptor is closed; SIGPIPE and SIGXFSZ are back to their
  defaults (Python ignores them, and ignored signals survive ``exec``). The
  child reports a failure before ``exec`` through a close-on-exec pipe, so a
  process that cannot start yields one ``AgentExecExit`` with ``error`` and
  nothing else; one that starts yields ``AgentExecStarted``. A start reusing
  the id of a process still known, or beyond :data:`MAX_EXECS_PER_ZONE`
  known processes, is refused the same way.
- **Output.** The host lends ``EXEC_OUTPUT_WINDOW`` bytes of credit at the
  start (stdout and stderr together) and returns what it consumed with
  ``AgentExecCredit`` (capped at the window; more is logged as a host bug). A
  pipe is read only while its process has credit and the channel's unsent
  output is below :data:`OUTPUT_BACKLOG_LIMIT`, at most
  ``min(credit, MAX_EXEC_CHUNK)`` bytes at a time. A process that writes
  faster than the host consumes blocks on its full pipe: the agent never
  buffers its output.
- **Input.** ``AgentExecInput`` data is buffered (at most
  ``EXEC_INPUT_WINDOW`` bytes not yet credited; beyond that it is a host bug,
  logged and dropped) and written to the stdin pipe when it accepts more. The
  bytes written are credited back with ``AgentExecInputCredit``, batched once
  per loop iteration. ``eof`` closes stdin once the buffer is drained. When
  the process closed its stdin (``EPIPE``), buffered and later input is
  discarded but still credited, so that the host never stalls.
- **Signals.** ``AgentExecSignal`` goes to the process group, or to the
  process alone if it left its group; a process already reaped is not
  signalled (its pid may be reused).
- **Exit.** ``AgentExecExit`` (``exit_code`` or ``signal``) is sent once the
  process is reaped *and* its output is all sent: both pipes at end-of-file,
  or, since a background grandchild may keep them open forever, nothing left
  to read in them right now (what such a grandchild writes later is lost).
  It is the last message for that ``exec_id``; the id is then forgotten and
  may be reused. A pidfd per process wakes the poll loop when it exits.
- **Terminal** (``tty``). The process gets a new pseudo-terminal of
  ``rows`` x ``cols`` as its controlling terminal and its fds 0, 1 and 2
  (fresh termios defaults: echo on, ``ICRNL``...). The master is read as the
  ``stdout`` stream (same credit rules; there is no ``stderr``) and input is
  written to it whatever ``stdin`` says (same input window); ``eof`` writes
  the terminal's EOF character (``^D``, not credited: the host never sent it)
  once the input before it is written, and the terminal stays open for more
  input. ``EIO`` reading the master means the slave is closed everywhere: end
  of file. ``AgentExecResize`` sets the size (the kernel sends ``SIGWINCH``
  to the foreground group); for a process without a terminal, or an unknown
  one, it is ignored (logged once). Input pending when the slave side hangs
  up is discarded but credited.
- **Cgroups** (only with a ``cgroup_root``, the cgroup2 mount in the guest).
  At the first start, the root's ``memory``, ``pids`` and ``cpu`` controllers
  that exist are enabled for its children (the agent stays in the root, which
  is exempt from the no-internal-processes rule). Each process gets its own
  cgroup ``exec-<exec_id>`` (a suffix is added while a previous one of that
  id is still being removed): ``memory.max`` (``memory_limit_mib``),
  ``memory.swap.max`` 0, ``memory.oom.group`` 1 (an OOM kills the whole
  group), ``pids.max`` (``pids_limit``), set before the child joins it by
  writing to ``cgroup.procs`` -- before ``chroot``, ``setuid`` and ``exec``;
  failing to join is a start error. A limit asked for without cgroups, or
  without its controller, is refused as a start error. When the process is
  reaped, whatever is left in its cgroup is killed (``cgroup.kill``), so its
  pipes reach end of file; once its output is done, ``AgentExecExit`` reports ``oom_killed``
  (``memory.events`` ``oom_kill`` > 0), ``cpu_time_s`` (``cpu.stat``
  ``usage_usec``) and ``memory_peak_kib`` (``memory.peak``), each only when
  readable; then whatever is left in the cgroup (background processes, even
  ones that left the session) is killed with ``cgroup.kill`` and the cgroup
  removed -- at once if it is already empty, else retried on later loop
  iterations (PID 1 never waits for it). Without cgroups there are no
  figures and background processes outlive their leader, as before.
- **Host gone.** :meth:`ExecEngine.kill_all` SIGKILLs every process group
  (and, with cgroups, every cgroup) and forgets them without a word: their
  clients left with the old connection.
"""

from __future__ import annotations

import os
import select
import sys

# Not typing.TYPE_CHECKING (see zoned.agent.init).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

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
#: Exit status of a child that failed before ``exec`` (it is never reported as such).
_CHILD_FAILED = 127
_SIGKILL = 9
_EIO = 5
#: How many ``exec-<id>-<n>`` names are tried while older cgroups of that id linger.
MAX_CGROUP_SUFFIX = 64
# Python sets these to SIG_IGN at start-up; ignored signals survive exec.
_SIGPIPE = 13
_SIGXFSZ = 25

_STDOUT = "stdout"
_STDERR = "stderr"
#: What a terminal's input gets for ``eof`` (the default ``VEOF``, ^D).
TTY_EOF = b"\x04"
#: The controllers each process's cgroup gets, when the root has them.
CGROUP_CONTROLLERS = ("memory", "pids", "cpu")
NO_CGROUPS_ERROR = "memory/pid limits need cgroups, which this agent does not have"


def sanitize(text: str) -> str:
    """``text`` as the protocol's agent text: printable ASCII, at most 1024 characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[: MAX_ERROR_CHARS * 2])
    return cleaned[:MAX_ERROR_CHARS]


class _Exec:
    """One process's state: its pipes (or terminal), credits, input buffer, cgroup, status."""

    __slots__ = (
        "cgroup",
        "credit",
        "credit_due",
        "eof_marks",
        "exec_id",
        "input",
        "input_eof",
        "input_outstanding",
        "outputs",
        "pid",
        "pidfd",
        "status",
        "stdin_fd",
        "tty",
        "tty_fd",
    )

    def __init__(
        self, exec_id: int, pid: int, stdin_fd: int, outputs: dict[int, str], credit: int
    ) -> None:
        self.exec_id = exec_id
        self.pid = pid
        #: Where its input is written: the write end of its stdin pipe, or its
        #: terminal's master; -1 without one, once closed or broken.
        self.stdin_fd = stdin_fd
        #: Open read ends of its stdout and stderr pipes (or its terminal) -> stream name.
        self.outputs = outputs
        self.tty = False
        #: Its terminal's master while open; -1 without a terminal.
        self.tty_fd = -1
        #: Its cgroup directory; "" without one.
        self.cgroup = ""
        self.pidfd = -1
        #: waitpid status once reaped.
        self.status: int | None = None
        #: Output bytes the host still accepts.
        self.credit = credit
        self.input = bytearray()
        #: Offsets in ``input`` of the EOF characters the agent put there (never credited).
        self.eof_marks: list[int] = []
        self.input_eof = False
        #: Input bytes received and not yet credited back (buffered or due).
        self.input_outstanding = 0
        #: Input bytes written (or discarded) and not yet credited back.
        self.credit_due = 0


class ExecEngine:
    """Every process the host started through one agent channel (see the module rules)."""

    def __init__(
        self,
        send: Callable[[AgentToHost], None],
        backlog: Callable[[], int],
        log: Callable[[str], None],
        *,
        root: str = "",
        cgroup_root: str = "",
    ) -> None:
        """``send`` queues a message for the host (never dropped); ``backlog`` is the
        number of bytes the channel has not sent yet; ``log`` writes to the console;
        ``root`` is the directory processes are chrooted into ("": none);
        ``cgroup_root`` the cgroup2 directory their cgroups go in ("": no cgroups)."""
        from zoned import protocol

        self._protocol = protocol
        self._send = send
        self._backlog = backlog
        self._log = log
        self._root = root
        self._cgroup_root = cgroup_root
        #: Controllers enabled for the processes' cgroups; None until the first start.
        self._controllers: frozenset[str] | None = None
        #: Cgroups of ended processes that were not empty yet: removal is retried.
        self._stale_cgroups: list[str] = []
        self._resize_ignored_logged = False
        self._execs: dict[int, _Exec] = {}
        self._by_pid: dict[int, _Exec] = {}
        #: fd -> (its process, "stdin" | "stdout" | "stderr" | "tty" | "pid").
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
        limits = request.memory_limit_mib is not None or request.pids_limit is not None
        if self._cgroup_root and self._controllers is None:
            self._set_up_cgroups()
        if limits and not self._cgroup_root:
            self._refuse(exec_id, NO_CGROUPS_ERROR)
            return
        controllers = self._controllers or frozenset()
        for limit, controller in (
            (request.memory_limit_mib, "memory"),
            (request.pids_limit, "pids"),
        ):
            if limit is not None and controller not in controllers:
                self._refuse(
                    exec_id,
                    f"{controller} limits need the cgroup {controller} controller,"
                    " which this agent does not have",
                )
                return
        env = dict(request.env)
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOME", "/root" if request.uid == 0 else "/tmp")
        name = repr(request.argv[0])
        cgroup = ""
        if self._cgroup_root:
            try:
                cgroup = self._make_cgroup(request)
            except OSError as exc:
                self._refuse(exec_id, f"cannot run {name}: cannot set up its cgroup: {_why(exc)}")
                return
        parent_fds: list[int] = []
        child_fds: list[int] = []
        cgroup_procs = -1
        tty_fd = -1
        try:
            if cgroup:
                cgroup_procs = os.open(f"{cgroup}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
                child_fds.append(cgroup_procs)
            if request.tty:
                import fcntl
                import termios

                tty_fd, slave = os.openpty()  # both close-on-exec
                parent_fds.append(tty_fd)
                child_fds.append(slave)
                fcntl.ioctl(tty_fd, termios.TIOCSWINSZ, _winsize(request.rows, request.cols))
                stdio = (slave, slave, slave)
                stdin_fd = stdout_fd = stderr_fd = -1
            else:
                if request.stdin:
                    stdin_child, stdin_fd = os.pipe()
                    child_fds.append(stdin_child)
                    parent_fds.append(stdin_fd)
                else:
                    stdin_child = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    child_fds.append(stdin_child)
                    stdin_fd = -1
                stdout_fd, stdout_child = os.pipe()
                parent_fds.append(stdout_fd)
                child_fds.append(stdout_child)
                stderr_fd, stderr_child = os.pipe()
                parent_fds.append(stderr_fd)
                child_fds.append(stderr_child)
                stdio = (stdin_child, stdout_child, stderr_child)
            error_fd, error_child = os.pipe()
            parent_fds.append(error_fd)
            child_fds.append(error_child)
            pid = os.fork()
        except OSError as exc:
            _close_all(parent_fds + child_fds)
            self._remove_cgroup(cgroup)
            self._refuse(exec_id, f"cannot run {name}: {_why(exc)}")
            return
        if pid == 0:
            _child(
                request.argv,
                env,
                request.cwd,
                request.uid,
                request.gid,
                stdio,
                error_child,
                self._root,
                cgroup_procs=cgroup_procs,
                tty=request.tty,
            )
        _close_all(child_fds)
        try:
            failure = _read_to_eof(error_fd)
        finally:
            os.close(error_fd)
            parent_fds.remove(error_fd)
        if failure:
            # The child exits right after writing it; reap it here, not in the loop.
            _waitpid_exactly(pid)
            _close_all(parent_fds)
            self._remove_cgroup(cgroup)
            self._refuse(exec_id, failure.decode(errors="replace"))
            return
        for fd in parent_fds:
            os.set_blocking(fd, False)
        window = p.EXEC_OUTPUT_WINDOW
        if request.tty:
            process = _Exec(exec_id, pid, tty_fd, {tty_fd: _STDOUT}, window)
            process.tty = True
            process.tty_fd = tty_fd
        else:
            process = _Exec(
                exec_id, pid, stdin_fd, {stdout_fd: _STDOUT, stderr_fd: _STDERR}, window
            )
        process.cgroup = cgroup
        try:
            process.pidfd = os.pidfd_open(pid)
        except OSError:
            process.pidfd = -1  # no pidfd_open: the loop polls with a short timeout instead
        self._execs[exec_id] = process
        self._by_pid[pid] = process
        if request.tty:
            self._fds[tty_fd] = (process, "tty")
        else:
            for fd, stream in process.outputs.items():
                self._fds[fd] = (process, stream)
            if stdin_fd >= 0:
                self._fds[stdin_fd] = (process, "stdin")
        if process.pidfd >= 0:
            self._fds[process.pidfd] = (process, "pid")
        self._send(p.AgentExecStarted(exec_id=exec_id, pid=pid))

    def add_input(self, message: AgentExecInput) -> None:
        process = self._execs.get(message.exec_id)
        if process is None:
            return  # it has ended: the host learns it from the AgentExecExit
        data = message.data
        room = self._protocol.EXEC_INPUT_WINDOW - process.input_outstanding
        if len(data) > room:
            self._log(
                f"exec {process.exec_id}: the host sent {len(data) - room} bytes of input"
                " beyond the window; dropped"
            )
            data = data[: max(room, 0)]
        process.input_outstanding += len(data)
        if process.stdin_fd < 0:
            process.credit_due += len(data)  # stdin is gone: discard, but credit
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
        window = self._protocol.EXEC_OUTPUT_WINDOW
        process.credit += message.bytes
        if process.credit > window:
            self._log(
                f"exec {process.exec_id}: the host granted {process.credit - window} bytes"
                " of credit beyond the window (a host bug)"
            )
            process.credit = window

    def signal(self, message: AgentExecSignal) -> None:
        process = self._execs.get(message.exec_id)
        if process is None or process.status is not None:
            return  # reaped already: its pid may belong to someone else by now
        _kill(process.pid, message.signal)

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
        import fcntl
        import termios

        try:
            fcntl.ioctl(process.tty_fd, termios.TIOCSWINSZ, _winsize(message.rows, message.cols))
        except OSError as exc:
            self._log(f"exec {process.exec_id}: cannot resize its terminal: {exc}")

    # -- the poll loop ----------------------------------------------------------

    def register(self, poll: select.poll) -> None:
        """Add the descriptors that have something to do to ``poll``."""
        backlog_ok = self._backlog() < OUTPUT_BACKLOG_LIMIT
        for fd, (process, kind) in self._fds.items():
            if kind == "pid":
                poll.register(fd, select.POLLIN)
            elif kind == "stdin":
                if process.input:
                    poll.register(fd, select.POLLOUT)
            elif kind == "tty":
                events = 0
                if process.credit > 0 and backlog_ok:
                    events |= select.POLLIN
                if process.input and process.stdin_fd >= 0:
                    events |= select.POLLOUT
                if events:
                    poll.register(fd, events)
            elif process.credit > 0 and backlog_ok:
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
            try:  # noqa: SIM105 (see _close)
                _write_file(f"{process.cgroup}/cgroup.kill", "1")
            except OSError:
                pass
        return True

    def settle(self) -> None:
        """After each loop iteration: close drained stdins, send input credits and exits;
        retry removing the cgroups that were not empty yet."""
        p = self._protocol
        self.remove_stale_cgroups()
        for process in list(self._execs.values()):
            if process.stdin_fd >= 0 and process.input_eof and not process.input:
                self._drop_input(process)
            if process.status is not None and self._output_done(process):
                self._drop_input(process)
                self._flush_input_credit(process)
                oom_killed, cpu_time_s, memory_peak_kib = self._finish_cgroup(process)
                status = process.status
                if os.WIFSIGNALED(status):
                    message = p.AgentExecExit(
                        exec_id=process.exec_id,
                        signal=os.WTERMSIG(status),
                        oom_killed=oom_killed,
                        cpu_time_s=cpu_time_s,
                        memory_peak_kib=memory_peak_kib,
                    )
                else:
                    message = p.AgentExecExit(
                        exec_id=process.exec_id,
                        exit_code=os.WEXITSTATUS(status) & 0xFF,
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
        if self._stale_cgroups:
            self._stale_cgroups = [c for c in self._stale_cgroups if not _try_rmdir(c, kill=True)]

    def kill_all(self) -> int:
        """SIGKILL every process (group, and cgroup) and forget them all, silently;
        returns how many."""
        count = len(self._execs)
        for process in self._execs.values():
            # A reaped leader whose pipes are still open left a group behind.
            if process.status is None or process.outputs:
                _kill(process.pid, _SIGKILL)
            self._remove_cgroup(process.cgroup)
        for fd in list(self._fds):
            self._close(fd)
        self._execs.clear()
        self._by_pid.clear()
        return count

    # -- internals ----------------------------------------------------------------

    def _refuse(self, exec_id: int, error: str) -> None:
        self._send(self._protocol.AgentExecExit(exec_id=exec_id, error=sanitize(error)))

    def _close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        try:  # noqa: SIM105 (contextlib costs boot time in the guest)
            os.close(fd)
        except OSError:
            pass

    def _close_output(self, process: _Exec, fd: int) -> None:
        """Close one output (at end of file); a terminal's input goes with it."""
        process.outputs.pop(fd, None)
        if fd == process.tty_fd:
            self._drop_input(process)
            process.tty_fd = -1
        self._close(fd)

    def _read_output(self, process: _Exec, fd: int, stream: str) -> None:
        if fd not in process.outputs:
            return
        if process.credit <= 0 or self._backlog() >= OUTPUT_BACKLOG_LIMIT:
            return  # the backlog grew earlier in this iteration: next time
        try:
            data = os.read(fd, min(process.credit, self._protocol.MAX_EXEC_CHUNK))
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
        process.credit -= len(data)
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
            process.credit_due += count - (len(marks) - len(process.eof_marks))
        else:
            process.credit_due += count
        del process.input[:count]

    def _drop_input(self, process: _Exec) -> None:
        """Nobody will read input any more: close stdin, discard (and credit) the buffer."""
        if process.stdin_fd >= 0:
            if process.stdin_fd != process.tty_fd:
                self._close(process.stdin_fd)
            process.stdin_fd = -1
        self._consume_input(process, len(process.input))

    def _flush_input_credit(self, process: _Exec) -> None:
        window = self._protocol.EXEC_INPUT_WINDOW
        while process.credit_due > 0:
            n = min(process.credit_due, window)
            process.credit_due -= n
            process.input_outstanding -= n
            self._send(self._protocol.AgentExecInputCredit(exec_id=process.exec_id, bytes=n))

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

    # -- cgroups --------------------------------------------------------------------

    def _set_up_cgroups(self) -> None:
        """Enable the wanted controllers for the root's children (once, at the first start)."""
        root = self._cgroup_root
        try:
            available = _read_file(f"{root}/cgroup.controllers").split()
            enabled = _read_file(f"{root}/cgroup.subtree_control").split()
        except OSError as exc:
            self._log(f"no cgroups at {root} ({_why(exc)}): processes get no limits or figures")
            self._cgroup_root = ""
            self._controllers = frozenset()
            return
        for controller in CGROUP_CONTROLLERS:
            if controller.encode() in available and controller.encode() not in enabled:
                try:
                    _write_file(f"{root}/cgroup.subtree_control", f"+{controller}")
                except OSError as exc:
                    self._log(f"cannot enable the {controller} cgroup controller: {_why(exc)}")
        try:
            enabled = _read_file(f"{root}/cgroup.subtree_control").split()
        except OSError:
            enabled = []
        self._controllers = frozenset(c.decode() for c in enabled)

    def _make_cgroup(self, request: AgentExecStart) -> str:
        """Create the process's cgroup with its limits; its path."""
        base = f"{self._cgroup_root}/exec-{request.exec_id}"
        path = base
        suffix = 1
        while True:
            try:
                os.mkdir(path, 0o755)
                break
            except FileExistsError:
                # The cgroup of an ended process of the same id, still being removed.
                if _try_rmdir(path, kill=True):
                    continue
                suffix += 1
                if suffix > MAX_CGROUP_SUFFIX:
                    raise
                path = f"{base}-{suffix}"
        controllers = self._controllers or frozenset()
        try:
            if "memory" in controllers:
                _write_file(f"{path}/memory.oom.group", "1")
                if request.memory_limit_mib is not None:
                    _write_file(f"{path}/memory.max", str(request.memory_limit_mib * 1024 * 1024))
                    if os.path.exists(f"{path}/memory.swap.max"):
                        _write_file(f"{path}/memory.swap.max", "0")
            if request.pids_limit is not None:
                _write_file(f"{path}/pids.max", str(request.pids_limit))
        except OSError:
            _try_rmdir(path, kill=False)
            raise
        return path

    def _finish_cgroup(self, process: _Exec) -> tuple[bool, float | None, int | None]:
        """(oom_killed, cpu_time_s, memory_peak_kib) of an ended process; removes its cgroup."""
        path = process.cgroup
        if not path:
            return False, None, None
        process.cgroup = ""
        oom_kills = _read_key(f"{path}/memory.events", b"oom_kill")
        usage_usec = _read_key(f"{path}/cpu.stat", b"usage_usec")
        try:
            peak: int | None = int(_read_file(f"{path}/memory.peak"))
        except (OSError, ValueError):
            peak = None
        self._remove_cgroup(path)
        return (
            bool(oom_kills),
            usage_usec / 1e6 if usage_usec is not None else None,
            peak // 1024 if peak is not None else None,
        )

    def _remove_cgroup(self, path: str) -> None:
        """Kill what is left in a cgroup and remove it, now or (not empty yet) later."""
        if path and not _try_rmdir(path, kill=True):
            self._stale_cgroups.append(path)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _winsize(rows: int, cols: int) -> bytes:
    """A ``struct winsize`` (rows, cols, no pixel sizes) for ``TIOCSWINSZ``."""
    order = sys.byteorder
    return rows.to_bytes(2, order) + cols.to_bytes(2, order) + bytes(4)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_key(path: str, key: bytes) -> int | None:
    """The value of ``key`` in a flat-keyed cgroup file (``key value`` lines); None if absent."""
    try:
        for line in _read_file(path).splitlines():
            name, _, value = line.partition(b" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _try_rmdir(path: str, *, kill: bool) -> bool:
    """Remove a cgroup; if it is not empty and ``kill``, kill its processes (they die
    asynchronously: the caller retries later). True once it is gone."""
    if _rmdir(path):
        return True
    if kill:
        try:
            _write_file(f"{path}/cgroup.kill", "1")
        except FileNotFoundError:
            _kill_listed(f"{path}/cgroup.procs")  # a kernel before 5.14
        except OSError:
            pass
    return _rmdir(path)


def _rmdir(path: str) -> bool:
    """Remove an empty directory; True once it is gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _kill_listed(procs: str) -> None:
    try:
        pids = [int(pid) for pid in _read_file(procs).split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:  # noqa: SIM105 (see ExecEngine._close)
            os.kill(pid, _SIGKILL)
        except OSError:
            pass


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 (see ExecEngine._close)
            os.close(fd)
        except OSError:
            pass


def _read_to_eof(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _waitpid_exactly(pid: int) -> None:
    try:  # noqa: SIM105 (see ExecEngine._close)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _kill(pid: int, signal: int) -> None:
    """Signal ``pid``'s process group, or ``pid`` alone if it has left its group."""
    try:
        os.killpg(pid, signal)
        return
    except ProcessLookupError:
        pass
    except OSError:
        return  # EPERM: nothing in the group may be signalled (cannot happen as root)
    try:  # noqa: SIM105 (see ExecEngine._close)
        os.kill(pid, signal)
    except OSError:
        pass


def _above_stdio(fd: int) -> int:
    """``fd`` or a close-on-exec duplicate of it numbered 3 or more (child only)."""
    while fd < 3:
        fd = os.dup(fd)
    return fd


def _child(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    uid: int,
    gid: int,
    stdio: tuple[int, int, int],
    error_fd: int,
    root: str = "",
    *,
    cgroup_procs: int = -1,
    tty: bool = False,
) -> NoReturn:
    """In the forked child: set the process up and exec it; report a failure on ``error_fd``.

    ``cgroup_procs`` is the ``cgroup.procs`` of the cgroup to join first (-1: none);
    with ``tty``, ``stdio`` is a terminal's slave to make the controlling terminal.
    """
    name = repr(argv[0])
    step = ""
    try:
        try:
            if cgroup_procs >= 0:
                step = "cannot join its cgroup: "
                os.write(cgroup_procs, b"0")
            step = ""
            os.setsid()
            error_fd = _above_stdio(error_fd)
            sources = [_above_stdio(fd) for fd in stdio]
            for target, fd in enumerate(sources):
                os.dup2(fd, target)  # inheritable
            os.closerange(3, error_fd)
            os.closerange(error_fd + 1, 1 << 20)
            if tty:
                import fcntl
                import termios

                step = "cannot make the terminal its controlling terminal: "
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if root:
                step = "cannot enter the workload root: "
                os.chroot(root)
            step = f"cannot change directory to {cwd!r}: "
            os.chdir(cwd)
            if uid or gid:
                step = f"cannot switch to uid {uid} gid {gid}: "
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            step = ""
            import _signal  # type: ignore[import-not-found]  # built in: no import cost

            _signal.signal(_SIGPIPE, _signal.SIG_DFL)
            _signal.signal(_SIGXFSZ, _signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            message = f"cannot run {name}: {step}{exc.strerror or exc}"
        except BaseException as exc:
            message = f"cannot run {name}: {step}{type(exc).__name__}: {exc}"
        data = message.encode(errors="replace")
        while data:
            data = data[os.write(error_fd, data) :]
    finally:
        os._exit(_CHILD_FAILED)
