"""A tree from a zone written on this host without following anything the zone made.

:class:`TreeExtractor` takes the stream of :mod:`zoned.client.tarstream` as
it comes and builds the tree in a new directory beside its destination,
renamed into place only once the whole archive was read and checked: a
refused copy leaves nothing behind. Blocking (file IO): the client runs it
in a worker thread.

Rules
-----
- Every name is reached from the new directory by directory file
  descriptors, one component at a time, each opened ``O_NOFOLLOW |
  O_DIRECTORY``; files are created ``O_CREAT | O_EXCL | O_NOFOLLOW``. A
  directory the archive did not list before its contents is made (mode
  0700 until the end).
- The tree the archive describes is kept as a model: a name given twice, or
  one below a file or a link, is refused (that is how a link would be
  traversed).
- Hard links point at a regular file of the archive already written, and
  are made at once (no symbolic link exists yet). Symbolic links are made
  last and never followed. By default each must resolve inside the tree,
  through the model, following the other links of the tree (at most
  :data:`MAX_LINK_HOPS`); one that is absolute or climbs out of it refuses
  the whole copy, unless ``outward_links`` keeps such links as they are.
- Files keep their permission bits without setuid, setgid and sticky;
  directories theirs plus the owner's ``rwx`` (the copy is always the
  caller's to remove); both keep their modification time. Ownership is the
  caller's.
- Only when everything succeeded is the new directory renamed to the
  destination (never over anything: it must not exist). Any failure,
  :class:`~zoned.client.tarstream.UnsafeTree` or ``OSError``, removes it.
"""

from __future__ import annotations

import ctypes
import errno as errnos
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, NamedTuple

from zoned.client.tarstream import DEFAULT_MAX_ENTRIES, Member, TarReader, UnsafeTree, show

#: How many symbolic links a link of the tree may go through when checking where it leads.
MAX_LINK_HOPS = 40

_Kind = Literal["directory", "file", "symlink"]
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class TreeSummary(NamedTuple):
    """What a copied tree holds."""

    path: Path
    files: int
    directories: int
    symlinks: int
    bytes: int


