"""Starting one process for the exec engine: pipes or a terminal, fork, the child's set-up, exec.

:func:`spawn` runs ``argv`` directly (no shell) by ``fork`` + ``execvpe``,
as the leader of a new session and process group, with exactly ``env``, in
``cwd``, and unless all are 0 or none, the supplementary ``groups``,
``gid`` and ``uid``. stdin is a pipe when the host asked for one, else ``/dev/null``;
stdout and stderr are two pipes; with ``tty`` all three are a new
pseudo-terminal of ``rows`` x ``cols`` (of the workload's devpts when there
is a sandbox), the process's controlling terminal. Every other descriptor is
closed; every signal is back to its default (ignored signals survive
``exec``: Python ignores SIGPIPE and SIGXFSZ, and an agent run on a host may
have inherited more, as a background job does SIGINT and SIGQUIT). In the child, in order: join its
cgroup (if any), enter the workload sandbox (if any: its namespaces, a
mount and cgroup namespace of its own, see :mod:`zoned.agent.sandbox`), new
session, stdio, controlling terminal, ``chdir``, the confinement
(capabilities, seccomp, ``gid``/``uid``, ``no_new_privs``), exec. With
``agent_tools``, what is executed is the agent's own busybox (``argv[0]``
names the applet), never a program of the workload root.

The child reports through a close-on-exec pipe its pid as it sees it, then a
failure before ``exec`` (``"<errno> <text>"``, errno 0 when the failure was
not an OS error), and the
parent raises it as :class:`StartError`: a process either starts or leaves
nothing behind. The parent blocks only for the moment between ``fork`` and
``exec`` (or the failure) of the child.
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios

from zoned.agent import AGENT_BUSYBOX
from zoned.agent.linux import read_to_eof, waitpid_exactly
from zoned.agent.sandbox import Confinement, WorkloadSandbox

# Not typing.TYPE_CHECKING (see zoned.agent.system).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import NoReturn

    from zoned.protocol import AgentExecStart

#: Exit status of a child that failed before ``exec`` (it is never reported as such).
_CHILD_FAILED = 127


class StartError(Exception):
    """The process could not be started: ``message`` says why (with its name),
    ``errno`` is the error number of the step that failed (None: not an OS error)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


