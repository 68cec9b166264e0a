"""The hardened kernel command line of each profile (pure).

The daemon boots every zone with :func:`hardened_cmdline`. Every argument in
it does something on the pinned 6.12 kernel with our config: the kernel passes
parameters it does not know to init, as environment variables (``a=b``) or
arguments (``a``), so an argument for code that is compiled out is not merely
useless but lands in PID 1. (That is why there is no ``vsyscall=none``: the
vsyscall page is compiled out; no ``debugfs=off``: debugfs is compiled out;
no ``iommu=force``: there is no IOMMU driver to force, see hardening.config.)

Callers may add arguments of their own, but only from an allow-list of
arguments that cannot weaken the profile (:data:`ALLOWED_EXTRA`): anything
else is refused with ``invalid_request`` naming the argument. A deny-list
cannot work here: the kernel has hundreds of parameters (``norandmaps``,
``clearcpuid=``, ``slab_merge``, ``no_hash_pointers``, every mitigation's
``=off``), treats ``-`` and ``_`` in their names alike, and hands unknown
ones to init.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from zoned.errors import InternalError, InvalidRequest, NotFound

#: Arguments that 6.12 reads straight from the command line without
#: registering them as parameters, so the kernel also hands them to init as
#: environment variables (and says so in its log). They are kept because they
#: do act (both force the mitigation on beyond "auto"); the agent must not
#: take its environment from the kernel.
PASSED_TO_INIT = ("spectre_v2=on", "spec_store_bypass_disable=on")

# Boot parameters shared by every profile. Order is kept stable: the command
# line is part of golden domain XML.
_COMMON = (
    # The serial console is the zone's log.
    "console=ttyS0",
    # Fewer lines on the (slow, emulated) UART; errors (an OOM kill among them)
    # and worse still show, and a panic always does.
    "loglevel=4",
    # Every CPU mitigation on, and no SMT siblings shared inside the guest.
    "mitigations=auto,nosmt",
    "pti=on",
    *PASSED_TO_INIT,
    # Randomise the page allocator's free lists.
    "page_alloc.shuffle=1",
    # Memory hygiene and checks (also on by config; stated so the command line
    # is self-describing: 6.12 has no HARDENED_USERCOPY_DEFAULT_ON).
    # init_on_free is each profile's decision (below).
    "init_on_alloc=1",
    "slab_nomerge",
    "hardened_usercopy=on",
    "randomize_kstack_offset=on",
    "lockdown=confidentiality",
    # A kernel oops means the kernel's state can no longer be trusted: stop the
    # zone (panic -> reboot -> libvirt destroys it) rather than carry on.
    "oops=panic",
    "panic=-1",
    # sysctls applied by the kernel before init runs (KSPP's runtime settings;
    # kernel.kexec_load_disabled, vm.unprivileged_userfaultfd,
    # kernel.io_uring_disabled and kernel.modules_disabled are absent because
    # what they switch off is compiled out).
    "sysctl.kernel.kptr_restrict=2",
    "sysctl.kernel.dmesg_restrict=1",
    "sysctl.kernel.perf_event_paranoid=3",
    # KSPP asks for 3 (no ptrace at all); 2 keeps ptrace for CAP_SYS_PTRACE,
    # which workloads do not get, so the agent can still debug when asked.
    "sysctl.kernel.yama.ptrace_scope=2",
    "sysctl.kernel.randomize_va_space=2",
    # Too many WARNs in a row look like an exploit attempt: stop the zone.
    "sysctl.kernel.warn_limit=100",
    "sysctl.dev.tty.ldisc_autoload=0",
    "sysctl.dev.tty.legacy_tiocsti=0",
    "sysctl.fs.protected_fifos=2",
    "sysctl.fs.protected_regular=2",
    "sysctl.fs.protected_symlinks=1",
    "sysctl.fs.protected_hardlinks=1",
    "sysctl.fs.suid_dumpable=0",
    "sysctl.net.ipv4.tcp_syncookies=1",
    # Network namespaces that workloads get inherit the settings below
    # (IPv6 would otherwise start from the compiled-in defaults).
    "sysctl.net.core.devconf_inherit_init_net=1",
    "sysctl.net.ipv4.conf.all.accept_redirects=0",
    "sysctl.net.ipv4.conf.default.accept_redirects=0",
    "sysctl.net.ipv4.conf.all.send_redirects=0",
    "sysctl.net.ipv4.conf.default.send_redirects=0",
    "sysctl.net.ipv4.conf.all.accept_source_route=0",
    "sysctl.net.ipv4.conf.default.accept_source_route=0",
    "sysctl.net.ipv6.conf.all.accept_redirects=0",
    "sysctl.net.ipv6.conf.default.accept_redirects=0",
    "sysctl.net.ipv6.conf.all.accept_source_route=0",
    "sysctl.net.ipv6.conf.default.accept_source_route=0",
    # Free page reporting (the balloon, when the daemon gives one) in 2 MiB
    # blocks, the host's transparent huge page size, instead of the default
    # pageblock order's 4 MiB: more of an idle zone's free memory goes back.
    "page_reporting.page_reporting_order=9",
)

_PROFILE_EXTRA: dict[str, tuple[str, ...]] = {
    # No user namespaces and no BPF syscall (both compiled out); their sysctls
    # do not exist then, so nothing to set here.
    # init_on_free=0 (the config's default is on): a strict zone runs one
    # caller's workload and is discarded whole; init_on_alloc=1 still zeroes
    # every page and slab object before anyone gets it, so no allocation sees
    # a former owner's data. Wiping on free as well costs every zone all its
    # RAM resident from boot and ~0.2-0.9 s of its boot under TCG per 256 MiB
    # (docs/fast-start.md has the figures and the trade-off).
    "strict": ("init_on_free=0",),
    # Kept on here: this profile exists to run container runtimes, i.e.
    # several containers, not necessarily of one trust, sharing one guest
    # kernel; freed memory is wiped before a use-after-free or a stale read
    # can hand one container's data to another.
    # User namespaces exist but unprivileged BPF stays off (1: for good, not
    # even root may turn it back on) and the JIT is hardened.
    "containers": (
        "init_on_free=1",
        "sysctl.kernel.unprivileged_bpf_disabled=1",
        "sysctl.net.core.bpf_jit_harden=2",
    ),
}

PROFILES = tuple(_PROFILE_EXTRA)

_BOOL = r"(?:0|1|y|n|on|off)"

#: The arguments a caller may add: for each key, the pattern the whole argument
#: must match, the form shown in errors, and why it cannot weaken the profile.
#: Every key is a parameter the kernel knows (none reaches init), and none
#: changes a hardening setting or what the daemon reads from the console.
ALLOWED_EXTRA: dict[str, tuple[str, str, str]] = {
    "quiet": (r"quiet", "quiet", "console log level 4, the profile's own"),
    "loglevel": (
        r"loglevel=[4-7]",
        "loglevel=4..7",
        "more console output, never less than the errors the profile shows (4)",
    ),
    "printk.devkmsg": (
        r"printk\.devkmsg=(?:on|off|ratelimit)",
        "printk.devkmsg=on|off|ratelimit",
        "rate limit of user-space writes to /dev/kmsg (workloads have no /dev/kmsg)",
    ),
    "printk.time": (rf"printk\.time={_BOOL}", "printk.time=0|1", "timestamps on kernel messages"),
    "console_msg_format": (
        r"console_msg_format=(?:default|syslog)",
        "console_msg_format=default|syslog",
        "format of console lines",
    ),
    "log_buf_len": (
        r"log_buf_len=(?:[1-9]|1[0-6])[mM]",
        "log_buf_len=1M..16M",
        "size of the kernel log buffer, in the zone's own memory",
    ),
    "earlyprintk": (
        r"earlyprintk=(?:serial(?:,ttyS0)?|ttyS0)(?:,115200)?(?:,keep)?",
        "earlyprintk=serial|ttyS0[,115200][,keep]",
        "early boot messages on the zone's own serial port",
    ),
    "keep_bootcon": (r"keep_bootcon", "keep_bootcon", "keeps the early console (same port)"),
}

_ALLOWED_RE = {key: re.compile(pattern) for key, (pattern, _, _) in ALLOWED_EXTRA.items()}
_ALLOWED_FORMS = ", ".join(form for _, form, _ in ALLOWED_EXTRA.values())


def check_extra_args(extra: Sequence[str]) -> None:
    """Refuse every caller argument that is not on the allow-list, naming it.

    Each key may be given once (a repeat has no use, and this bounds the
    command line: the kernel silently truncates it past 2047 bytes).
    """
    seen: set[str] = set()
    for argument in extra:
        if argument == "--":
            raise InvalidRequest(
                "kernel argument '--' is not allowed: what follows it would be "
                "passed to the zone's init"
            )
        key = argument.split("=", 1)[0]
        pattern = _ALLOWED_RE.get(key)
        if pattern is None or pattern.fullmatch(argument) is None:
            raise InvalidRequest(
                f"kernel argument {argument!r} is not allowed: extra kernel arguments "
                f"must be one of: {_ALLOWED_FORMS}"
            )
        if key in seen:
            raise InvalidRequest(f"kernel argument {argument!r}: {key} is given twice")
        seen.add(key)


def hardened_cmdline(
    profile: str, machine: str, tsc_khz: int | None, extra: Sequence[str] = ()
) -> list[str]:
    """The full kernel command line for a zone of ``profile`` on ``machine``.

    ``tsc_khz`` is the host's TSC frequency; under TCG on microvm the guest
    cannot calibrate its clock reliably (about 40% of boots hang) unless it is
    told. Pass None where the accelerator is KVM (kvm-clock is exact there).
    ``extra`` are the caller's arguments, checked by :func:`check_extra_args`.

    An unknown profile is ``not_found`` (like a profile with no kernel built);
    an unknown machine type is a bug (requests and the config are validated
    before they get here); extra arguments off the allow-list are
    ``invalid_request``.
    """
    if profile not in _PROFILE_EXTRA:
        raise NotFound(f"unknown kernel profile {profile!r}; known: {', '.join(PROFILES)}")
    if machine not in ("microvm", "q35"):
        raise InternalError(f"unknown machine type {machine!r}; known: microvm, q35")
    check_extra_args(extra)
    args = [*_COMMON, *_PROFILE_EXTRA[profile]]
    if machine == "microvm":
        # microvm has no PCI host bridge: skip probing for one (and the
        # "PCI: Fatal: No config space access function found" it logs).
        args.append("pci=off")
    if tsc_khz is not None:
        args.append(f"tsc_early_khz={tsc_khz}")
    args.extend(extra)
    return args