class TreeExtractor:
    """Builds the tree of one tar stream at ``dest`` (see the module rules)."""

    def __init__(
        self,
        dest: Path,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        outward_links: bool = False,
    ) -> None:
        self.dest = dest
        self.outward_links = outward_links
        self._reader = TarReader(max_entries)
        if os.path.lexists(dest):
            raise UnsafeTree(f"{str(dest)!r} already exists")
        parent = dest.parent
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.zoned-", dir=parent))
        self._root = os.open(self._tmp, _OPEN_DIR)
        #: The open directories of the last name reached: (path, fd), root first.
        self._chain: list[tuple[tuple[bytes, ...], int]] = [((), self._root)]
        self._model: dict[tuple[bytes, ...], _Kind] = {(): "directory"}
        self._links: dict[tuple[bytes, ...], bytes] = {}
        self._dir_times: dict[tuple[bytes, ...], tuple[int, int]] = {}
        self._file: tuple[int, Member] | None = None
        self._written = 0
        self._files = 0
        self._done = False

    # -- the stream -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        for item in self._reader.feed(data):
            if isinstance(item, bytes):
                self._write(item)
            else:
                self._close_file()
                self._member(item)

    def finish(self) -> TreeSummary:
        """The stream ended: check and make the links, set the directories, rename."""
        self._reader.finish()
        self._close_file()
        for path, target in self._links.items():
            if not self.outward_links:
                self._check_inside(path, target)
        for path, target in self._links.items():
            os.symlink(target, path[-1], dir_fd=self._directory(path[:-1], create=False))
        for path in sorted(self._dir_times, key=len, reverse=True):
            mode, mtime = self._dir_times[path]
            fd = self._directory(path, create=False) if path else self._root
            os.chmod(fd, mode)
            os.utime(fd, ns=(mtime * 10**9, mtime * 10**9))
        self._close_chain()
        os.close(self._root)
        self._root = -1
        _rename_noreplace(self._tmp, self.dest)
        self._done = True
        directories = sum(1 for kind in self._model.values() if kind == "directory")
        return TreeSummary(self.dest, self._files, directories, len(self._links), self._written)

    def abort(self) -> None:
        """Remove everything written so far (after a failure); never raises."""
        if self._done:
            return
        if self._file is not None:
            os.close(self._file[0])
            self._file = None
        self._close_chain()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- members -------------------------------------------------------------

    def _member(self, member: Member) -> None:
        path = member.path
        if member.kind == "directory":
            mode = (member.mode & 0o777) | 0o700
            if path:
                known = self._model.get(path)
                if known is None:
                    self._check_parent(path)
                    parent = self._directory(path[:-1], create=True)
                    os.mkdir(path[-1], 0o700, dir_fd=parent)
                    self._model[path] = "directory"
                elif known != "directory" or path in self._dir_times:
                    raise UnsafeTree(f"member {show(path)} appears twice")
            self._dir_times[path] = (mode, member.mtime)
            return
        if path in self._model:
            raise UnsafeTree(f"member {show(path)} appears twice")
        self._check_parent(path)
        parent = self._directory(path[:-1], create=True)
        if member.kind == "file":
            fd = os.open(path[-1], _CREATE_FILE, 0o600, dir_fd=parent)
            self._model[path] = "file"
            self._file = (fd, member)
            self._files += 1
        elif member.kind == "hardlink":
            if self._model.get(member.link) != "file":
                raise UnsafeTree(
                    f"member {show(path)}: a hard link to {show(member.link)},"
                    " which is no file of the tree before it"
                )
            source = self._directory(member.link[:-1], create=False)
            target = self._directory(path[:-1], create=False)
            os.link(
                member.link[-1],
                path[-1],
                src_dir_fd=source,
                dst_dir_fd=target,
                follow_symlinks=False,
            )
            self._model[path] = "file"
            self._files += 1
        else:
            self._model[path] = "symlink"
            self._links[path] = member.target

    def _check_parent(self, path: tuple[bytes, ...]) -> None:
        """No member goes below a file or a link of the tree."""
        for depth in range(1, len(path)):
            kind = self._model.get(path[:depth])
            if kind is not None and kind != "directory":
                raise UnsafeTree(
                    f"member {show(path)} is inside {show(path[:depth])}, which is a {kind}"
                )

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        fd = self._file[0]
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self._written += len(data)

    def _close_file(self) -> None:
        if self._file is None:
            return
        fd, member = self._file
        self._file = None
        try:
            os.fchmod(fd, member.mode & 0o777)
            os.utime(fd, ns=(member.mtime * 10**9, member.mtime * 10**9))
        finally:
            os.close(fd)

    # -- directories by descriptor ---------------------------------------------

    def _directory(self, path: tuple[bytes, ...], *, create: bool) -> int:
        """An open descriptor of directory ``path`` of the new tree (owned by the chain)."""
        chain = self._chain
        common = 0
        for (known, _), depth in zip(chain[1:], range(1, len(path) + 1), strict=False):
            if known != path[:depth]:
                break
            common = depth
        while len(chain) > common + 1:
            os.close(chain.pop()[1])
        for depth in range(common + 1, len(path) + 1):
            name = path[depth - 1]
            try:
                fd = os.open(name, _OPEN_DIR, dir_fd=chain[-1][1])
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o700, dir_fd=chain[-1][1])
                self._model[path[:depth]] = "directory"
                fd = os.open(name, _OPEN_DIR, dir_fd=chain[-1][1])
            chain.append((path[:depth], fd))
        return chain[-1][1]

    def _close_chain(self) -> None:
        while len(self._chain) > 1:
            os.close(self._chain.pop()[1])

    # -- where a link leads ----------------------------------------------------

    def _check_inside(self, path: tuple[bytes, ...], target: bytes) -> None:
        """:class:`UnsafeTree` unless link ``path`` resolves inside the tree."""
        here = list(path[:-1])
        pending = target.split(b"/")
        if target.startswith(b"/"):
            raise UnsafeTree(
                f"member {show(path)} is a symbolic link to {show(target)}, outside the tree"
                " (copy such links as they are with outward links allowed)"
            )
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not here:
                    raise UnsafeTree(
                        f"member {show(path)} is a symbolic link to {show(target)}, which leads"
                        " outside the tree (copy such links as they are with outward links"
                        " allowed)"
                    )
                here.pop()
                continue
            here.append(part)
            if self._model.get(tuple(here)) == "symlink":
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise UnsafeTree(
                        f"member {show(path)}: its symbolic link goes through more than"
                        f" {MAX_LINK_HOPS} links"
                    )
                next_target = self._links[tuple(here)]
                if next_target.startswith(b"/"):
                    raise UnsafeTree(
                        f"member {show(path)} is a symbolic link to {show(target)}, which leads"
                        f" through {show(tuple(here))} outside the tree (copy such links as"
                        " they are with outward links allowed)"
                    )
                here.pop()
                pending = next_target.split(b"/") + pending


def _rename_noreplace(source: Path, dest: Path) -> None:
    """Rename, never over an existing ``dest`` (``renameat2(RENAME_NOREPLACE)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # a C library before glibc 2.28
        if os.path.lexists(dest):
            raise FileExistsError(errnos.EEXIST, os.strerror(errnos.EEXIST), str(dest))
        os.rename(source, dest)
        return
    result = renameat2(
        _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dest))
