"""The hardened kernel command line of each profile (pure).

The daemon boots every zone with :func:`hardened_cmdline`. Callers may add
their own arguments, but none that would undo a hardening choice: an extra
argument that names a key we set, or one of the known switches that weaken
the kernel, is refused with ``invalid_request``.
"""

from __future__ import annotations

from collections.abc import Sequence

from zoned.errors import InternalError, InvalidRequest, NotFound

# Boot parameters shared by every profile. Order is kept stable: the command
# line is part of golden domain XML.
_COMMON = (
    # The serial console is the zone's log.
    "console=ttyS0",
    # Fewer lines on the (slow, emulated) UART; warnings and worse still show.
    "loglevel=4",
    # Every CPU mitigation on, and no SMT siblings shared inside the guest.
    "mitigations=auto,nosmt",
    "pti=on",
    "spectre_v2=on",
    "spec_store_bypass_disable=on",
    # Randomise the page allocator's free lists.
    "page_alloc.shuffle=1",
    # Force DMA through the IOMMU/bounce buffers rather than trusting devices.
    "iommu=force",
    # Memory hygiene (also on by config; stated so the command line is self-describing).
    "init_on_alloc=1",
    "init_on_free=1",
    "slab_nomerge",
    "randomize_kstack_offset=on",
    "vsyscall=none",
    "debugfs=off",
    "lockdown=confidentiality",
    # A kernel oops means the kernel's state can no longer be trusted: stop the
    # zone (panic -> reboot -> libvirt destroys it) rather than carry on.
    "oops=panic",
    "panic=-1",
    # sysctls applied by the kernel before init runs.
    "sysctl.kernel.kptr_restrict=2",
    "sysctl.kernel.dmesg_restrict=1",
    "sysctl.kernel.perf_event_paranoid=3",
    "sysctl.kernel.yama.ptrace_scope=2",
    "sysctl.fs.protected_fifos=2",
    "sysctl.fs.protected_regular=2",
    "sysctl.fs.protected_symlinks=1",
    "sysctl.fs.protected_hardlinks=1",
    "sysctl.fs.suid_dumpable=0",
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
)

_PROFILE_EXTRA: dict[str, tuple[str, ...]] = {
    # No user namespaces (also compiled out); the sysctl does not exist then,
    # so nothing to set here.
    "strict": (),
    # User namespaces exist but unprivileged BPF stays off and the JIT is hardened.
    "containers": (
        "sysctl.kernel.unprivileged_bpf_disabled=1",
        "sysctl.net.core.bpf_jit_harden=2",
    ),
}

PROFILES = tuple(_PROFILE_EXTRA)

# Switches that weaken the kernel; never accepted from a caller.
_WEAKENING = frozenset(
    {
        "init",
        "rdinit",
        "nokaslr",
        "nopti",
        "nosmap",
        "nosmep",
        "noexec",
        "noibrs",
        "noibpb",
        "nospectre_v1",
        "nospectre_v2",
        "nospectre_bhb",
        "nospec_store_bypass_disable",
        "mds",
        "tsx_async_abort",
        "l1tf",
        "retbleed",
        "srbds",
        "gather_data_sampling",
        "reg_file_data_sampling",
        "spectre_bhi",
        "spec_rstack_overflow",
        "kfence.sample_interval",
        "hardened_usercopy",
        "lsm",
        "security",
        "module_blacklist",
        "efi",
        "memmap",
        "mem",
        "iomem",
        "sysrq_always_enabled",
        "kgdboc",
        "kgdbwait",
        "ignore_loglevel",
        "cgroup_disable",
        "unknown_nmi_panic",
    }
)


def _key(argument: str) -> str:
    return argument.split("=", 1)[0]


_COMMON_KEYS = frozenset(_key(a) for a in _COMMON) | frozenset(
    _key(a) for extra in _PROFILE_EXTRA.values() for a in extra
)


def check_extra_args(extra: Sequence[str]) -> None:
    """Refuse caller arguments that could undo the hardened command line."""
    for argument in extra:
        if not argument or any(c.isspace() or c == "\0" for c in argument):
            raise InvalidRequest(f"kernel argument {argument!r} is empty or contains whitespace")
        key = _key(argument)
        if key in _COMMON_KEYS or key.startswith("sysctl.") or key in _WEAKENING:
            raise InvalidRequest(
                f"kernel argument {argument!r} is not allowed: {key!r} is set by the "
                "hardened command line or would weaken it"
            )


def hardened_cmdline(
    profile: str, machine: str, tsc_khz: int | None, extra: Sequence[str] = ()
) -> list[str]:
    """The full kernel command line for a zone of ``profile`` on ``machine``.

    ``tsc_khz`` is the host's TSC frequency; under TCG on microvm the guest
    cannot calibrate its clock reliably (about 40% of boots hang) unless it is
    told. Pass None where the accelerator is KVM (kvm-clock is exact there).

    An unknown profile is ``not_found`` (like a profile with no kernel built);
    an unknown machine type is a bug (requests and the config are validated
    before they get here); weakening extra arguments are ``invalid_request``.
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
