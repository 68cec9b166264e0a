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
- **Host gone.** :meth:`ExecEngine.kill_all` SIGKILLs every process group and
  forgets them without a word: their clients left with the old connection.
"""

from __future__ import annotations

import os
import select

# Not typing.TYPE_CHECKING (see zoned.agent.init).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from zoned.protocol import (
        AgentExecCredit,
        AgentExecInput,
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
# Python sets these to SIG_IGN at start-up; ignored signals survive exec.
_SIGPIPE = 13
_SIGXFSZ = 25

_STDOUT = "stdout"
_STDERR = "stderr"


def sanitize(text: str) -> str:
    """``text`` as the protocol's agent text: printable ASCII, at most 1024 characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[: MAX_ERROR_CHARS * 2])
    return cleaned[:MAX_ERROR_CHARS]


class _Exec:
    """One process's state: its pipes, credits, input buffer and exit status."""

    __slots__ = (
        "credit",
        "credit_due",
        "exec_id",
        "input",
        "input_eof",
        "input_outstanding",
        "outputs",
        "pid",
        "pidfd",
        "status",
        "stdin_fd",
    )

    def __init__(
        self, exec_id: int, pid: int, stdin_fd: int, outputs: dict[int, str], credit: int
    ) -> None:
        self.exec_id = exec_id
        self.pid = pid
        #: The write end of its stdin pipe; -1 without one, once closed or broken.
        self.stdin_fd = stdin_fd
        #: Open read ends of its stdout and stderr pipes -> stream name.
        self.outputs = outputs
        self.pidfd = -1
        #: waitpid status once reaped.
        self.status: int | None = None
        #: Output bytes the host still accepts.
        self.credit = credit
        self.input = bytearray()
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
    ) -> None:
        """``send`` queues a message for the host (never dropped); ``backlog`` is the
        number of bytes the channel has not sent yet; ``log`` writes to the console;
        ``root`` is the directory processes are chrooted into ("": none)."""
        from zoned import protocol

        self._protocol = protocol
        self._send = send
        self._backlog = backlog
        self._log = log
        self._root = root
        self._execs: dict[int, _Exec] = {}
        self._by_pid: dict[int, _Exec] = {}
        #: fd -> (its process, "stdin" | "stdout" | "stderr" | "pid").
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

    def start(self, request: AgentExecStart) -> None:
        p = self._protocol
        exec_id = request.exec_id
        if exec_id in self._execs:
            self._refuse(exec_id, f"exec id {exec_id} is already in use")
            return
        if len(self._execs) >= p.MAX_EXECS_PER_ZONE:
            self._refuse(exec_id, f"too many processes: {p.MAX_EXECS_PER_ZONE} are running already")
            return
        env = dict(request.env)
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOME", "/root" if request.uid == 0 else "/tmp")
        name = repr(request.argv[0])
        parent_fds: list[int] = []
        child_fds: list[int] = []
        try:
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
            error_fd, error_child = os.pipe()
            parent_fds.append(error_fd)
            child_fds.append(error_child)
            pid = os.fork()
        except OSError as exc:
            _close_all(parent_fds + child_fds)
            self._refuse(exec_id, f"cannot run {name}: {exc.strerror or exc}")
            return
        if pid == 0:
            _child(
                request.argv,
                env,
                request.cwd,
                request.uid,
                request.gid,
                (stdin_child, stdout_child, stderr_child),
                error_child,
                self._root,
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
            self._refuse(exec_id, failure.decode(errors="replace"))
            return
        for fd in parent_fds:
            os.set_blocking(fd, False)
        process = _Exec(
            exec_id,
            pid,
            stdin_fd,
            {stdout_fd: _STDOUT, stderr_fd: _STDERR},
            p.EXEC_OUTPUT_WINDOW,
        )
        try:
            process.pidfd = os.pidfd_open(pid)
        except OSError:
            process.pidfd = -1  # no pidfd_open: the loop polls with a short timeout instead
        self._execs[exec_id] = process
        self._by_pid[pid] = process
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
            process.input_eof = True

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
        return True

    def settle(self) -> None:
        """After each loop iteration: close drained stdins, send input credits and exits."""
        p = self._protocol
        for process in list(self._execs.values()):
            if process.stdin_fd >= 0 and process.input_eof and not process.input:
                self._close_stdin(process)
            if process.status is not None and self._output_done(process):
                self._close_stdin(process)
                self._flush_input_credit(process)
                status = process.status
                if os.WIFSIGNALED(status):
                    message = p.AgentExecExit(exec_id=process.exec_id, signal=os.WTERMSIG(status))
                else:
                    message = p.AgentExecExit(
                        exec_id=process.exec_id, exit_code=os.WEXITSTATUS(status) & 0xFF
                    )
                del self._execs[process.exec_id]
                self._send(message)
            else:
                self._flush_input_credit(process)

    def kill_all(self) -> int:
        """SIGKILL every process (group) and forget them all, silently; returns how many."""
        count = len(self._execs)
        for process in self._execs.values():
            # A reaped leader whose pipes are still open left a group behind.
            if process.status is None or process.outputs:
                _kill(process.pid, _SIGKILL)
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

    def _read_output(self, process: _Exec, fd: int, stream: str) -> None:
        if process.credit <= 0 or self._backlog() >= OUTPUT_BACKLOG_LIMIT:
            return  # the backlog grew earlier in this iteration: next time
        try:
            data = os.read(fd, min(process.credit, self._protocol.MAX_EXEC_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._log(f"exec {process.exec_id}: reading its {stream}: {exc}")
            data = b""
        if not data:
            del process.outputs[fd]
            self._close(fd)
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
            if not isinstance(exc, BrokenPipeError):
                self._log(f"exec {process.exec_id}: writing its stdin: {exc}")
            # The process closed its stdin: what it will never read is still credited.
            process.credit_due += len(process.input)
            process.input.clear()
            self._close_stdin(process)
            return
        del process.input[:written]
        process.credit_due += written

    def _close_stdin(self, process: _Exec) -> None:
        if process.stdin_fd >= 0:
            self._close(process.stdin_fd)
            process.stdin_fd = -1
            process.credit_due += len(process.input)
            process.input.clear()

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
                del process.outputs[fd]
                self._close(fd)
        if readable:
            return False
        # Whoever still holds the pipes (a background grandchild) has nothing to say now.
        for fd in list(process.outputs):
            self._close(fd)
        process.outputs.clear()
        return True


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
) -> NoReturn:
    """In the forked child: set the process up and exec it; report a failure on ``error_fd``."""
    name = repr(argv[0])
    step = ""
    try:
        try:
            os.setsid()
            error_fd = _above_stdio(error_fd)
            sources = [_above_stdio(fd) for fd in stdio]
            for target, fd in enumerate(sources):
                os.dup2(fd, target)  # inheritable
            os.closerange(3, error_fd)
            os.closerange(error_fd + 1, 1 << 20)
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
