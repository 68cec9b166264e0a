"""PID 1's own system: its console, filesystems, stdio, signals, hostname, orphans,
the workload root.

Everything here runs in the guest as the zone's init (the host's tests call
some of it with their own arguments) and reports failures on the console
rather than raising where the agent can go on without the step.

- :func:`console`: the kernel gives init ``/dev/console`` as stdio, the
  zone's serial log and the only place PID 1 can report to; whatever the
  agent has to say (its boot timeline, a failure with its traceback) is one
  line there, prefixed ``zoned-agent:``. Writing never raises: the console
  may be absent or broken, and PID 1 must go on.
- :func:`mount_filesystems`: proc, sysfs, devtmpfs on /dev, devpts on
  /dev/pts, tmpfs on /tmp and /run, cgroup2 on :data:`CGROUP_ROOT` (Python
  3.11 has no ``os.mount``: ctypes calls libc).
- :func:`ensure_stdio`: the console as stdio when the kernel could not give it.
- :func:`stop_handling_signals`: the kernel delivers to PID 1 (from inside
  its PID namespace) only the signals it has a handler for; those left at
  their default or ignored are dropped, SIGKILL and SIGSTOP included. Python
  installs one handler, SIGINT's ``KeyboardInterrupt`` (and ignores SIGPIPE
  and SIGXFSZ, which is harmless: ignored signals are dropped too), so a
  workload's ``kill -INT 1`` used to interrupt the agent wherever it was.
  PID 1 handles no signal at all: every Python handler goes back to the
  default.
- :func:`set_hostname`: the zone's name, from ``zoned.zone=`` on the kernel
  command line.
- :func:`bring_up_loopback`: ``lo`` up, so that workloads have a working
  loopback (they share the zone's network namespace).
- :func:`reap_children`: PID 1 inherits every orphan and must collect it.
- :func:`mount_workload_root`: the zone's workload root: its image read-only
  below, its writable layer above, merged by overlayfs (:mod:`zoned.agent.sandbox`
  says how processes enter it); :func:`workload_root` mounts it once per boot,
  after the hello (it is not on the boot's critical path).

The workload root (docs/images.md):

- The image is the disk whose virtio serial is ``zoned-image`` (else the
  first disk, ``/dev/vda``), an EROFS file system mounted read-only and
  ``nodev``: it is shared by every zone of the image, and device nodes in
  it are inert.
- The writable layer is what ``zoned.writable=`` on the kernel command line
  says: ``tmpfs:<MiB>`` a tmpfs of that size in the zone's RAM (no value:
  an unbounded one, as before images), ``disk`` the ext4 disk whose serial
  is ``zoned-writable``. Either is ``nodev`` and not ``nosuid``: images
  carry setuid programs (``su``, ``passwd``) that a container runs as such.
  Its ``upper`` and ``work`` directories make the overlay's writable half.
  When it is full, writes fail with ENOSPC; the agent lives outside it.
- The overlay is mounted ``nodev``; ``/tmp`` is part of it (one limit for
  every write), made 1777 if the image has none. ``/proc``, ``/sys`` and
  ``/dev`` are mounted by the sandbox, in its own namespace.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

# Not typing.TYPE_CHECKING: typing alone costs ~0.3 s of guest boot under TCG
# (mypy treats any name TYPE_CHECKING as true).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Callable

#: The cgroup2 mount (see MOUNTS) under which every process gets its own cgroup.
CGROUP_ROOT = "/sys/fs/cgroup"

# mount(2) flags (linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000

# Bringing lo up (sys/socket.h, linux/sockios.h, net/if.h).
_AF_INET = 2
_SOCK_DGRAM = 2
_SOCK_CLOEXEC = 0o2000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

#: (source, target, fstype, flags, data), mounted in order.
MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755"),
    # Terminals of the processes that ask for one (devtmpfs's /dev/ptmx opens this instance).
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    # nsdelegate: a cgroup namespace is a delegation boundary (no process moves
    # into a cgroup outside its namespace's root; zoned.agent.sandbox).
    # favordynmods: every process the agent starts moves into a cgroup of its
    # own, and without it each move waits for an RCU grace period (the
    # threadgroup lock's writer side): ~12 ms of an exec under TCG. With it,
    # forks and exits pay a little more instead (docs/fast-start.md).
    (
        "cgroup2",
        CGROUP_ROOT,
        "cgroup2",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "nsdelegate,favordynmods",
    ),
)

#: The read-only workload image when no disk carries its serial: the first virtio disk.
WORKLOAD_DEVICE = "/dev/vda"
#: Where it is assembled: the image below, the writable layer above, merged.
WORKLOAD_BASE = "/run/workload"
#: Virtio serials of the image and of the scratch disk (zoned.domain names them).
IMAGE_SERIAL = "zoned-image"
WRITABLE_SERIAL = "zoned-writable"


def console(message: str) -> None:
    """One line on the console; never raises."""
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


def uptime_s() -> float:
    """Seconds since the guest kernel started."""
    with open("/proc/uptime", "rb") as f:
        return float(f.read().split()[0])


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


def stop_handling_signals() -> list[int]:
    """Put every signal that has a Python handler back to its default; returns them.

    As PID 1 that makes the agent deaf to every signal a workload can send it.
    """
    import _signal  # type: ignore[import-not-found]  # built in: no import cost

    restored = []
    for signum in range(1, _signal.NSIG):
        try:
            handler = _signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if callable(handler):
            _signal.signal(signum, _signal.SIG_DFL)
            restored.append(signum)
    return restored


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
    apply_hostname(names[-1])


def apply_hostname(name: bytes) -> bool:
    """Set the agent's own hostname; False (said on the console) if that failed."""
    if libc().sethostname(name, len(name)) != 0:
        console(f"cannot set the hostname: errno {ctypes.get_errno()}")
        return False
    return True


