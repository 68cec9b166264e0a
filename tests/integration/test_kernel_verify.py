"""The kernel build's verification against the real 6.12 source tree.

These run ``zoned-kernel verify`` (allnoconfig + fragments + olddefconfig, no
compile) on fixture profiles that must fail, and on the shipped profiles,
which must pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoned.kernel.build import DEFAULT_CACHE

FIXTURES = Path(__file__).parent.parent / "data" / "guest-kernel-bad"
#: Where the unpacked source is (and verify's scratch output goes).
KERNEL_CACHE = Path(os.environ.get("ZONED_KERNEL_CACHE", str(DEFAULT_CACHE)))

pytestmark = pytest.mark.integration


def verify(profile: str, guest_kernel_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "zoned.kernel.build", "verify", "--profile", profile]
    argv += ["--cache", str(KERNEL_CACHE)]
    if guest_kernel_dir is not None:
        argv += ["--guest-kernel-dir", str(guest_kernel_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)


def test_unsatisfiable_option_is_named_with_its_unmet_dependency() -> None:
    result = verify("unsatisfiable", FIXTURES)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "MISMATCH CONFIG_RANDOMIZE_BASE: asked for y, got n; "
        "unmet: depends on RELOCATABLE (RELOCATABLE=n)"
    ) in result.stdout, result.stdout + result.stderr


def test_unknown_symbol_fails() -> None:
    result = verify("unknown", FIXTURES)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "MISMATCH CONFIG_ZONED_NO_SUCH_SYMBOL: asked for y, but no Kconfig defines it"
        in result.stdout
    ), result.stdout + result.stderr


def test_not_taken_and_requested_fails_before_configuring() -> None:
    result = verify("contradiction", FIXTURES)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "contradiction.config:3: CONFIG_SYN_COOKIES=y is listed as not taken, "
        "but contradiction.config:6 requests it"
    ) in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("profile", ["strict", "containers"])
def test_shipped_profiles_verify(profile: str) -> None:
    result = verify(profile)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{profile}: " in result.stdout and " 0 mismatches" in result.stdout
