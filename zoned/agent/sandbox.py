"""How a process enters the zone's workload root, and what it may touch there.

What the workload root *is* (the image, its writable upper layer, the
overlay) is :mod:`zoned.agent.system`'s business; this module starts
processes in it the way a container runtime starts a container's: the zone
is the container, each exec a ``docker exec`` into it.
docs/workloads.md has the table of what a workload can and cannot touch.

Every process is *confined* (:class:`Confinement`): Docker's default
capability set less ``CAP_MKNOD`` (the zone has no device cgroup to stop
what a new node would open), the seccomp filter of :mod:`zoned.agent.seccomp`
and, when asked, ``no_new_privs``. When the zone has a workload root it is
also *contained* in it (:class:`WorkloadSandbox`).

The sandbox: one per boot, shared by every process
---------------------------------------------------
The agent forks the sandbox's *init* into a new PID namespace: the agent
unshares one for its future children, so every process it starts later is
its own child (it reaps them) and a member of that namespace, whose PID 1 is
the init, not the agent. The init, in order:

1. unshares mount, UTS and IPC namespaces and makes every mount private;
2. mounts a tmpfs (the stage), binds the workload root into it, detaches
   every other mount (the agent's /proc, /sys, /dev, /run...), moves the
   stage over ``/`` (``pivot_root`` refuses the initramfs as old root) and
   ``pivot_root``\\ s into the workload root, detaching the old root: no mount
   of the agent's is left in the namespace, and the agent's files are below
   a root nothing can climb out of;
3. sets ``nodev`` on every mount of the workload root (a device node in an
   image opens nothing), clears ``/dev``, ``/proc`` and ``/sys`` of what the
   root brought mounted there (they must be directories, not links: a mount
   would follow one), and mounts, like a runtime: ``/proc`` of its PID
   namespace with the masked paths (:data:`MASKED_PATHS`) and read-only ones
   (:data:`READ_ONLY_PATHS`), ``/sys`` read-only, ``/dev`` a tmpfs with only
   :data:`DEVICES`, the usual links, a devpts instance of its own
   (``/dev/pts``, ``/dev/ptmx``), ``/dev/shm`` and ``/dev/mqueue``;
4. is exempt from the OOM killer, drops every capability, sets
   ``no_new_privs``, becomes non-dumpable and
   closes every descriptor but its ``/dev/pts`` (the agent takes a copy
   with ``pidfd_getfd`` to open the processes' terminals there), reports
   ready, and from then on only reaps the orphans of its namespace.

If the init is gone (only the agent can kill it) the next process starts a
new one. A sandbox that cannot be made refuses processes; nothing runs
uncontained.

One process
-----------
In the forked child (:mod:`zoned.agent.spawn`), after joining its cgroup:
``setns`` into the init's mount, UTS and IPC namespaces (root and working
directory become the workload root), ``unshare`` a mount namespace and a
cgroup namespace of its own (rooted at its own cgroup; the zone's cgroup2
is mounted with ``nsdelegate``, so no process can move into a cgroup
outside that root, ``clone3(CLONE_INTO_CGROUP)`` included) and mount that
cgroup read-only on ``/sys/fs/cgroup``; then stdio, working directory, and
:meth:`Confinement.apply` last before ``exec``. The network namespace is
the zone's (its NIC, and ``lo``, which the agent brings up at boot).

A process started with the agent's own tools (``agent_tools``) runs the
agent's static busybox instead of the workload root's programs: by file
descriptor (``execveat``), from a read-only bind of it, so that nothing in
the workload root (a replaced ``tar``, a missing ``sh``) takes part and
nothing a workload does can change it.
"""

from __future__ import annotations

import errno
import os

from zoned.agent import AGENT_BUSYBOX, linux
from zoned.agent.linux import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
)
from zoned.agent.seccomp import program
from zoned.agent.system import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    libc,
    log_exception,
    mount,
    reap_children,
)

# Not typing.TYPE_CHECKING (see zoned.agent.system).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

MS_REMOUNT = 0x20
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

#: Capabilities by number (linux/capability.h).
CAPABILITIES = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "linux_immutable": 9,
    "net_bind_service": 10,
    "net_broadcast": 11,
    "net_admin": 12,
    "net_raw": 13,
    "ipc_lock": 14,
    "ipc_owner": 15,
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_chroot": 18,
    "sys_ptrace": 19,
    "sys_pacct": 20,
    "sys_admin": 21,
    "sys_boot": 22,
    "sys_nice": 23,
    "sys_resource": 24,
    "sys_time": 25,
    "sys_tty_config": 26,
    "mknod": 27,
    "lease": 28,
    "audit_write": 29,
    "audit_control": 30,
    "setfcap": 31,
    "mac_override": 32,
    "mac_admin": 33,
    "syslog": 34,
    "wake_alarm": 35,
    "block_suspend": 36,
    "audit_read": 37,
    "perfmon": 38,
    "bpf": 39,
    "checkpoint_restore": 40,
}
#: What a process keeps: Docker's default set without ``mknod`` (Docker relies
#: on a device cgroup to make new nodes useless; a zone has none).
DEFAULT_CAPABILITIES = (
    "chown",
    "dac_override",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "net_bind_service",
    "net_raw",
    "sys_chroot",
    "setfcap",
    "audit_write",
)
DEFAULT_CAPABILITY_MASK = sum(1 << CAPABILITIES[name] for name in DEFAULT_CAPABILITIES)

