"""Walking /proc: one file of every process, for tests that look for processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def each_process(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, bytes of /proc/<pid>/``name``) of every process, less those gone before
    their file was read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/{name}").read_bytes()
        except OSError:
            continue
        yield int(entry), data
