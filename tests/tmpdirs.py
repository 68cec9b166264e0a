"""Directories of the tests' own under /tmp, for what pytest's tmp_path does not suit."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def short_tmp_dir(prefix: str) -> Iterator[Path]:
    """A new directory ``/tmp/<prefix>...``, removed with all it holds on leaving.

    Short, where pytest's tmp_path is long: unix socket paths are limited to
    108 bytes. Below no mode 0700 directory, as tmp_path is: a QEMU running as
    another user can reach into it once it is made traversable.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
