"""zonectl, the real command line (``python -m zoned.cli``), run against a test daemon."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from zoned.localdaemon import LocalDaemon

ZONECTL = [sys.executable, "-m", "zoned.cli"]
#: How long one zonectl run may take (a create or a run boots a zone under TCG).
ZONECTL_TIMEOUT_S = 180.0


def zonectl_argv(daemon: LocalDaemon, *args: str) -> list[str]:
    """The command line of ``zonectl args`` on ``daemon``'s socket."""
    return [*ZONECTL, "--socket", str(daemon.socket), *args]


def zonectl(
    daemon: LocalDaemon, *args: str, input: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Runs ``zonectl args`` to its end with ``input`` on its stdin (empty by
    default); its exit status and output, as bytes."""
    return _run(daemon, args, input, text=False)


def zonectl_text(daemon: LocalDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    """The same with an empty stdin, its output read as text."""
    return _run(daemon, args, "", text=True)


def _run(
    daemon: LocalDaemon, args: tuple[str, ...], input: bytes | str, *, text: bool
) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(
        zonectl_argv(daemon, *args),
        input=input,
        capture_output=True,
        text=text,
        timeout=ZONECTL_TIMEOUT_S,
        check=False,
    )
