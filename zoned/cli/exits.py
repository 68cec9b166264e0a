"""zonectl's exit statuses, their help text, and the one-line error and exit reports."""

from __future__ import annotations

import errno

from zoned import protocol as p
from zoned.cli.format import one_line
from zoned.client import ClientError, ConnectionLost, DaemonUnavailable
from zoned.errors import ZonedError

PROG = "zonectl"

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_NO_CAPACITY = 6
EXIT_PERMISSION_DENIED = 7
#: ``zonectl run`` when the command was killed by the run's timeout (as timeout(1)).
EXIT_TIMED_OUT = 124
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
#: SIGTERM made zonectl stop waiting for a process (128 + SIGTERM, as a shell has it).
EXIT_TERMINATED = 143

#: Daemon error codes with their own exit status; every other code exits 1.
EXIT_BY_ERROR_CODE: dict[str, int] = {
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
    "no_capacity": EXIT_NO_CAPACITY,
    "permission_denied": EXIT_PERMISSION_DENIED,
}

EXIT_STATUS_HELP = """\
exit status:
    0  success
    1  the daemon reported another error (invalid_request, hypervisor,
       internal, unsupported_version), or its reply made no sense
    2  usage error
    3  daemon unavailable (no socket, nothing listening, connection lost)
    4  not_found
    5  conflict
    6  no_capacity
    7  permission_denied (by the daemon or by the socket's file mode)
  130  interrupted (Ctrl-C; during exec/run: Ctrl-C twice)
  141  stdout closed early
  143  terminated (SIGTERM during exec/run)
exec and run exit with the command's status (128+N when signal N ended it,
124 when run --timeout killed it, 127/126 when it could not be started).
"""


class StoppedWaiting(Exception):
    """zonectl left a running process on a signal; ``status`` is its exit status."""

    def __init__(self, signum: int, status: int) -> None:
        super().__init__(f"stopped waiting for the process on signal {signum}")
        self.signum = signum
        self.status = status


def _is_permission_error(exc: DaemonUnavailable) -> bool:
    return exc.errno in (errno.EACCES, errno.EPERM)


def error_code_of(exc: BaseException) -> str:
    """The ``<code>`` zonectl prints for a failure."""
    if isinstance(exc, ZonedError):
        return exc.code
    if isinstance(exc, DaemonUnavailable):
        return "permission_denied" if _is_permission_error(exc) else "unavailable"
    if isinstance(exc, ConnectionLost):
        return "connection_lost"
    if isinstance(exc, ClientError):
        return "protocol_error"
    return "internal"


def exit_code_for(exc: BaseException) -> int:
    """The exit status for a failure (see :mod:`zoned.cli`)."""
    if isinstance(exc, ZonedError):
        return EXIT_BY_ERROR_CODE.get(exc.code, EXIT_DAEMON_ERROR)
    if isinstance(exc, DaemonUnavailable):
        return EXIT_PERMISSION_DENIED if _is_permission_error(exc) else EXIT_UNAVAILABLE
    if isinstance(exc, ConnectionLost):
        return EXIT_UNAVAILABLE
    return EXIT_DAEMON_ERROR


def error_line(exc: ZonedError | ClientError) -> str:
    """``zonectl: <code>: <message>``, always one line."""
    return f"{PROG}: {error_code_of(exc)}: {one_line(exc.message)}"


def process_exit_status(exit: p.ExecExit) -> int:
    """zonectl's exit status for a process: its own, 128+signal, or 124 (timed out)."""
    if exit.timed_out:
        return EXIT_TIMED_OUT
    if exit.exit_code is not None:
        return exit.exit_code
    return 128 + (exit.signal or 0)


def exit_note(
    exit: p.ExecExit, *, timeout_s: float | None, memory_limit_mib: int | None
) -> str | None:
    """The line zonectl adds on stderr when a process did not simply end; None if it did."""
    if exit.timed_out:
        after = "" if timeout_s is None else f" after {timeout_s:g} s"
        return f"{PROG}: the command timed out{after} of running; killed"
    if exit.oom_killed:
        if memory_limit_mib is None:
            return f"{PROG}: killed: out of memory (no limit was set: the zone ran out)"
        return f"{PROG}: killed: out of memory (limit {memory_limit_mib} MiB)"
    return None