def bring_up_loopback() -> None:
    """``lo`` up (the kernel then gives it 127.0.0.1 and ::1), before any workload starts."""
    lib = libc()
    fd = lib.socket(_AF_INET, _SOCK_DGRAM | _SOCK_CLOEXEC, 0)
    if fd < 0:
        console(f"cannot bring lo up: socket: errno {ctypes.get_errno()}")
        return
    try:
        # struct ifreq: the name (IFNAMSIZ 16), then a union whose first short is the flags.
        ifreq = bytearray(b"lo".ljust(40, b"\0"))
        request = (ctypes.c_char * len(ifreq)).from_buffer(ifreq)
        if lib.ioctl(fd, _SIOCGIFFLAGS, request) != 0:
            console(f"cannot bring lo up: SIOCGIFFLAGS: errno {ctypes.get_errno()}")
            return
        flags = int.from_bytes(ifreq[16:18], sys.byteorder) | _IFF_UP
        ifreq[16:18] = flags.to_bytes(2, sys.byteorder)
        if lib.ioctl(fd, _SIOCSIFFLAGS, request) != 0:
            console(f"cannot bring lo up: SIOCSIFFLAGS: errno {ctypes.get_errno()}")
    finally:
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


def disks_by_serial(sys_block: str = "/sys/block") -> dict[str, str]:
    """``{serial: /dev/vdX}`` for the virtio disks that carry a serial."""
    found: dict[str, str] = {}
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return found
    for name in names:
        if not name.startswith("vd"):
            continue
        try:
            with open(f"{sys_block}/{name}/serial", "rb") as f:
                serial = f.read(64).strip().decode("ascii", "replace")
        except OSError:
            continue
        if serial:
            found.setdefault(serial, f"/dev/{name}")
    return found


def writable_layer(cmdline_path: str = "/proc/cmdline") -> tuple[str, int | None]:
    """The writable layer ``zoned.writable=`` asks for: ("tmpfs", MiB or None) or ("disk", None)."""
    try:
        with open(cmdline_path, "rb") as f:
            words = f.read().split()
    except OSError:
        words = []
    values = [w.split(b"=", 1)[1] for w in words if w.startswith(b"zoned.writable=")]
    value = values[-1].decode("ascii", "replace") if values else ""
    if value == "disk":
        return "disk", None
    kind, _, size = value.partition(":")
    if kind == "tmpfs" and size.isdigit() and int(size) > 0:
        return "tmpfs", int(size)
    return "tmpfs", None


def mount_workload_root(
    device: str = WORKLOAD_DEVICE,
    base: str = WORKLOAD_BASE,
    *,
    cmdline_path: str = "/proc/cmdline",
    sys_block: str = "/sys/block",
) -> str:
    """Mount the workload root (see the module docstring); returns it, or "" without a disk."""
    disks = disks_by_serial(sys_block)
    device = disks.get(IMAGE_SERIAL, device)
    if not os.path.exists(device):
        console(f"no workload disk at {device}: processes run in the agent's root")
        return ""
    kind, size_mib = writable_layer(cmdline_path)
    lower, rw, root = f"{base}/lower", f"{base}/rw", f"{base}/root"
    for path in (lower, rw, root):
        os.makedirs(path, exist_ok=True)
    mount(device, lower, "erofs", MS_RDONLY | MS_NODEV, "")
    if kind == "disk":
        scratch = disks.get(WRITABLE_SERIAL)
        if scratch is None:
            raise OSError(
                2, f"no disk with serial {WRITABLE_SERIAL}: the writable layer is missing"
            )
        mount(scratch, rw, "ext4", MS_NODEV, "")
        layer = f"the scratch disk {scratch}"
    else:
        options = "mode=0755" + (f",size={size_mib}m" if size_mib else "")
        mount("tmpfs", rw, "tmpfs", MS_NODEV, options)
        layer = f"a tmpfs of {size_mib} MiB" if size_mib else "a tmpfs"
    os.makedirs(f"{rw}/upper", mode=0o755, exist_ok=True)
    os.makedirs(f"{rw}/work", mode=0o700, exist_ok=True)
    mount(
        "overlay",
        root,
        "overlay",
        MS_NODEV,
        f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work",
    )
    # Never through a link of the image: lexists does not follow one.
    if not os.path.lexists(f"{root}/tmp"):
        os.mkdir(f"{root}/tmp")
        os.chmod(f"{root}/tmp", 0o1777)
    console(f"workload root {device} mounted at {root} over {layer} at {time.monotonic():.3f}s")
    return root


# The guest's workload root once mounted ("": there is none); mounted once per
# boot, whatever happens to the channels that use it.
_workload_root: str | None = None


def workload_root() -> str:
    """The root processes run in, mounted on the first call ("": none)."""
    global _workload_root
    if _workload_root is None:
        try:
            _workload_root = mount_workload_root()
        except BaseException:
            log_exception("workload root set-up failed; processes run in the agent's root")
            _workload_root = ""
        # A networked zone's IPv6 and resolver, before any workload starts.
        from zoned.agent.network import set_up_network

        set_up_network(_workload_root)
    return _workload_root
