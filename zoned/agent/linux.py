"""The Linux system calls the agent needs that Python 3.11's :mod:`os` lacks, through ctypes.

Each wrapper raises :class:`OSError` with the call's errno, like :mod:`os`;
two small helpers of the spawner and the sandbox come last.
Numbers are x86_64's (the only architecture zones run). Safe to call in a
forked child before ``exec``: nothing here allocates beyond small ctypes
objects, and the C library is loaded by the parent (:func:`zoned.agent.system.libc`).
"""

from __future__ import annotations

import ctypes
import os

from zoned.agent.system import libc

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000

# umount2 flags.
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# prctl options.
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_MM = 35
PR_SET_MM_ARG_START = 8
PR_SET_MM_ARG_END = 9
PR_SET_NO_NEW_PRIVS = 38

# mount_setattr (linux/mount.h).
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

_SYS_CAPSET = 126
SYS_MOUNT = 165
SYS_SETNS = 308
SYS_UNSHARE = 272
SYS_PRCTL = 157
_SYS_PIVOT_ROOT = 155
_SYS_UMOUNT2 = 166
_SYS_SECCOMP = 317
_SYS_PIDFD_GETFD = 438
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_SECCOMP_SET_MODE_FILTER = 1
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def syscall(number: int, *args: object) -> int:
    """``syscall(2)`` with integer, bytes or ctypes arguments; :class:`OSError` on failure."""
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result: int = libc().syscall(ctypes.c_long(number), *converted)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


class Prepared:
    """One system call with its arguments converted once, for a forked child to make
    cheaply: every object Python touches or allocates in the child costs a
    copy-on-write page fault (under TCG a large part of starting a process)."""

    __slots__ = ("_args", "_function")

    def __init__(self, number: int, *args: object) -> None:
        self._function = libc().syscall
        self._args = (
            ctypes.c_long(number),
            *(ctypes.c_long(a) if isinstance(a, int) else a for a in args),
        )

    def __call__(self) -> None:
        if self._function(*self._args) == -1:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


def unshare(flags: int) -> None:
    syscall(SYS_UNSHARE, flags)


def setns(fd: int, nstype: int) -> None:
    """Join the namespaces ``nstype`` of ``fd`` (a namespace file, or a pidfd: several at once)."""
    syscall(SYS_SETNS, fd, nstype)


def pivot_root(new_root: str, put_old: str) -> None:
    syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode())


def umount2(target: str, flags: int) -> None:
    syscall(_SYS_UMOUNT2, target.encode(), flags)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return syscall(SYS_PRCTL, option, arg2, arg3, arg4, arg5)


def set_mount_attributes(path: str, attr_set: int, *, recursive: bool) -> None:
    """``mount_setattr(2)``: add ``attr_set`` (``MOUNT_ATTR_*``) to the mount at ``path``."""
    # struct mount_attr { u64 attr_set, attr_clr, propagation, userns_fd; }
    attr = (ctypes.c_uint64 * 4)(attr_set, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, attr, ctypes.sizeof(attr))


class CapabilitySets:
    """Effective, permitted and inheritable sets (bit masks of capability numbers),
    built once, set on the calling thread by calling ``apply`` (``capset(2)``)."""

    def __init__(self, effective: int, permitted: int, inheritable: int) -> None:
        self._header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        # Two struct __user_cap_data_struct: the low 32 capabilities, then the high.
        self._data = (ctypes.c_uint32 * 6)(
            effective & 0xFFFFFFFF,
            permitted & 0xFFFFFFFF,
            inheritable & 0xFFFFFFFF,
            effective >> 32,
            permitted >> 32,
            inheritable >> 32,
        )

        self.apply = Prepared(_SYS_CAPSET, self._header, self._data)


class FilterProgram:
    """A classic BPF program as ``struct sock_fprog``, built once, installed in children."""

    def __init__(self, instructions: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(instructions, len(instructions))

        class _Fprog(ctypes.Structure):
            _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

        self._fprog = _Fprog(len(instructions) // 8, ctypes.addressof(self._buffer))
        #: ``seccomp(SECCOMP_SET_MODE_FILTER)`` on the calling thread (needs
        #: ``CAP_SYS_ADMIN`` or ``no_new_privs``).
        self.install = Prepared(
            _SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, 0, ctypes.pointer(self._fprog)
        )


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate (close-on-exec) of descriptor ``target_fd`` of the process of ``pidfd``."""
    return syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)


def read_to_eof(fd: int) -> bytes:
    """All ``fd`` gives until end of file (a pipe the other end closes)."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def waitpid_exactly(pid: int) -> None:
    """Reap ``pid``, a child known to be ending (gone already: fine)."""
    try:  # noqa: SIM105 (contextlib costs boot time in the guest)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
