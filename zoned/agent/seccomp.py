"""The seccomp filter of every workload process: allow all but what no workload needs.

A classic BPF program (``struct sock_filter``), written here rather than
taken from libseccomp (the boot image is the host's Python with a traced
stdlib: no new C extension), installed by :mod:`zoned.agent.sandbox` in the
forked child before it drops its capabilities, so it needs no
``no_new_privs``. It is default-allow, like a container runtime's profile
inverted: ordinary programs never meet it, and what it denies is what
Docker's default profile denies that matters in a zone.

Rules, in order
---------------
1. A system call of another architecture than x86_64 kills the process
   (the zone's kernels have no 32-bit emulation; a filter that looked only
   at numbers would mistake another ABI's calls for x86_64's).
2. The x32 ABI's numbers (bit 30 set) fail with ``ENOSYS``.
3. Each call in :data:`DENIED` fails with its errno: ``EPERM`` for what the
   kernel has but a workload must not use, ``ENOSYS`` for what our kernels
   leave out anyway (a program then sees the same as on such a kernel, and
   falls back as it would there).
4. Everything else is allowed.

Capabilities already refuse most of these (no ``CAP_SYS_ADMIN``,
``CAP_SYS_PTRACE``, ``CAP_SYS_MODULE``, ``CAP_SYS_BOOT``...); the filter is
the second wall, and the one that holds for calls no capability guards
(``userfaultfd``, ``io_uring``, ``keyctl``). ``clone``/``unshare``/``mount``
are left to capabilities: in the ``containers`` profile user namespaces are
the point.

Pure: imports only :mod:`struct`; :func:`program` is computed once.
"""

from __future__ import annotations

import struct

EPERM = 1
ENOSYS = 38

#: ``AUDIT_ARCH_X86_64``: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
AUDIT_ARCH_X86_64 = 0xC000003E
#: x32 system calls are numbered from here (``__X32_SYSCALL_BIT``).
X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
# Offsets in struct seccomp_data.
_NR = 0
_ARCH = 4

#: name -> (x86_64 number, errno), in the order the filter tests them.
DENIED: dict[str, tuple[int, int]] = {
    # Another kernel, modules, raw IO, power, swap, accounting, the kernel log.
    "kexec_load": (246, EPERM),
    "kexec_file_load": (320, EPERM),
    "init_module": (175, EPERM),
    "finit_module": (313, EPERM),
    "delete_module": (176, EPERM),
    "iopl": (172, EPERM),
    "ioperm": (173, EPERM),
    "reboot": (169, EPERM),
    "swapon": (167, EPERM),
    "swapoff": (168, EPERM),
    "acct": (163, EPERM),
    "syslog": (103, EPERM),
    # Files by handle: the "shocker" escape from a container's root.
    "open_by_handle_at": (304, EPERM),
    # Other processes' memory, descriptors and state.
    "ptrace": (101, EPERM),
    "process_vm_readv": (310, EPERM),
    "process_vm_writev": (311, EPERM),
    "pidfd_getfd": (438, EPERM),
    "kcmp": (312, EPERM),
    # Kernel attack surface no workload needs here.
    "bpf": (321, EPERM),
    "perf_event_open": (298, EPERM),
    "userfaultfd": (323, EPERM),
    # Left out of our kernels: the same answer the kernel would give.
    "add_key": (248, ENOSYS),
    "request_key": (249, ENOSYS),
    "keyctl": (250, ENOSYS),
    "io_uring_setup": (425, ENOSYS),
    "io_uring_enter": (426, ENOSYS),
    "io_uring_register": (427, ENOSYS),
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter as an array of ``struct sock_filter`` (see the module rules)."""
    insns = [
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _NR),
        _insn(_JGE_K, 0, 1, X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),
    ]
    for number, errno in DENIED.values():
        insns.append(_insn(_JEQ_K, 0, 1, number))
        insns.append(_insn(_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno))
    insns.append(_insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(insns)