def spawn(
    request: AgentExecStart,
    env: dict[str, str],
    *,
    confinement: Confinement,
    sandbox: WorkloadSandbox | None,
    cgroup: str,
) -> tuple[int, int, dict[int, str]]:
    """Start the process ``request`` asks for (see the module rules); :class:`StartError`.

    ``sandbox`` is the workload root's (None: the process runs in the agent's
    root, as on a host), ``cgroup`` the cgroup to join ("": none). Returns its
    pid in the agent's PID namespace, its pid as it sees it (in the sandbox's
    namespace), and the parent's ends of its stdio (non-blocking), by what
    they are: ``"tty"`` (a terminal's master), or ``"stdout"``, ``"stderr"``
    and, when the host sends input, ``"stdin"``.
    """
    name = repr(request.argv[0])
    parent_fds: list[int] = []
    child_fds: list[int] = []
    cgroup_procs = -1
    stdio_fds: dict[int, str] = {}
    try:
        if cgroup:
            cgroup_procs = os.open(f"{cgroup}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            child_fds.append(cgroup_procs)
        if request.tty:
            # Both close-on-exec.
            tty_fd, slave = sandbox.open_terminal() if sandbox is not None else os.openpty()
            parent_fds.append(tty_fd)
            child_fds.append(slave)
            stdio_fds[tty_fd] = "tty"
            set_terminal_size(tty_fd, request.rows, request.cols)
            stdio = (slave, slave, slave)
        else:
            if request.stdin:
                stdin_child, stdin_fd = os.pipe()
                child_fds.append(stdin_child)
                parent_fds.append(stdin_fd)
                stdio_fds[stdin_fd] = "stdin"
            else:
                stdin_child = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                child_fds.append(stdin_child)
            stdout_fd, stdout_child = os.pipe()
            parent_fds.append(stdout_fd)
            child_fds.append(stdout_child)
            stderr_fd, stderr_child = os.pipe()
            parent_fds.append(stderr_fd)
            child_fds.append(stderr_child)
            stdio_fds.update({stdout_fd: "stdout", stderr_fd: "stderr"})
            stdio = (stdin_child, stdout_child, stderr_child)
        error_fd, error_child = os.pipe()
        parent_fds.append(error_fd)
        child_fds.append(error_child)
        pid = os.fork()
    except OSError as exc:
        _close_all(parent_fds + child_fds)
        raise StartError(f"cannot run {name}: {exc.strerror or exc}", exc.errno) from None
    if pid == 0:
        _child(
            request,
            env,
            stdio,
            error_child,
            confinement,
            sandbox,
            cgroup_procs=cgroup_procs,
        )
    _close_all(child_fds)
    try:
        report = read_to_eof(error_fd)
    finally:
        os.close(error_fd)
        parent_fds.remove(error_fd)
    visible, _, failure = report.partition(b"\n")
    if failure or not visible.isdigit():
        # The child exits right after writing it; reap it here, not in the loop.
        waitpid_exactly(pid)
        _close_all(parent_fds)
        code, _, text = failure.partition(b" ")
        errno = int(code) if code.isdigit() and int(code) > 0 else None
        message = text.decode(errors="replace") or f"cannot run {name}: it died before exec"
        raise StartError(message, errno)
    for fd in parent_fds:
        os.set_blocking(fd, False)
    return pid, int(visible), stdio_fds


def signal_group(pid: int, signal: int) -> None:
    """Signal ``pid``'s process group, or ``pid`` alone if it has left its group."""
    try:
        os.killpg(pid, signal)
        return
    except ProcessLookupError:
        pass
    except OSError:
        return  # EPERM: nothing in the group may be signalled (cannot happen as root)
    try:  # noqa: SIM105 (contextlib costs boot time in the guest)
        os.kill(pid, signal)
    except OSError:
        pass


def set_terminal_size(fd: int, rows: int, cols: int) -> None:
    """``TIOCSWINSZ`` on a terminal (the kernel sends ``SIGWINCH`` to its foreground group)."""
    # struct winsize: rows, cols, no pixel sizes.
    order = sys.byteorder
    fcntl.ioctl(
        fd, termios.TIOCSWINSZ, rows.to_bytes(2, order) + cols.to_bytes(2, order) + bytes(4)
    )


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:  # noqa: SIM105 (see signal_group)
            os.close(fd)
        except OSError:
            pass


def _above_stdio(fd: int) -> int:
    """``fd`` or a close-on-exec duplicate of it numbered 3 or more (child only)."""
    while fd < 3:
        fd = os.dup(fd)
    return fd


def _child(
    request: AgentExecStart,
    env: dict[str, str],
    stdio: tuple[int, int, int],
    error_fd: int,
    confinement: Confinement,
    sandbox: WorkloadSandbox | None,
    *,
    cgroup_procs: int = -1,
) -> NoReturn:
    """In the forked child: set the process up and exec it; report a failure on ``error_fd``.

    ``cgroup_procs`` is the ``cgroup.procs`` of the cgroup to join first (-1: none);
    with ``tty``, ``stdio`` is a terminal's slave to make the controlling terminal.
    After :meth:`WorkloadSandbox.enter` the agent's files are out of reach: nothing
    here may import a module the agent has not imported already.
    """
    argv, cwd, uid, gid = request.argv, request.cwd, request.uid, request.gid
    name = repr(argv[0])
    step = ""
    errno = 0
    try:
        try:
            # First on the pipe: its pid as it sees it (the parent reports that one).
            os.write(error_fd, b"%d\n" % os.getpid())
            if cgroup_procs >= 0:
                step = "cannot join its cgroup: "
                os.write(cgroup_procs, b"0")
            if sandbox is not None:
                step = "cannot enter the workload sandbox: "
                sandbox.enter(own_cgroup=cgroup_procs >= 0)
            step = ""
            os.setsid()
            keep = [_above_stdio(error_fd)]
            tools = -1
            if request.agent_tools and sandbox is not None:
                tools = _above_stdio(sandbox.tools_fd)
                keep.append(tools)
            sources = [_above_stdio(fd) for fd in stdio]
            for target, fd in enumerate(sources):
                os.dup2(fd, target)  # inheritable
            error_fd = keep[0]
            _close_all_but(keep)
            if request.tty:
                step = "cannot make the terminal its controlling terminal: "
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            step = f"cannot change directory to {cwd!r}: "
            os.chdir(cwd)
            step = f"cannot confine it (uid {uid} gid {gid}): "
            confinement.apply(uid, gid, request.groups, no_new_privs=request.no_new_privs)
            step = ""
            import _signal  # type: ignore[import-not-found]  # built in: no import cost

            for signum in range(1, _signal.NSIG):
                # Not contextlib.suppress: nothing more is imported in the child.
                try:  # noqa: SIM105
                    _signal.signal(signum, _signal.SIG_DFL)
                except (OSError, ValueError):
                    pass  # SIGKILL, SIGSTOP and the numbers with no signal
            if tools >= 0:
                os.execve(tools, argv, env)
            elif request.agent_tools:
                os.execve(AGENT_BUSYBOX, argv, env)
            else:
                os.execvpe(argv[0], argv, env)
        except OSError as exc:
            errno = exc.errno or 0
            message = f"cannot run {name}: {step}{exc.strerror or exc}"
        except BaseException as exc:
            message = f"cannot run {name}: {step}{type(exc).__name__}: {exc}"
        data = f"{errno} {message}".encode(errors="replace")
        while data:
            data = data[os.write(error_fd, data) :]
    finally:
        os._exit(_CHILD_FAILED)


def _close_all_but(keep: list[int]) -> None:
    """Close every descriptor from 3 up but those in ``keep`` (child only)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
