"""Running a program inside a root tree the tests built (a staged root, an unpacked image)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

CHROOT = "/usr/sbin/chroot"

#: A guard against a hung program, not a timing assertion.
CHROOT_TIMEOUT_S = 60

DEFAULT_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root"}


def chroot(
    root: Path, *argv: str, env: Mapping[str, str] = DEFAULT_ENV
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted into ``root`` with only ``env``; its output as text, never checked."""
    return subprocess.run(
        [CHROOT, str(root), *argv],
        capture_output=True,
        text=True,
        timeout=CHROOT_TIMEOUT_S,
        check=False,
        env=dict(env),
    )
