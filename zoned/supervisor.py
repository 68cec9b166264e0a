"""Run libvirtd and virtlogd on a host whose PID 1 is not systemd.

Why this exists: libvirtd double-forks every QEMU it starts, so a dead QEMU is
an orphan that its reaper must collect before libvirt sees the domain as gone.
On hosts where PID 1 reaps orphans lazily (measured: every ~2 s) each zone
destroy then takes up to 2 s. This process marks itself a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``), so orphans below it are re-parented here and
reaped at once.

Rules of the loop:

- ``virtlogd`` starts before ``libvirtd``; both run in the foreground (no
  ``-d``) as our children, with a clean environment and stdin on /dev/null.
- Every ``SIGCHLD`` drains ``waitpid(-1, WNOHANG)``: each dead process below us
  is reaped, whether it is one of our daemons or an orphaned QEMU.
- A daemon that exits is started again after a back-off delay that doubles with
  each quick failure and resets once the daemon stayed up for a while.
- ``SIGHUP`` restarts libvirtd (used by host setup after rewriting qemu.conf).
- ``SIGTERM``/``SIGINT`` stop libvirtd, then virtlogd, and exit. Running QEMU
  processes are left alone: zones belong to libvirt and survive its restart.

Signals are blocked and consumed synchronously with ``sigtimedwait``, so the
loop has no signal handlers and no races between a check and a wait.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36

# A daemon that lived this long is considered healthy again: its back-off resets.
HEALTHY_AFTER_S = 30.0
FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
# How long each daemon may take to exit on SIGTERM before it gets SIGKILL.
STOP_GRACE_S = 15.0

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Environment variables passed through to the daemons (debugging knobs).
PASSTHROUGH_ENV_PREFIXES = ("LIBVIRT_", "VIR_")

HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def restart_delay(quick_failures: int) -> float:
    """Back-off before the next start, after ``quick_failures`` short-lived runs."""
    if quick_failures <= 0:
        return 0.0
    return float(min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** (quick_failures - 1)))


def daemon_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment for the daemons: a fixed PATH plus libvirt's debug knobs.

    The caller's PATH (a developer's pyenv shims, say) must not decide which
    helper binaries libvirtd runs as root.
    """
    env = {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8"}
    env.update({k: v for k, v in environ.items() if k.startswith(PASSTHROUGH_ENV_PREFIXES)})
    return env


@dataclass
class Daemon:
    """One supervised daemon and its restart bookkeeping."""

    name: str
    argv: list[str]
    pid: int | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    next_start_at: float = 0.0
    restarts: int = 0


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} zoned-supervisor[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _set_child_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Supervisor:
    """The reaping and restart loop; see the module docstring for its rules."""

    def __init__(self, daemons: Sequence[Daemon], env: dict[str, str]) -> None:
        self.daemons = list(daemons)
        self.env = env
        self.stopping = False

    def spawn(self, daemon: Daemon) -> None:
        try:
            pid = os.posix_spawn(
                daemon.argv[0],
                daemon.argv,
                self.env,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)],
                # The children must not inherit our blocked signals or ignored SIGPIPE.
                setsigmask=(),
                setsigdef=(*HANDLED_SIGNALS, signal.SIGPIPE),
            )
        except OSError as exc:
            _log(f"cannot start {daemon.name}: {exc}")
            self._schedule_restart(daemon, time.monotonic())
            return
        daemon.pid = pid
        daemon.started_at = time.monotonic()
        _log(f"started {daemon.name} (pid {pid})")

    def _schedule_restart(self, daemon: Daemon, now: float) -> None:
        if now - daemon.started_at >= HEALTHY_AFTER_S:
            daemon.quick_failures = 0
        daemon.quick_failures += 1
        delay = restart_delay(daemon.quick_failures)
        daemon.next_start_at = now + delay
        daemon.restarts += 1
        _log(f"{daemon.name} will be restarted in {delay:.1f} s")

    def reap(self) -> None:
        """Collect every dead process below us; note which daemons died."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for daemon in self.daemons:
                if daemon.pid == pid:
                    daemon.pid = None
                    _log(f"{daemon.name} (pid {pid}) exited: {_describe_status(status)}")
                    if not self.stopping:
                        self._schedule_restart(daemon, time.monotonic())

    def start_due(self) -> None:
        now = time.monotonic()
        for daemon in self.daemons:
            if daemon.pid is None and now >= daemon.next_start_at:
                self.spawn(daemon)

    def next_timeout(self) -> float | None:
        waiting = [d.next_start_at for d in self.daemons if d.pid is None]
        if not waiting:
            return None
        return max(0.0, min(waiting) - time.monotonic())

    def restart(self, name: str) -> None:
        for daemon in self.daemons:
            if daemon.name == name and daemon.pid is not None:
                _log(f"restarting {name} on request")
                os.kill(daemon.pid, signal.SIGTERM)
                # A requested restart is not a failure: start again at once.
                daemon.started_at = -HEALTHY_AFTER_S

    def stop_all(self) -> None:
        """Stop the daemons in reverse start order, each within STOP_GRACE_S."""
        self.stopping = True
        for daemon in reversed(self.daemons):
            if daemon.pid is None:
                continue
            _log(f"stopping {daemon.name} (pid {daemon.pid})")
            os.kill(daemon.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while daemon.pid is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _log(f"{daemon.name} ignored SIGTERM; killing it")
                    os.kill(daemon.pid, signal.SIGKILL)
                    remaining = STOP_GRACE_S
                signal.sigtimedwait([signal.SIGCHLD], min(remaining, 1.0))
                self.reap()

    def run(self) -> int:
        self.start_due()
        while True:
            timeout = self.next_timeout()
            info = signal.sigtimedwait(HANDLED_SIGNALS, 3600.0 if timeout is None else timeout)
            if info is not None:
                if info.si_signo == signal.SIGHUP:
                    self.restart("libvirtd")
                elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    _log(f"received {signal.Signals(info.si_signo).name}")
                    self.stop_all()
                    self.reap()
                    return 0
            self.reap()
            self.start_due()


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _claim_pidfile(path: Path) -> None:
    """Write our pid, refusing to start when a live supervisor already holds it."""
    try:
        old = int(path.read_text().strip())
    except (OSError, ValueError):
        old = 0
    if old > 0 and old != os.getpid():
        try:
            os.kill(old, 0)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
        else:
            raise SystemExit(f"zoned-supervisor: already running as pid {old} ({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zoned.supervisor",
        description="Run virtlogd and libvirtd as children of a reaping subreaper.",
    )
    parser.add_argument("--pidfile", type=Path, default=Path("/run/zoned/supervisor.pid"))
    parser.add_argument("--virtlogd", default="/usr/sbin/virtlogd", help="virtlogd binary")
    parser.add_argument("--libvirtd", default="/usr/sbin/libvirtd", help="libvirtd binary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Block first: a signal arriving before sigtimedwait must wait for it, not kill us.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    _set_child_subreaper()
    _claim_pidfile(args.pidfile)
    try:
        supervisor = Supervisor(
            [Daemon("virtlogd", [args.virtlogd]), Daemon("libvirtd", [args.libvirtd])],
            daemon_environment(dict(os.environ)),
        )
        return supervisor.run()
    finally:
        try:
            if args.pidfile.read_text().strip() == str(os.getpid()):
                args.pidfile.unlink()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