#: The device nodes of a workload's /dev: name -> (major, minor).
DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
#: The links of a workload's /dev.
DEVICE_LINKS = {
    "ptmx": "pts/ptmx",
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
#: Hidden where they exist: files under /dev/null, directories under an empty
#: read-only tmpfs (a runtime's masked paths).
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
#: Read-only where they exist (a runtime's read-only paths): no sysctl, no sysrq.
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

#: Where the init stages the workload root (an empty directory of the agent's root).
STAGE_DIR = "/zoned-stage"
#: The init's name (``comm``) as a workload's ``ps`` shows it.
INIT_NAME = b"zoned-init"

_SIGCHLD = 17
# Terminal ioctls: unlock a pty master, open its slave (linux/tty.h).
_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441


class SandboxError(Exception):
    """The sandbox could not be made or entered: ``errno`` of the failing step, if any."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


class Confinement:
    """Capabilities, seccomp and ``no_new_privs`` of every process the agent starts.

    Made once by the agent, which then limits its own bounding set to the
    default capabilities: what it keeps for itself is unchanged (the agent
    never executes anything), and every process it forks can gain nothing
    more at ``exec``, without a system call per capability in each child.
    :meth:`apply` runs in each forked child.
    """

    def __init__(self) -> None:
        self._filter = linux.FilterProgram(program())
        self._root_capabilities = linux.CapabilitySets(
            DEFAULT_CAPABILITY_MASK, DEFAULT_CAPABILITY_MASK, 0
        )
        self._no_new_privs = linux.Prepared(linux.SYS_PRCTL, linux.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        for cap in range(_last_capability() + 1):
            if not DEFAULT_CAPABILITY_MASK >> cap & 1:
                linux.prctl(linux.PR_CAPBSET_DROP, cap)

    def apply(self, uid: int, gid: int, groups: list[int], *, no_new_privs: bool) -> None:
        """In the child, last before ``exec``: install the filter, switch to
        ``uid``/``gid`` with the supplementary ``groups`` unless all are 0 or none,
        keep only the default capabilities."""
        # Before giving up CAP_SYS_ADMIN: installing a filter needs it or no_new_privs.
        self._filter.install()
        if uid or gid or groups:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)  # to another uid than 0: clears the permitted and effective sets
        if uid == 0:
            self._root_capabilities.apply()
        if no_new_privs:
            self._no_new_privs()


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


class WorkloadSandbox:
    """The namespaces every process of the zone runs in, held by their init (see the module)."""

    def __init__(self, root: str, log: Callable[[str], None]) -> None:
        self.root = root
        self._log = log
        self._init_pid = -1
        self._init_pidfd = -1
        self._pts_fd = -1
        self._tools_fd = -1
        self._own_pid_ns = -1
        # What a child does to enter (built once: see zoned.agent.linux.Prepared).
        self._join = linux.Prepared(linux.SYS_SETNS, -1, 0)
        self._unshare = linux.Prepared(linux.SYS_UNSHARE, CLONE_NEWNS)
        self._unshare_with_cgroup = linux.Prepared(linux.SYS_UNSHARE, CLONE_NEWNS | CLONE_NEWCGROUP)
        self._mount_cgroup = linux.Prepared(
            linux.SYS_MOUNT,
            b"cgroup2",
            b"/sys/fs/cgroup",
            b"cgroup2",
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        )

    # -- the agent's side -----------------------------------------------------

    def ensure(self) -> None:
        """Make the sandbox unless its init is alive; :class:`SandboxError`."""
        if self._init_pidfd >= 0 and not _exited(self._init_pidfd):
            return
        self._forget()
        try:
            self._make()
        except OSError as exc:
            self._forget()
            raise SandboxError(
                f"cannot make the workload sandbox: {exc.strerror or exc}", exc.errno
            ) from None

    def _make(self) -> None:
        if self._tools_fd < 0:
            self._tools_fd = _read_only_tools()
        if self._own_pid_ns < 0:
            self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        os.makedirs(STAGE_DIR, exist_ok=True)
        # Future children go into a new PID namespace; a previous one's init is gone,
        # so first back to our own (unshare refuses otherwise).
        linux.setns(self._own_pid_ns, CLONE_NEWPID)
        linux.unshare(CLONE_NEWPID)
        ready_read, ready_write = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:
                os.close(ready_read)
                _init_main(self.root, ready_write)
            os.close(ready_write)
            ready_write = -1
            report = linux.read_to_eof(ready_read)
        finally:
            os.close(ready_read)
            if ready_write >= 0:
                os.close(ready_write)
        status, _, detail = report.partition(b" ")
        if status != b"ok":
            linux.waitpid_exactly(pid)
            code = int(status) if status.isdigit() and int(status) > 0 else 0
            raise OSError(code, detail.decode(errors="replace") or "the init died")
        self._init_pid = pid
        self._init_pidfd = os.pidfd_open(pid)
        self._pts_fd = linux.pidfd_getfd(self._init_pidfd, int(detail))
        self._join = linux.Prepared(
            linux.SYS_SETNS, self._init_pidfd, CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC
        )
        self._log(f"workload sandbox ready: init pid {pid}")

    def set_hostname(self, name: bytes) -> None:
        """The workloads' hostname (the init's UTS namespace), set by a forked
        child that joins it; OSError if that failed. Without an init there is
        nothing to do: a new one copies the agent's hostname."""
        if self._init_pidfd < 0 or _exited(self._init_pidfd):
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                linux.setns(self._init_pidfd, CLONE_NEWUTS)
                if libc().sethostname(name, len(name)) == 0:
                    code = 0
            finally:
                os._exit(code)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return  # the agent's reaper took it first: it cannot tell
        if status != 0:
            raise OSError(0, f"the child that joins the workloads' UTS namespace ended {status}")

    def _forget(self) -> None:
        for fd in (self._init_pidfd, self._pts_fd):
            if fd >= 0:
                os.close(fd)
        self._init_pid = self._init_pidfd = self._pts_fd = -1

    def open_terminal(self) -> tuple[int, int]:
        """A new pseudo-terminal of the workload's devpts: (master, slave), close-on-exec."""
        import fcntl

        flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC
        master = os.open("ptmx", flags, dir_fd=self._pts_fd)
        try:
            fcntl.ioctl(master, _TIOCSPTLCK, bytes(4))
            slave: int = fcntl.ioctl(master, _TIOCGPTPEER, flags)
        except BaseException:
            os.close(master)
            raise
        return master, slave

    @property
    def tools_fd(self) -> int:
        """The agent's busybox, opened through a read-only bind (for ``execveat``)."""
        return self._tools_fd

    # -- the child's side -----------------------------------------------------

    def enter(self, *, own_cgroup: bool) -> None:
        """In a forked child: join the sandbox's namespaces; with ``own_cgroup`` (it has
        joined its cgroup), a cgroup namespace rooted there, read-only on /sys/fs/cgroup."""
        self._join()
        if own_cgroup:
            self._unshare_with_cgroup()
            self._mount_cgroup()
        else:
            self._unshare()


