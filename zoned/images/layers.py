"""Image layers applied in order into a staging tree, never following a link a layer made.

We apply layers ourselves rather than with ``umoci unpack``: bookworm's umoci
0.4.7 cannot read zstd layers, maps hostile names into the tree instead of
refusing them, and writes an mtree manifest of every file that nothing here
needs. The applier follows the OCI image specification ("Applying
changesets") and Docker's behaviour:

- Entries are applied in archive order. A non-directory replaces whatever is
  at its path (a directory there is removed with its contents); a directory
  over a directory merges (the new owner, mode and xattrs apply).
- ``.wh.NAME`` removes ``NAME`` from the lower layers; ``.wh..wh..opq`` makes
  its directory opaque: at the end of the layer everything under it that
  this layer did not itself write is removed (so the marker works wherever
  it sits in the archive). Other ``.wh..wh.*`` names (AUFS bookkeeping) are
  ignored.
- Owners are the numeric uid/gid (names in the archive are ignored), modes
  keep setuid/setgid/sticky, mtimes are kept (directories' after the last
  layer, as later entries change them), regular files keep their holes
  (GNU and PAX sparse members, and runs of 1 MiB of zeros, become holes).
- Hard links name a file already in the tree (from this layer or a lower
  one) by its path in the tree: they stay inside it and survive across
  layers.

What is refused, with :class:`~zoned.images.errors.InvalidImage` naming the
layer and the entry, before anything is written for that entry:

- a ``..`` component anywhere in a name or a hard link's target (leading
  ``/`` and ``./`` are dropped, as tar does);
- an entry whose path goes through a symlink or a non-directory, wherever
  the link points (``/etc``, ``../../..``): the applier opens every path
  component with ``O_NOFOLLOW`` from a directory descriptor, so nothing is
  ever written outside the tree. Symlinks themselves are stored verbatim
  and never traversed here; in the zone they resolve inside the zone's root,
  as in any container;
- a hard link to a missing file, a directory, or the root;
- device nodes outside ``/dev``. The agent mounts its own ``/dev`` over the
  image's, so nodes there are never seen by workloads; anywhere else a node
  would hand the workload a device the zone did not give it. FIFOs are fine;
- entry types tar has but images do not (multi-volume, volume labels);
- more entries, bytes or xattrs than :class:`LayerLimits` allow.

Extended attributes (PAX ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``) are
kept for ``user.*``, ``security.capability`` and POSIX ACLs on files and
directories; ``trusted.*`` (``trusted.overlay.*`` would steer the zone's
overlayfs), other ``security.*`` labels and xattrs on other entry types are
dropped and counted in :class:`ApplyStats`.

The pure part (:func:`entry_path`, :func:`plan_entry`, :func:`entry_xattrs`)
decides; :class:`StagingTree` does the file system work with descriptors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import gzip
import hashlib
import os
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal, Protocol, cast

from zoned.images.errors import ImageHostError, InvalidImage
from zoned.images.oci import sniff_compression
from zoned.images.progress import Cancel
from zoned.images.tools import tool_output

EntryPath = tuple[str, ...]
Kind = Literal["dir", "file", "symlink", "hardlink", "char", "block", "fifo"]

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
MAX_NAME_BYTES: Final = 255
MAX_PATH_BYTES: Final = 4095
COPY_CHUNK: Final = 1024 * 1024
_ZERO_CHUNK: Final = bytes(COPY_CHUNK)
#: Bytes after a tar's end-of-archive marker that still count as padding.
MAX_TRAILING_BYTES: Final = 1024 * 1024
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KEPT_XATTRS: Final = ("security.capability", "system.posix_acl_access", "system.posix_acl_default")


@dataclass(frozen=True)
class LayerLimits:
    """Bounds on what an image may unpack to (over all its layers)."""

    max_entries: int = 2_000_000
    #: Sum of the regular files' sizes (holes included: they cost mkfs time).
    max_file_bytes: int = 64 * 1024**3
    #: Uncompressed tar bytes read, per layer.
    max_tar_bytes: int = 64 * 1024**3
    max_xattrs_per_entry: int = 128
    max_xattr_value_bytes: int = 64 * 1024


@dataclass
class ApplyStats:
    entries: int = 0
    file_bytes: int = 0
    hole_bytes: int = 0
    dropped_xattrs: int = 0


class EntryRefused(Exception):
    """One archive entry is refused; the caller names the layer and the entry."""


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _CorruptStream(Exception):
    """Reading the layer itself failed (decompression, truncation)."""


@dataclass(frozen=True)
class Whiteout:
    path: EntryPath


@dataclass(frozen=True)
class Opaque:
    directory: EntryPath


@dataclass(frozen=True)
class Ignore:
    reason: str


@dataclass(frozen=True)
class Create:
    path: EntryPath
    kind: Kind
    #: A hard link's target in the tree; a symlink's target text.
    link_path: EntryPath = ()
    symlink_target: str = ""


Plan = Whiteout | Opaque | Ignore | Create


def entry_path(name: str) -> EntryPath:
    """The components of an archive name inside the tree; refuses ``..`` and overlong names."""
    if "\0" in name:
        raise EntryRefused("a NUL byte in the name")
    if len(os.fsencode(name)) > MAX_PATH_BYTES:
        raise EntryRefused(f"a name longer than {MAX_PATH_BYTES} bytes")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise EntryRefused("'..' in the path (it would leave the image's root)")
    for part in parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise EntryRefused(f"a path component longer than {MAX_NAME_BYTES} bytes")
    return parts


def _under_dev(path: EntryPath) -> bool:
    return len(path) >= 2 and path[0] == "dev"


def _kind(member: tarfile.TarInfo) -> Kind:
    if member.isdir():
        return "dir"
    if member.isreg():
        return "file"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr():
        return "char"
    if member.isblk():
        return "block"
    if member.isfifo():
        return "fifo"
    raise EntryRefused(f"entry type {member.type!r} is not a file system object")


def plan_entry(member: tarfile.TarInfo) -> Plan:
    """What one archive entry asks for, after the policy checks (pure)."""
    path = entry_path(member.name)
    base = path[-1] if path else ""
    if base.startswith(WHITEOUT_PREFIX):
        if base == OPAQUE_MARKER:
            return Opaque(path[:-1])
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return Ignore("AUFS metadata")
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise EntryRefused(f"whiteout {base!r} names no entry")
        return Whiteout((*path[:-1], target))
    kind = _kind(member)
    if kind != "dir" and not path:
        raise EntryRefused("the image's root replaced by a non-directory")
    if not 0 <= member.uid < 2**32 - 1 or not 0 <= member.gid < 2**32 - 1:
        raise EntryRefused(f"owner {member.uid}:{member.gid} is out of range")
    if kind in ("char", "block") and not _under_dev(path):
        raise EntryRefused(
            "a device node outside /dev (zones get their own /dev; devices elsewhere are refused)"
        )
    if kind == "symlink":
        if not member.linkname:
            raise EntryRefused("a symlink with an empty target")
        if len(os.fsencode(member.linkname)) > MAX_PATH_BYTES:
            raise EntryRefused(f"a symlink target longer than {MAX_PATH_BYTES} bytes")
        return Create(path, kind, symlink_target=member.linkname)
    if kind == "hardlink":
        try:
            link_path = entry_path(member.linkname)
        except EntryRefused as exc:
            raise EntryRefused(f"hard link target {member.linkname!r}: {exc}") from None
        if not link_path:
            raise EntryRefused("a hard link to the image's root")
        return Create(path, kind, link_path=link_path)
    return Create(path, kind)


def keep_xattr(name: str) -> bool:
    """Whether an xattr is kept in the image (see the module docstring)."""
    return name.startswith("user.") or name in _KEPT_XATTRS


def entry_xattrs(pax: Mapping[str, str], limits: LayerLimits) -> tuple[dict[str, bytes], int]:
    """The xattrs an entry's PAX headers carry that we keep, and how many were dropped."""
    kept: dict[str, bytes] = {}
    dropped = 0
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            raw = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise EntryRefused(f"xattr {name!r} is not valid base64") from None
        else:
            continue
        if not name or "\0" in name or len(name) > MAX_NAME_BYTES:
            raise EntryRefused(f"invalid xattr name {name[:80]!r}")
        if len(raw) > limits.max_xattr_value_bytes:
            raise EntryRefused(f"xattr {name!r} holds {len(raw)} bytes")
        if keep_xattr(name):
            kept[name] = raw
        else:
            dropped += 1
    if len(kept) + dropped > limits.max_xattrs_per_entry:
        raise EntryRefused(f"{len(kept) + dropped} xattrs on one entry")
    return kept, dropped


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is not None:
        seconds, _, fraction = text.partition(".")
        with contextlib.suppress(ValueError):
            return int(seconds) * 10**9 + int((fraction + "000000000")[:9] or 0)
    return int(member.mtime) * 10**9


