"""The hardened kernel command line (pure)."""

from __future__ import annotations

import pytest

from zoned.errors import InternalError, InvalidRequest, NotFound
from zoned.kernel.cmdline import hardened_cmdline


def test_strict_has_hardening_and_no_bpf_sysctls() -> None:
    args = hardened_cmdline("strict", "q35", None)
    for required in (
        "mitigations=auto,nosmt",
        "page_alloc.shuffle=1",
        "iommu=force",
        "pti=on",
        "sysctl.kernel.kptr_restrict=2",
        "sysctl.kernel.yama.ptrace_scope=2",
        "sysctl.fs.protected_symlinks=1",
        "sysctl.net.ipv4.conf.all.accept_redirects=0",
        "console=ttyS0",
    ):
        assert required in args
    assert not any("bpf" in a for a in args)
    assert not any(a.startswith("tsc_early_khz") for a in args)


def test_containers_adds_bpf_hardening() -> None:
    args = hardened_cmdline("containers", "microvm", 2_000_000)
    assert "sysctl.kernel.unprivileged_bpf_disabled=1" in args
    assert "sysctl.net.core.bpf_jit_harden=2" in args
    assert "tsc_early_khz=2000000" in args


def test_extra_args_are_appended() -> None:
    assert hardened_cmdline("strict", "q35", None, ["quiet"])[-1] == "quiet"


@pytest.mark.parametrize(
    "bad", ["mitigations=off", "nokaslr", "init=/bin/sh", "sysctl.kernel.sysrq=1", "a b", ""]
)
def test_weakening_or_malformed_extra_args_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        hardened_cmdline("strict", "q35", None, [bad])


def test_unknown_profile_and_machine() -> None:
    with pytest.raises(NotFound, match="unknown kernel profile"):
        hardened_cmdline("lax", "q35", None)
    with pytest.raises(InternalError, match="unknown machine"):
        hardened_cmdline("strict", "pc", None)