def _exited(pidfd: int) -> bool:
    import select

    probe = select.poll()
    probe.register(pidfd, select.POLLIN)
    return bool(probe.poll(0))


def _read_only_tools() -> int:
    """The agent's busybox as an ``O_PATH`` descriptor on a read-only bind of itself."""
    mount(AGENT_BUSYBOX, AGENT_BUSYBOX, "", MS_BIND, "")
    mount("", AGENT_BUSYBOX, "", MS_BIND | MS_REMOUNT | MS_RDONLY, "")
    return os.open(AGENT_BUSYBOX, os.O_PATH | os.O_CLOEXEC)


# -- the init -------------------------------------------------------------------


def _init_main(root: str, ready_fd: int) -> NoReturn:
    """The sandbox's init (PID 1 of the workloads' PID namespace); never returns."""
    step = ""
    try:
        try:
            os.umask(0)
            step = "namespaces: "
            linux.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
            mount("", "/", "", MS_REC | MS_PRIVATE, "")
            step = "pivot_root into the workload root: "
            _pivot_into(root)
            step = "the workload's filesystems: "
            _mount_workload_filesystems()
            pts_fd = os.open("/dev/pts", os.O_PATH | os.O_DIRECTORY)
            step = "dropping its own privileges: "
            _confine_init()
            for fd in range(3):
                _dup_devnull(fd)
            low, high = sorted((ready_fd, pts_fd))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, 1 << 20)
        except OSError as exc:
            os.write(ready_fd, f"{exc.errno or 0} {step}{exc.strerror or exc}".encode())
            os._exit(1)
        os.write(ready_fd, f"ok {pts_fd}".encode())
        os.close(ready_fd)
        _reap_forever()
    except BaseException:
        log_exception("workload sandbox init failed")
    finally:
        os._exit(1)