def _joined(path: EntryPath) -> str:
    return "/".join(path) or "."


class StagingTree:
    """A directory being filled from layers, addressed only through descriptors.

    ``root`` must be an empty directory only this process writes to (the
    store's private scratch area). Use as a context manager.
    """

    def __init__(self, root: Path, image: str, limits: LayerLimits) -> None:
        self.image = image
        self.limits = limits
        self.stats = ApplyStats()
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._cached: tuple[EntryPath, int] | None = None
        self._dir_mtimes: dict[EntryPath, int] = {}

    def __enter__(self) -> StagingTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._drop_cache()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- walking ---------------------------------------------------------

    def _drop_cache(self, removed: EntryPath | None = None) -> None:
        if self._cached is None:
            return
        cached_path, fd = self._cached
        if removed is None or cached_path[: len(removed)] == removed:
            os.close(fd)
            self._cached = None

    def _open_dir(self, path: EntryPath, *, create: bool) -> int:
        """A new descriptor of directory ``path``, each component opened ``O_NOFOLLOW``.

        Missing components are made (mode 0755, root) when ``create``, else
        ``FileNotFoundError``. A symlink or non-directory on the way is refused.
        """
        fd = os.dup(self._root_fd)
        try:
            for depth, part in enumerate(path):
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o700, dir_fd=fd)
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(next_fd, 0o755)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    reason = self._why_not_a_directory(fd, part, path[: depth + 1])
                    raise EntryRefused(reason) from None
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _why_not_a_directory(parent_fd: int, name: str, path: EntryPath) -> str:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=parent_fd)
            return (
                f"the path goes through symlink {_joined(path)!r} -> {target!r}"
                " (links are never followed)"
            )
        return f"the path goes through {_joined(path)!r}, which is not a directory"

    def _parent(self, path: EntryPath) -> int:
        """The (cached, borrowed) descriptor of the directory holding ``path[-1]``."""
        parents = path[:-1]
        if self._cached is not None and self._cached[0] == parents:
            return self._cached[1]
        self._drop_cache()
        fd = self._open_dir(parents, create=True)
        self._cached = (parents, fd)
        return fd

    def _lstat(self, parent_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, parent_fd: int, name: str, path: EntryPath, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            self._drop_cache(removed=path)
            remove_tree_at(parent_fd, name)
        else:
            os.unlink(name, dir_fd=parent_fd)

    # -- applying --------------------------------------------------------

    def apply_layer(self, stream: _DigestReader, label: str, cancel: Cancel) -> None:
        """Apply one uncompressed layer tar read from ``stream``.

        An archive that ends right after its last member's data, without the
        padding and end-of-archive blocks, is accepted as Go's archive/tar
        (Docker, containerd, umoci) accepts it: ``umoci insert`` writes those.
        Data missing from a member is refused as truncation.
        """
        touched: set[str] = set()
        opaque: list[EntryPath] = []
        try:
            tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115
                fileobj=stream,
                mode="r|",
                errors="surrogateescape",
            )
        except (tarfile.TarError, _CorruptStream) as exc:
            raise InvalidImage(self.image, f"{label} is not a tar archive: {exc}") from None
        with tar:
            for _ in range(self.limits.max_entries + 1):
                try:
                    member = tar.next()
                except tarfile.ReadError as exc:
                    if stream.at_end and 0 < tar.offset - stream.count < tarfile.BLOCKSIZE:
                        break  # only the last member's padding is missing
                    raise InvalidImage(
                        self.image, f"{label} is corrupt or truncated: {exc}"
                    ) from None
                except (tarfile.TarError, _CorruptStream) as exc:
                    raise InvalidImage(
                        self.image, f"{label} is corrupt or truncated: {exc}"
                    ) from None
                if member is None:
                    break
                # Stream mode keeps every header read so far; bound the memory.
                tar.members.clear()
                self.stats.entries += 1
                if self.stats.entries > self.limits.max_entries:
                    raise InvalidImage(self.image, f"more than {self.limits.max_entries} entries")
                if self.stats.entries % 256 == 0:
                    cancel.check(self.image)
                try:
                    self._apply_entry(tar, member, touched, opaque, cancel)
                except EntryRefused as exc:
                    raise InvalidImage(
                        self.image, f"{label}: entry {member.name!r}: {exc}"
                    ) from None
                except (tarfile.TarError, _CorruptStream) as exc:
                    raise InvalidImage(
                        self.image, f"{label} is corrupt or truncated at {member.name!r}: {exc}"
                    ) from None
                except OSError as exc:
                    raise ImageHostError(
                        self.image, f"{label}: writing {member.name!r}: {exc.strerror or exc}"
                    ) from None
        try:
            for directory in opaque:
                self._clear_lower(directory, touched)
        except OSError as exc:
            raise ImageHostError(self.image, f"{label}: opaque directory: {exc}") from None

    def _apply_entry(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        touched: set[str],
        opaque: list[EntryPath],
        cancel: Cancel,
    ) -> None:
        plan = plan_entry(member)
        if isinstance(plan, Ignore):
            return
        if isinstance(plan, Whiteout):
            self._whiteout(plan.path)
            return
        if isinstance(plan, Opaque):
            for depth in range(1, len(plan.directory) + 1):
                touched.add(_joined(plan.directory[:depth]))
            if plan.directory:
                fd = self._make_dir(self._parent(plan.directory), plan.directory)
                os.close(fd)
            opaque.append(plan.directory)
            return
        for depth in range(1, len(plan.path) + 1):
            touched.add(_joined(plan.path[:depth]))
        xattrs, dropped = entry_xattrs(member.pax_headers, self.limits)
        if plan.kind not in ("file", "dir"):
            dropped += len(xattrs)
            xattrs = {}
        self.stats.dropped_xattrs += dropped
        if plan.kind == "dir":
            if plan.path:
                fd = self._make_dir(self._parent(plan.path), plan.path)
            else:
                fd = os.dup(self._root_fd)
            try:
                self._set_metadata_fd(fd, member, xattrs)
            finally:
                os.close(fd)
            self._dir_mtimes[plan.path] = _mtime_ns(member)
            return
        if plan.kind == "hardlink":
            self._hardlink(plan.path, plan.link_path)
            return
        parent = self._parent(plan.path)
        name = plan.path[-1]
        existing = self._lstat(parent, name)
        if existing is not None:
            self._remove(parent, name, plan.path, existing)
            parent = self._parent(plan.path)
        if plan.kind == "file":
            self._write_file(tar, member, parent, name, xattrs, cancel)
            return
        if plan.kind == "symlink":
            os.symlink(plan.symlink_target, name, dir_fd=parent)
        elif plan.kind == "fifo":
            os.mkfifo(name, 0o600, dir_fd=parent)
        else:
            node_type = stat.S_IFCHR if plan.kind == "char" else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(name, node_type | 0o600, device, dir_fd=parent)
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if plan.kind != "symlink":
            # A node this applier just made, not a link: chmod reaches only it.
            os.chmod(name, member.mode & 0o7777, dir_fd=parent)
        mtime = _mtime_ns(member)
        os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def _make_dir(self, parent: int, path: EntryPath) -> int:
        name = path[-1]
        existing = self._lstat(parent, name)
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            self._remove(parent, name, path, existing)
            existing = None
        if existing is None:
            os.mkdir(name, 0o700, dir_fd=parent)
        return os.open(name, _DIR_FLAGS, dir_fd=parent)

    def _set_metadata_fd(
        self, fd: int, member: tarfile.TarInfo, xattrs: Mapping[str, bytes]
    ) -> None:
        # Order matters: chown clears setuid bits and file capabilities.
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        for name, value in xattrs.items():
            os.setxattr(fd, name, value)

    def _write_file(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parent: int,
        name: str,
        xattrs: Mapping[str, bytes],
        cancel: Cancel,
    ) -> None:
        self.stats.file_bytes += member.size
        if self.stats.file_bytes > self.limits.max_file_bytes:
            raise EntryRefused(f"the image's files would exceed {self.limits.max_file_bytes} bytes")
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            extracted = tar.extractfile(member)
            # The unbuffered reader underneath: it seeks within the member (over
            # holes) without asking the stream to, which stream mode cannot.
            source = cast("IO[bytes]", getattr(extracted, "raw", None))
            if source is not None and member.size:
                # tarfile's sparse map: (offset, length) of each data region.
                sparse = cast("list[tuple[int, int]] | None", member.sparse)
                regions = sparse or [(0, member.size)]
                written = 0
                for offset, length in regions:
                    cancel.check(self.image)
                    source.seek(offset)
                    written += self._copy_region(source, fd, offset, length)
                self.stats.hole_bytes += member.size - written
            os.ftruncate(fd, member.size)
            self._set_metadata_fd(fd, member, xattrs)
            mtime = _mtime_ns(member)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _copy_region(self, source: IO[bytes], fd: int, offset: int, length: int) -> int:
        """Copy ``length`` bytes to ``offset``; whole chunks of zeros become holes."""
        written = 0
        remaining = length
        while remaining > 0:
            chunk = source.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise _CorruptStream("unexpected end of data")
            if len(chunk) != COPY_CHUNK or chunk != _ZERO_CHUNK:
                view = memoryview(chunk)
                while view:
                    count = os.pwrite(fd, view, offset)
                    view = view[count:]
                    offset += count
                written += len(chunk)
            else:
                offset += len(chunk)
            remaining -= len(chunk)
        return written

    def _hardlink(self, path: EntryPath, target: EntryPath) -> None:
        if path == target:
            return
        if target[: len(path)] == path:
            raise EntryRefused(f"hard link over its own target's directory {_joined(target)!r}")
        try:
            target_parent = self._open_dir(target[:-1], create=False)
        except FileNotFoundError:
            raise EntryRefused(
                f"hard link target {_joined(target)!r} is not in the image"
            ) from None
        try:
            st = self._lstat(target_parent, target[-1])
            if st is None:
                raise EntryRefused(f"hard link target {_joined(target)!r} is not in the image")
            if stat.S_ISDIR(st.st_mode):
                raise EntryRefused(f"hard link to directory {_joined(target)!r}")
            if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and not _under_dev(path):
                raise EntryRefused("a hard link to a device node outside /dev")
            parent = self._parent(path)
            existing = self._lstat(parent, path[-1])
            if existing is not None:
                self._remove(parent, path[-1], path, existing)
                parent = self._parent(path)
            os.link(
                target[-1],
                path[-1],
                src_dir_fd=target_parent,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )
        finally:
            os.close(target_parent)

    def _whiteout(self, path: EntryPath) -> None:
        try:
            parent = self._open_dir(path[:-1], create=False)
        except FileNotFoundError:
            return  # nothing below to hide
        try:
            existing = self._lstat(parent, path[-1])
            if existing is not None:
                self._remove(parent, path[-1], path, existing)
        finally:
            os.close(parent)

    def _clear_lower(self, directory: EntryPath, touched: set[str]) -> None:
        """Remove everything under ``directory`` that the current layer did not write."""
        pending = [directory]
        for _ in range(self.limits.max_entries + 1):
            if not pending:
                return
            current = pending.pop()
            try:
                fd = self._open_dir(current, create=False)
            except (FileNotFoundError, EntryRefused):
                continue
            try:
                for name in sorted(os.listdir(fd)):
                    child = (*current, name)
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if _joined(child) not in touched:
                        self._remove(fd, name, child, st)
                    elif stat.S_ISDIR(st.st_mode):
                        pending.append(child)
            finally:
                os.close(fd)

    def finish(self) -> None:
        """Set directories' mtimes, now that no entry changes them any more."""
        self._drop_cache()
        for path, mtime in self._dir_mtimes.items():
            try:
                fd = self._open_dir(path, create=False)
            except (FileNotFoundError, EntryRefused):
                continue  # removed or replaced by a later layer
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)

    def read_regular_file(self, path: EntryPath, max_bytes: int) -> bytes | None:
        """The content of regular file ``path`` (``None`` if absent, not regular, or
        reached through a symlink); at most ``max_bytes``."""
        try:
            parent = self._open_dir(path[:-1], create=False)
        except (FileNotFoundError, EntryRefused):
            return None
        try:
            fd = os.open(
                path[-1],
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=parent,
            )
        except OSError:
            return None
        finally:
            os.close(parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return os.read(fd, max_bytes)
        finally:
            os.close(fd)


def remove_tree_at(parent_fd: int, name: str) -> None:
    """Remove directory ``name`` under ``parent_fd`` with its contents, never following
    a link and never crossing into another file system (a mount left inside)."""
    top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    device = os.fstat(top).st_dev
    stack: list[tuple[int, Iterator[os.DirEntry[str]], str]] = [(top, os.scandir(top), name)]
    try:
        while stack:  # each turn removes one entry or finishes one directory
            fd, entries, dir_name = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                os.close(fd)
                os.rmdir(dir_name, dir_fd=stack[-1][0] if stack else parent_fd)
                continue
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.name, dir_fd=fd)
                continue
            child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
            if os.fstat(child).st_dev != device:
                os.close(child)
                raise OSError(errno.EXDEV, f"a mount point inside the tree: {entry.name!r}")
            stack.append((child, os.scandir(child), entry.name))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


