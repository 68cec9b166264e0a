"""A cgroup per process the agent runs: its limits, its figures, and what is left of it.

Used by :class:`zoned.agent.execs.ExecEngine` only with a ``cgroup_root``
(the cgroup2 mount in the guest); without one processes get no cgroups, no
limits and no figures, and background processes outlive their leader.

Rules
-----
- At the first start, the root's ``memory``, ``pids`` and ``cpu``
  controllers that exist are enabled for its children (the agent stays in
  the root, which is exempt from the no-internal-processes rule).
- Each process gets its own cgroup ``exec-<exec_id>`` (a suffix is added
  while a previous one of that id is still being removed):
  ``memory.oom.group`` 1 (an OOM kills the whole group), ``memory.max``
  (``memory_limit_mib``) with ``memory.swap.max`` 0, ``pids.max``
  (``pids_limit``). The child joins it by writing to ``cgroup.procs`` before
  it enters the sandbox, drops its privileges and execs (:mod:`zoned.agent.spawn`;
  it then sees that cgroup as the root of its own cgroup namespace, read-only,
  and cannot leave it: :mod:`zoned.agent.sandbox`); failing to join is a start
  error. A limit asked for without cgroups, or without its
  controller, is refused as a start error.
- When the process is reaped, whatever is left in its cgroup is killed
  (``cgroup.kill``), so its pipes reach end of file. Once its output is done
  the engine reads its figures: ``oom_killed`` (``memory.events``
  ``oom_kill`` > 0), ``cpu_time_s`` (``cpu.stat`` ``usage_usec``) and
  ``memory_peak_kib`` (``memory.peak``), each only when readable; once the
  exit is sent the cgroup is emptied (``cgroup.kill``) and removed -- at
  once if it is already empty, else retried on later loop iterations (PID 1
  never waits for it).

Never blocks; imports only :mod:`os`.
"""

from __future__ import annotations

import os

# Not typing.TYPE_CHECKING (see zoned.agent.system).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

#: The controllers each process's cgroup gets, when the root has them.
CGROUP_CONTROLLERS = ("memory", "pids", "cpu")
#: How many ``exec-<id>-<n>`` names are tried while older cgroups of that id linger.
MAX_CGROUP_SUFFIX = 64
NO_CGROUPS_ERROR = "memory/pid limits need cgroups, which this agent does not have"
_SIGKILL = 9


class Cgroups:
    """The processes' cgroups under ``root`` ("": none), and those still being removed."""

    def __init__(self, root: str, log: Callable[[str], None]) -> None:
        self.root = root
        self._log = log
        #: Controllers enabled for the processes' cgroups; None until the first start.
        self._controllers: frozenset[str] | None = None
        #: Cgroups of ended processes that were not empty yet: removal is retried.
        self._stale: list[str] = []

    def refusal(self, memory_limit_mib: int | None, pids_limit: int | None) -> str:
        """Why a process with these limits cannot start here ("": it can)."""
        if self.root and self._controllers is None:
            self._set_up()
        if (memory_limit_mib is not None or pids_limit is not None) and not self.root:
            return NO_CGROUPS_ERROR
        controllers = self._controllers or frozenset()
        for limit, controller in ((memory_limit_mib, "memory"), (pids_limit, "pids")):
            if limit is not None and controller not in controllers:
                return (
                    f"{controller} limits need the cgroup {controller} controller,"
                    " which this agent does not have"
                )
        return ""

    def _set_up(self) -> None:
        """Enable the wanted controllers for the root's children (once, at the first start)."""
        root = self.root
        try:
            available = read_file(f"{root}/cgroup.controllers").split()
            enabled = read_file(f"{root}/cgroup.subtree_control").split()
        except OSError as exc:
            self._log(f"no cgroups at {root} ({why(exc)}): processes get no limits or figures")
            self.root = ""
            self._controllers = frozenset()
            return
        for controller in CGROUP_CONTROLLERS:
            if controller.encode() in available and controller.encode() not in enabled:
                try:
                    write_file(f"{root}/cgroup.subtree_control", f"+{controller}")
                except OSError as exc:
                    self._log(f"cannot enable the {controller} cgroup controller: {why(exc)}")
        try:
            enabled = read_file(f"{root}/cgroup.subtree_control").split()
        except OSError:
            enabled = []
        self._controllers = frozenset(c.decode() for c in enabled)

    def create(self, exec_id: int, memory_limit_mib: int | None, pids_limit: int | None) -> str:
        """Create a process's cgroup with its limits; its path ("": no cgroups).
        :class:`OSError` if it cannot be made."""
        if not self.root:
            return ""
        base = f"{self.root}/exec-{exec_id}"
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
                write_file(f"{path}/memory.oom.group", "1")
                if memory_limit_mib is not None:
                    write_file(f"{path}/memory.max", str(memory_limit_mib * 1024 * 1024))
                    if os.path.exists(f"{path}/memory.swap.max"):
                        write_file(f"{path}/memory.swap.max", "0")
            if pids_limit is not None:
                write_file(f"{path}/pids.max", str(pids_limit))
        except OSError:
            _try_rmdir(path, kill=False)
            raise
        return path

    @staticmethod
    def kill_leftovers(path: str) -> None:
        """Kill whatever is in a cgroup (its leader is gone); never raises."""
        try:  # noqa: SIM105 (contextlib costs boot time in the guest)
            write_file(f"{path}/cgroup.kill", "1")
        except OSError:
            pass

    def finish(self, path: str) -> tuple[bool, float | None, int | None]:
        """(oom_killed, cpu_time_s, memory_peak_kib) of an ended process's cgroup,
        which is then queued for removal (:meth:`remove_stale`: the caller sends
        the exit first; an ``rmdir`` costs ~5 ms under TCG); no figures for "" (no cgroup)."""
        if not path:
            return False, None, None
        oom_kills = _read_key(f"{path}/memory.events", b"oom_kill")
        usage_usec = _read_key(f"{path}/cpu.stat", b"usage_usec")
        try:
            peak: int | None = int(read_file(f"{path}/memory.peak"))
        except (OSError, ValueError):
            peak = None
        self._stale.append(path)
        return (
            bool(oom_kills),
            usage_usec / 1e6 if usage_usec is not None else None,
            peak // 1024 if peak is not None else None,
        )

    def remove(self, path: str) -> None:
        """Kill what is left in a cgroup and remove it, now or (not empty yet) later."""
        if path and not _try_rmdir(path, kill=True):
            self._stale.append(path)

    def remove_stale(self) -> None:
        """Retry removing the cgroups of ended processes that were not empty yet."""
        if self._stale:
            self._stale = [c for c in self._stale if not _try_rmdir(c, kill=True)]


def why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_key(path: str, key: bytes) -> int | None:
    """The value of ``key`` in a flat-keyed cgroup file (``key value`` lines); None if absent."""
    try:
        for line in read_file(path).splitlines():
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
            write_file(f"{path}/cgroup.kill", "1")
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
        pids = [int(pid) for pid in read_file(procs).split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:  # noqa: SIM105 (see Cgroups.kill_leftovers)
            os.kill(pid, _SIGKILL)
        except OSError:
            pass
