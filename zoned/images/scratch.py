"""Per-zone scratch disks: the ``disk`` kind of writable layer.

A scratch disk is a sparse file of the size the zone asked for, formatted as
ext4 on the host (``mkfs.ext4`` from e2fsprogs) and attached to that zone
alone as its second virtio disk; the guest agent mounts it as the upper
layer of the zone's overlay. Nothing of an image is copied onto it: a fresh
disk costs its metadata (a few MiB of a 4 GiB one), whatever the size.

- The file is made in ``scratch_dir`` (0711, root's: QEMU opens the file by
  path, nobody lists the directory), named after the zone and its uuid,
  owned by the uid and gid QEMU runs the zone as and mode 0600: that QEMU
  alone may read or write it. libvirt does not relabel it.
- ``mkfs.ext4`` writes no journal (the disk dies with its zone: there is
  nothing to recover) and reserves no blocks for root (workloads usually
  run as root, and a full disk must say ENOSPC at the size the zone asked
  for); its inode tables are initialised lazily by the guest.
- A half-made disk is removed before the error is raised; the zone manager
  removes the disk with its zone, after a failed create, and at start-up
  for zones that are gone (:func:`remove_stale`).

Blocking: run in a worker thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import Final

from zoned.errors import InternalError

MKFS_EXT4: Final = "mkfs.ext4"
SUFFIX: Final = ".ext4"
#: The ext4 options: no journal, no reserved blocks, lazy inode tables.
MKFS_OPTIONS: Final = (
    "-q",
    "-F",
    "-O",
    "^has_journal",
    "-m",
    "0",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
)
MKFS_TIMEOUT_S: Final = 120.0


class ScratchDiskError(InternalError):
    """The host could not make a scratch disk (no mkfs.ext4, no space)."""


def scratch_path(directory: Path, zone: str, uuid: str) -> Path:
    """Where zone ``zone`` (of uuid ``uuid``) keeps its scratch disk (pure)."""
    return directory / f"{zone}-{uuid}{SUFFIX}"


def mkfs_argv(path: Path, label: str) -> list[str]:
    """The ``mkfs.ext4`` command line for a scratch disk (pure)."""
    return [MKFS_EXT4, *MKFS_OPTIONS, "-L", label[:16], str(path)]


def _prepare_directory(directory: Path) -> None:
    # QEMU opens the disk by path: it must traverse the directory, not list it.
    directory.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(directory, 0o711)


def create_scratch_disk(path: Path, size_mib: int, owner: tuple[int, int] | None) -> Path:
    """A fresh ext4 file of ``size_mib`` MiB at ``path``, owned by ``owner`` (uid, gid)."""
    if shutil.which(MKFS_EXT4) is None:
        raise ScratchDiskError(f"{MKFS_EXT4} is missing: install Debian's e2fsprogs")
    _prepare_directory(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # never another zone's disk: nothing of ours to remove
        raise ScratchDiskError(f"cannot make the scratch disk {path}: {exc}") from exc
    try:
        try:
            os.ftruncate(fd, size_mib * 1024 * 1024)
        finally:
            os.close(fd)
        result = subprocess.run(
            mkfs_argv(path, "zoned-writable"),
            capture_output=True,
            text=True,
            timeout=MKFS_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise ScratchDiskError(
                f"mkfs.ext4 failed on {path}: {result.stderr.strip()[-1000:] or result.returncode}"
            )
        if owner is not None:
            os.chown(path, *owner)
        os.chmod(path, 0o600)
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError | subprocess.TimeoutExpired):
            raise ScratchDiskError(f"cannot make the scratch disk {path}: {exc}") from exc
        raise
    return path


def remove_scratch_disk(path: Path) -> None:
    """Remove a zone's scratch disk (nothing if it is gone already)."""
    path.unlink(missing_ok=True)


def remove_stale(directory: Path, keep: Collection[Path]) -> list[Path]:
    """Remove every scratch disk in ``directory`` that ``keep`` does not name; the removed."""
    if not directory.is_dir():
        return []
    wanted = {str(p) for p in keep}
    removed = []
    for entry in sorted(directory.iterdir()):
        if entry.name.endswith(SUFFIX) and str(entry) not in wanted and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