@dataclass(frozen=True)
class LayerSource:
    """A layer blob to apply: its file, what the config says its content digest is."""

    path: Path
    diff_id: str
    label: str


class _CountingReader:
    """Counts the (compressed) bytes read from a blob; reports every few MiB."""

    REPORT_EVERY: Final = 4 * 1024 * 1024

    def __init__(self, inner: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_bytes = on_bytes
        self._reported = 0
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size if size >= 0 else COPY_CHUNK)
        self.count += len(data)
        if self.count - self._reported >= self.REPORT_EVERY or not data:
            self._reported = self.count
            self._on_bytes(self.count)
        return data

    def seek(self, offset: int, /) -> int:
        return self._inner.seek(offset)


class _DigestReader:
    """Reads the uncompressed tar, hashing it (the diff_id) and bounding its size.

    Any failure of the stream underneath (bad gzip, truncated zstd output)
    becomes :class:`_CorruptStream`, so it is never taken for a host error.
    """

    def __init__(self, inner: _Readable, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.hash = hashlib.sha256()
        self.count = 0
        self.at_end = False

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._inner.read(size if size >= 0 else COPY_CHUNK)
        except (OSError, EOFError, zlib.error) as exc:
            raise _CorruptStream(str(exc) or type(exc).__name__) from None
        self.count += len(data)
        if not data and size != 0:
            self.at_end = True
        if self.count > self._limit:
            raise _CorruptStream(f"more than {self._limit} bytes uncompressed")
        self.hash.update(data)
        return data

    def drain(self, max_bytes: int) -> None:
        start = self.count
        while self.read(COPY_CHUNK):
            if self.count - start > max_bytes:
                raise _CorruptStream("data after the end of the tar archive")


def apply_layer_blob(
    tree: StagingTree,
    layer: LayerSource,
    *,
    cancel: Cancel,
    scratch: Path,
    pass_fds: tuple[int, ...] = (),
    on_bytes: Callable[[int], None] = lambda _n: None,
) -> None:
    """Decompress (gzip, zstd or none, by the blob's first bytes) and apply one layer,
    then check the uncompressed content against the config's ``diff_id``."""
    image = tree.image
    with open(layer.path, "rb", buffering=0) as raw:  # unbuffered: zstd shares the offset
        compression = sniff_compression(raw.read(4))
        raw.seek(0)
        counting = _CountingReader(raw, on_bytes)
        with contextlib.ExitStack() as stack:
            finish = None
            inner: _Readable
            if compression == "gzip":
                inner = stack.enter_context(gzip.GzipFile(fileobj=counting, mode="rb"))
            elif compression == "zstd":
                inner, finish = stack.enter_context(
                    tool_output(
                        image,
                        ["zstd", "-d", "-c", "-q", "--no-progress"],
                        stdin=raw.fileno(),
                        scratch=scratch,
                        pass_fds=pass_fds,
                    )
                )
            else:
                inner = counting
            reader = _DigestReader(inner, tree.limits.max_tar_bytes)
            try:
                tree.apply_layer(reader, layer.label, cancel)
                reader.drain(MAX_TRAILING_BYTES)
            except _CorruptStream as exc:
                raise InvalidImage(image, f"{layer.label} is corrupt or truncated: {exc}") from None
            if finish is not None:
                result = finish()
                if result.returncode != 0:
                    raise InvalidImage(
                        image, f"{layer.label} is not valid zstd: {result.stderr or 'zstd failed'}"
                    )
    actual = f"sha256:{reader.hash.hexdigest()}"
    if actual != layer.diff_id:
        raise InvalidImage(
            image,
            f"{layer.label} unpacks to {actual}, but the config says {layer.diff_id}",
        )