def _pivot_into(root: str) -> None:
    """Make ``root`` this mount namespace's root, with nothing of the agent's left in it."""
    stage = STAGE_DIR
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700,size=64k")
    os.mkdir(f"{stage}/root")
    mount(root, f"{stage}/root", "", MS_BIND | MS_REC, "")
    for target in _agent_mount_points(stage):
        try:  # noqa: SIM105
            linux.umount2(target, linux.MNT_DETACH)
        except OSError:
            pass  # went with a mount above it
    os.chdir(stage)
    mount(".", "/", "", MS_MOVE, "")
    os.chroot(".")
    os.chdir("/root")
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def _agent_mount_points(keep: str) -> list[str]:
    """Every mount point of this namespace but ``/`` and ``keep``'s, deepest first."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point != "/" and point != keep and not point.startswith(keep + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: -p.count("/"))


def _unescape(field: bytes) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes."""
    text = field.decode(errors="surrogateescape")
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _mount_workload_filesystems() -> None:
    """What a runtime mounts in a container's root (see the module, step 3)."""
    linux.set_mount_attributes("/", linux.MOUNT_ATTR_NODEV, recursive=True)
    for point in ("/dev", "/proc", "/sys"):
        _mount_point(point)
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=0755,size=65536k")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"/dev/{name}", 0o020666, os.makedev(major, minor))
    for name, target in DEVICE_LINKS.items():
        os.symlink(target, f"/dev/{name}")
    for name, fstype, flags, data in (
        ("pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ("shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777"),
        ("mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ):
        os.mkdir(f"/dev/{name}", 0o755)
        mount(fstype, f"/dev/{name}", fstype, flags, data)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "")
    mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "")
    for path in MASKED_PATHS:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "")
        elif os.path.exists(path):
            mount("/dev/null", path, "", MS_BIND, "")
    for path in READ_ONLY_PATHS:
        if os.path.exists(path):
            mount(path, path, "", MS_BIND | MS_REC, "")
            linux.set_mount_attributes(path, linux.MOUNT_ATTR_RDONLY, recursive=True)


#: The init's command line as /proc/1/cmdline shows it (kept alive: the kernel points at it).
_INIT_CMDLINE: object = None


def _name_init() -> None:
    """``ps`` in a workload shows ``zoned-init`` as PID 1, not the agent's command line."""
    global _INIT_CMDLINE
    import ctypes

    _INIT_CMDLINE = ctypes.create_string_buffer(INIT_NAME)
    start = ctypes.addressof(_INIT_CMDLINE)
    try:
        linux.prctl(linux.PR_SET_MM, linux.PR_SET_MM_ARG_START, start)
        linux.prctl(linux.PR_SET_MM, linux.PR_SET_MM_ARG_END, start + len(INIT_NAME) + 1)
    except OSError:
        pass  # cosmetic
    linux.prctl(linux.PR_SET_NAME, start)


def _mount_point(point: str) -> None:
    """``point`` of the workload root as a bare directory to mount on: made if missing,
    refused if it is a link or no directory (a mount would follow the link), cleared of
    whatever the workload root brought mounted there."""
    if not os.path.lexists(point):
        os.mkdir(point, 0o755)
    if os.path.islink(point) or not os.path.isdir(point):
        raise OSError(errno.ENOTDIR, f"{point} of the workload root is not a directory")
    while True:
        try:
            linux.umount2(point, linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
        except OSError:
            return  # EINVAL: not a mount point (any more)


def _confine_init() -> None:
    """The init needs no privilege once the mounts are made. The OOM killer must
    never pick it (its resident set is the agent's, shared): that would end every
    process of the zone at once."""
    _name_init()
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
    for cap in range(max(CAPABILITIES.values()) + 1):
        try:  # noqa: SIM105
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
        except OSError:
            pass  # beyond this kernel's last capability
    linux.CapabilitySets(0, 0, 0).apply()
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)


def _dup_devnull(target: int) -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    if fd != target:
        os.dup2(fd, target)
        os.close(fd)


def _reap_forever() -> NoReturn:
    """Collect the orphans the PID namespace hands its init, forever."""
    import _signal  # type: ignore[import-not-found]  # built in: no import cost

    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_SIGCHLD})
    while True:
        reap_children()
        _signal.sigwaitinfo({_SIGCHLD})


# The sandbox of each workload root, made once per boot whatever happens to the
# channels that use it (a new channel must not start a second init).
_sandboxes: dict[str, WorkloadSandbox] = {}


def sandbox_for(root: str, log: Callable[[str], None]) -> WorkloadSandbox:
    """The one :class:`WorkloadSandbox` of ``root`` (made by its ``ensure``)."""
    sandbox = _sandboxes.get(root)
    if sandbox is None:
        sandbox = _sandboxes[root] = WorkloadSandbox(root, log)
    return sandbox
