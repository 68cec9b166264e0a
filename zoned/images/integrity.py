"""Shared images: root-owned, read-only, and checked against their recorded hash before use.

Every zone boots files that every other zone boots too: the guest kernel, the
agent's boot image, the workload root (and, later, OCI images as EROFS). A
zone whose QEMU could write one of them would own every zone started after
it, so:

- They belong to root and nobody else may write them: files 0644, and every
  directory above them owned by root and writable by nobody else (a sticky
  directory such as ``/tmp`` is accepted: there only an entry's owner may
  replace it). libvirt never relabels them (:mod:`zoned.domain`:
  ``relabel='no'``).
- Their sha256 is recorded where they are made: the kernel's in its
  manifest, the images' in a ``<image>.sha256`` file beside them
  (:func:`write_recorded_sha256`, ``sha256sum`` format). A zone starts only
  after :meth:`ImageVerifier.check` found each file it boots to match.
- A file found owned by someone else or writable by others (libvirt gave it
  to QEMU's user before zones had uids of their own) is checked by hash and,
  if it matches, given back to root (logged); if it does not match it is
  refused like any other changed file.

The check caches what it hashed under the file's (device, inode, size,
mtime, ctime). Writing to a file moves its mtime and ctime; putting the
mtime back (``touch -d``, ``utime``) moves the ctime, which no unprivileged
call can set; replacing the file changes the inode. So any change through
the file system is seen at the next start, and the cost of a zone start is
a few ``stat`` calls instead of reading ~100 MB (measured here: the
kernel 5-15 ms, the boot image 15-30 ms, the workload root 75-185 ms, warm
and cold). Root writing the raw block device underneath is not seen; root
is trusted.

Blocking (file reads): call from worker threads. One :class:`ImageVerifier`
may be used from several threads at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zoned.errors import IntegrityError

log = logging.getLogger(__name__)

#: Suffix of the file that records an image's sha256 beside it.
SHA256_SUFFIX: Final = ".sha256"
FILE_MODE: Final = 0o644
_UNSAFE_WRITE: Final = stat.S_IWGRP | stat.S_IWOTH


def sha256_of(path: Path) -> str:
    """The sha256 of a file's contents, in hex."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def recorded_sha256_path(image: Path) -> Path:
    return image.with_name(image.name + SHA256_SUFFIX)


def write_recorded_sha256(image: Path, digest: str) -> None:
    """Record ``digest`` as the sha256 of ``image`` (atomically, root-owned 0644)."""
    target = recorded_sha256_path(image)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(f"{digest}  {image.name}\n")
    temporary.chmod(FILE_MODE)
    os.replace(temporary, target)


def read_recorded_sha256(image: Path) -> str | None:
    """The sha256 recorded beside ``image``, or None if none (or a malformed one) is."""
    try:
        text = recorded_sha256_path(image).read_text()
    except FileNotFoundError:
        return None
    digest, _, name = text.strip().partition("  ")
    if name != image.name or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        return None
    return digest


def seal(path: Path) -> None:
    """Give ``path`` to root, mode 0644 (owner first: then chmod needs no CAP_FOWNER)."""
    os.chown(path, 0, 0, follow_symlinks=False)
    os.chmod(path, FILE_MODE)


def unsafe_directory(directory: Path) -> str | None:
    """Why a directory on a shared image's path lets others replace what it holds, or None.

    A symlink is judged by its own directory (checked on its own) and its
    target (checked on the resolved path).
    """
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode):
        return None
    if info.st_uid != 0:
        return f"directory {directory} belongs to uid {info.st_uid}, not root"
    if info.st_mode & _UNSAFE_WRITE and not info.st_mode & stat.S_ISVTX:
        return f"directory {directory} is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


@dataclass(frozen=True)
class _Seen:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> _Seen:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class ImageVerifier:
    """Checks shared files before a zone boots them; remembers what it hashed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verified: dict[Path, tuple[_Seen, str]] = {}
        #: How many times a file was hashed (the rest were cache hits).
        self.hashed = 0

    def check(self, path: Path, expected_sha256: str, what: str) -> None:
        """Refuse (``IntegrityError``, naming the file) unless ``path`` is a
        root-owned, read-only regular file in safe directories whose sha256 is
        ``expected_sha256``."""
        given = Path(os.path.abspath(path))
        try:
            path = given.resolve(strict=True)
        except (FileNotFoundError, RuntimeError):
            raise IntegrityError(f"{what} {given} is missing") from None
        for directory in (*reversed(given.parents), *reversed(path.parents)):
            why = unsafe_directory(directory)
            if why is not None:
                raise IntegrityError(f"{what} {given} cannot be trusted: {why}")
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{what} {path} is not a regular file")
        seen = _Seen.of(info)
        with self._lock:
            cached = self._verified.get(path)
        if cached == (seen, expected_sha256) and self._sealed(info):
            return
        actual = sha256_of(path)
        self.hashed += 1
        if actual != expected_sha256:
            raise IntegrityError(
                f"{what} {path} has changed: its sha256 is {actual}, its manifest records"
                f" {expected_sha256}; refusing to boot it (restore or rebuild it)"
            )
        if not self._sealed(info):
            log.warning(
                "%s %s was owned by uid %d with mode %o; its hash matches: giving it back to root",
                what,
                path,
                info.st_uid,
                stat.S_IMODE(info.st_mode),
            )
            seal(path)
            after = path.lstat()
            if (after.st_size, after.st_mtime_ns) != (info.st_size, info.st_mtime_ns):
                raise IntegrityError(f"{what} {path} changed while it was being checked")
            seen = _Seen.of(after)
        with self._lock:
            self._verified[path] = (seen, expected_sha256)

    @staticmethod
    def _sealed(info: os.stat_result) -> bool:
        return info.st_uid == 0 and not info.st_mode & _UNSAFE_WRITE
