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


@pytest.mark.parametrize(
    ("profile", "stream", "message"),
    [
        # A requested option whose dependency is off is named with it.
        (
            "unsatisfiable",
            "stdout",
            "MISMATCH CONFIG_RANDOMIZE_BASE: asked for y, got n; "
            "unmet: depends on RELOCATABLE (RELOCATABLE=n)",
        ),
        # A symbol no Kconfig defines is a mistake, not an "n".
        (
            "unknown",
            "stdout",
            "MISMATCH CONFIG_ZONED_NO_SUCH_SYMBOL: asked for y, but no Kconfig defines it",
        ),
        # Refused and requested at once: fails before configuring.
        (
            "contradiction",
            "stderr",
            "contradiction.config:3: CONFIG_SYN_COOKIES=y is listed as not taken, "
            "but contradiction.config:6 requests it",
        ),
    ],
)
def test_bad_profile_fails_naming_the_problem(profile: str, stream: str, message: str) -> None:
    result = verify(profile, FIXTURES)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in getattr(result, stream), result.stdout + result.stderr


@pytest.mark.parametrize("profile", ["strict", "containers"])
def test_shipped_profiles_verify(profile: str) -> None:
    result = verify(profile)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{profile}: " in result.stdout and " 0 mismatches" in result.stdout
