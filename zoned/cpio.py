"""A writer for "newc" cpio archives, the format the Linux kernel unpacks as an initramfs (pure).

Only what a boot image needs: directories, regular files, symbolic links and
character device nodes. Every header field that could make two builds of the
same content differ is fixed (mtime 0, inode numbers counted from 1 in write
order, no hard links), so the same calls always produce the same bytes.

The kernel's unpacker does not create missing parent directories: an entry
whose parent does not exist yet is silently dropped. :class:`CpioWriter`
therefore emits any missing parent directory (mode 0755, root-owned) itself,
just before the first entry that needs it.

Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
each entry is a 110-byte ASCII header, the NUL-terminated path, padding to a
multiple of 4, the data, padding to a multiple of 4. The archive ends with an
entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
_HEADER_SIZE = 110
_FIELD_MAX = 0xFFFFFFFF


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _normalise(path: str) -> str:
    """The archive form of ``path``: relative, no empty, ``.`` or ``..`` parts."""
    parts = path.strip("/").split("/")
    if not path.strip("/") or any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise ValueError(f"invalid archive path {path!r}")
    return "/".join(parts)


class CpioWriter:
    """Write one newc archive to a binary stream, entry by entry.

    Paths may be given with or without a leading slash; they are stored
    relative (``dev/console``), which is what the kernel expects. Writing the
    same path twice is an error: the kernel would apply both, and the result
    would depend on entry order in ways that are easy to get wrong.
    Call :meth:`finish` once at the end to write the trailer.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._next_ino = 1
        self._paths: set[str] = set()
        self._directories: set[str] = set()
        self._finished = False

    def directory(self, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        """A directory; a no-op if it already exists with default settings (implicit parent)."""
        name = _normalise(path)
        if name in self._directories:
            return
        self._entry(name, stat.S_IFDIR | (mode & 0o7777), uid, gid, nlink=2)
        self._directories.add(name)

    def file(
        self, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> None:
        """A regular file holding ``data``."""
        self._entry(_normalise(path), stat.S_IFREG | (mode & 0o7777), uid, gid, data=data)

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> None:
        """A symbolic link to ``target`` (stored verbatim, may be relative)."""
        if not target or "\0" in target:
            raise ValueError(f"invalid symlink target {target!r}")
        self._entry(_normalise(path), stat.S_IFLNK | 0o777, uid, gid, data=target.encode())

    def char_device(
        self,
        path: str,
        major: int,
        minor: int,
        *,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        """A character device node, e.g. ``/dev/console`` (5, 1) or ``/dev/null`` (1, 3)."""
        self._entry(_normalise(path), stat.S_IFCHR | (mode & 0o7777), uid, gid, rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer; the writer accepts no more entries afterwards."""
        self._check_open()
        self._write_header(TRAILER_NAME, ino=0, mode=0, uid=0, gid=0, nlink=1, size=0)
        self._finished = True

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError("the archive is finished")

    def _entry(
        self,
        name: str,
        mode: int,
        uid: int,
        gid: int,
        *,
        nlink: int = 1,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        self._check_open()
        if name in self._paths:
            raise ValueError(f"duplicate archive path {name!r}")
        parent, _, _ = name.rpartition("/")
        if parent and parent not in self._directories:
            self.directory(parent)
        self._write_header(
            name,
            ino=self._next_ino,
            mode=mode,
            uid=uid,
            gid=gid,
            nlink=nlink,
            size=len(data),
            rdev=rdev,
        )
        self._out.write(data)
        self._out.write(_pad(len(data)))
        self._next_ino += 1
        self._paths.add(name)

    def _write_header(
        self,
        name: str,
        *,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        size: int,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, uid, gid, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        if any(not 0 <= value <= _FIELD_MAX for value in fields):
            raise ValueError(f"a header field of {name!r} does not fit in 32 bits")
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        self._out.write(header)
        self._out.write(encoded)
        self._out.write(_pad(_HEADER_SIZE + len(encoded)))
