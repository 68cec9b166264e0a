"""The hardened kernel command line and the allow-list for callers' arguments (pure)."""

from __future__ import annotations

import pytest

from zoned.errors import InternalError, InvalidRequest, NotFound
from zoned.kernel.cmdline import ALLOWED_EXTRA, PROFILES, hardened_cmdline
from zoned.net.addressing import NetPools, kernel_ip_argument, zone_addressing

#: x86's COMMAND_LINE_SIZE, terminating NUL included.
COMMAND_LINE_SIZE = 2048
#: A zone whose ip= argument is as long as they get (15-character addresses).
LONGEST_ADDRESSING = zone_addressing(NetPools(pool_v4="100.100.100.0/24"), 63)


def test_strict_has_hardening_and_no_bpf_sysctls() -> None:
    args = hardened_cmdline("strict", "q35", None)
    for required in (
        "mitigations=auto,nosmt",
        "page_alloc.shuffle=1",
        "pti=on",
        "hardened_usercopy=on",
        "oops=panic",
        "sysctl.kernel.kptr_restrict=2",
        "sysctl.kernel.yama.ptrace_scope=2",
        "sysctl.fs.protected_symlinks=1",
        "sysctl.net.ipv4.conf.all.accept_redirects=0",
        "sysctl.net.ipv4.tcp_syncookies=1",
        "sysctl.dev.tty.legacy_tiocsti=0",
        "console=ttyS0",
    ):
        assert required in args
    assert not any("bpf" in a for a in args)
    assert not any(a.startswith("tsc_early_khz") for a in args)


def test_no_argument_for_code_that_is_compiled_out() -> None:
    """Unknown parameters reach init (as environment or argv): none may be here."""
    for profile in PROFILES:
        keys = {a.split("=", 1)[0] for a in hardened_cmdline(profile, "microvm", 1)}
        assert not keys & {"iommu", "vsyscall", "debugfs"}, profile


def test_containers_adds_bpf_hardening() -> None:
    args = hardened_cmdline("containers", "microvm", 2_000_000)
    assert "sysctl.kernel.unprivileged_bpf_disabled=1" in args
    assert "sysctl.net.core.bpf_jit_harden=2" in args
    assert "tsc_early_khz=2000000" in args


@pytest.mark.parametrize(
    "allowed",
    [
        "quiet",
        "loglevel=7",
        "loglevel=4",
        "printk.devkmsg=on",
        "printk.devkmsg=ratelimit",
        "printk.time=1",
        "console_msg_format=syslog",
        "log_buf_len=16M",
        "earlyprintk=serial,ttyS0,115200",
        "earlyprintk=ttyS0,keep",
        "keep_bootcon",
    ],
)
def test_allowed_extra_args_are_appended(allowed: str) -> None:
    assert hardened_cmdline("strict", "q35", None, [allowed])[-1] == allowed


@pytest.mark.parametrize(
    "weakening",
    [
        # Found in issue 11 (finding 4): each got through the old deny-list.
        "norandmaps",
        "clearcpuid=smap,smep",
        "cfi=off",
        "ibt=off",
        "slab_merge",
        "no_hash_pointers",
        "zoned.zone=other",
        # Every mitigation's =off, and the rest of the well-known switches.
        "mitigations=off",
        "pti=off",
        "nopti",
        "spectre_v2=off",
        "spectre_bhi=off",
        "spec_store_bypass_disable=off",
        "retbleed=off",
        "spec_rstack_overflow=off",
        "gather_data_sampling=off",
        "mds=off",
        "nokaslr",
        "nosmap",
        "init_on_free=0",
        "hardened_usercopy=off",
        "randomize_kstack_offset=off",
        "lockdown=none",
        "oops=continue",
        "panic=10",
        "kfence.sample_interval=0",
        "iommu=off",
        "sysctl.kernel.kptr_restrict=0",
        "sysctl.kernel.yama.ptrace_scope=0",
        "slub_debug=-",
        "page_alloc.shuffle=0",
        # The kernel treats - and _ alike in parameter names.
        "slab-merge",
        "spec-store-bypass-disable=off",
        # Less console output than the profile's (would hide the errors the
        # daemon reads to say why a zone failed).
        "loglevel=0",
        "loglevel=3",
        # Init and what reaches it: an init of one's own, environment
        # variables, arguments, and '--' (everything after goes to init).
        "init=/bin/sh",
        "rdinit=/bin/sh",
        "PATH=/evil",
        "LD_PRELOAD=/tmp/x.so",
        "single",
        "--",
        # Console and the daemon's own arguments.
        "console=hvc0",
        "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",  # the daemon's alone
        "tsc_early_khz=1",
        # Allowed keys with values outside their forms, quotes that would
        # swallow the following arguments, and malformed arguments.
        "loglevel=7x",
        'loglevel="7',
        "log_buf_len=1G",
        "printk.devkmsg=on extra",
        "earlyprintk=vga",
        "quiet=1",
        "a b",
        "",
    ],
)
def test_arguments_off_the_allow_list_are_refused_by_name(weakening: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        hardened_cmdline("strict", "q35", None, ["quiet", weakening])
    assert f"kernel argument {weakening!r} is not allowed" in str(info.value)


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="loglevel is given twice"):
        hardened_cmdline("strict", "q35", None, ["loglevel=5", "loglevel=7"])


def test_refusal_lists_what_is_allowed() -> None:
    with pytest.raises(InvalidRequest, match=r"loglevel=4\.\.7"):
        hardened_cmdline("containers", "microvm", None, ["norandmaps"])


def test_longest_command_line_fits_the_kernel() -> None:
    """Every profile plus the daemon's own arguments and a caller's longest
    allowed extras stays under x86's limit (the kernel truncates silently)."""
    extras = [
        "quiet",
        "loglevel=7",
        "printk.devkmsg=ratelimit",
        "printk.time=off",
        "console_msg_format=default",
        "log_buf_len=16M",
        "earlyprintk=serial,ttyS0,115200,keep",
        "keep_bootcon",
    ]
    assert len(extras) == len(ALLOWED_EXTRA)
    for profile in PROFILES:
        args = hardened_cmdline(profile, "microvm", 9_999_999, extras)
        args += ["zoned.zone=" + "z" * 63]
        args += [kernel_ip_argument(LONGEST_ADDRESSING, "eth0")]
        assert len(" ".join(args)) < COMMAND_LINE_SIZE, profile


def test_every_allowed_key_has_a_reason() -> None:
    for key, (pattern, form, why) in ALLOWED_EXTRA.items():
        assert pattern.startswith(key.replace(".", "\\.")) and form.startswith(key) and why


def test_unknown_profile_and_machine() -> None:
    with pytest.raises(NotFound, match="unknown kernel profile"):
        hardened_cmdline("lax", "q35", None)
    with pytest.raises(InternalError, match="unknown machine"):
        hardened_cmdline("strict", "pc", None)
