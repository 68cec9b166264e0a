"""The image store: blobs by digest, one converted root per image, tags; safe under
concurrency and crashes.

Layout under the directory the caller gives (everything root-owned; 0755
directories and 0644 files, so that QEMU, an unprivileged user, can open a
root file system and nothing else can write anything; ``scratch/`` and
``locks/`` are 0700)::

    blobs/sha256/<hex>     manifests, configs and layers exactly as fetched, verified
    roots/<hex>.erofs      the read-only root file system of image sha256:<hex>
    images/<hex>.json      the image's record (see ImageRecord); an image exists iff this does
    tags.json              reference -> image id
    scratch/op-*/          one private directory per operation (fetched copies, the
                           staging tree, the root file system being built)
    locks/store.lock       held briefly: publishing, tagging, removing, pruning, cleaning
    locks/convert-<xx>.lock held while an image whose id starts with <xx> is converted

An image is identified by its config digest, as Docker's image ID is: the
same image fetched from a registry (gzip layers) and from a ``docker save``
archive (uncompressed layers) has two manifests but one config, one record
and one root file system. Each manifest it was fetched by is kept with its
layers; ``repo_digests`` lists ``name@manifest-digest`` for registry pulls.

Rules:

- **Nothing half-done ever looks complete.** All work happens in the
  operation's scratch directory. Publishing, under the store lock, renames
  the verified blobs, then the fsynced root file system, then the fsynced
  record into place, then updates the tags: the record is the commit point.
  A crash before it leaves only files no record names, and those (with the
  scratch directories of dead operations) are removed by the next operation
  that writes (:meth:`ImageStore.cleanup`).
- **One conversion per image.** Two importers (threads or processes) of the
  same image both fetch, then take the image's conversion lock in turn: the
  second finds the record the first published and only adds its manifest
  and tags. Locks are ``flock``\\ s on files that are never deleted, so
  threads of one process exclude each other as processes do.
- **Scratch directories are in use while their operation lives**: each is
  ``flock``-ed by its operation, and the lock is passed to the tools it
  starts; the cleaner removes only directories whose lock it can take. It
  removes trees without following links or crossing mount points.
- **Removal** deletes the tags, then the record (the commit point), then the
  root file system and the blobs no other record names.

Everything here blocks (file IO, fsync, tools, lock waits): the daemon calls
it from worker threads, one :class:`ImageStore` per store directory shared
by all of them. Long operations take a :class:`~zoned.images.progress.Cancel`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from zoned.errors import InvalidRequest
from zoned.images.erofs import build_erofs, file_sha256
from zoned.images.errors import (
    ImageHostError,
    ImageInUse,
    ImageNotFound,
    ImportCancelled,
    InvalidImage,
)
from zoned.images.imageconfig import (
    MAX_ACCOUNT_FILE_BYTES,
    Accounts,
    ImageConfig,
    parse_group,
    parse_passwd,
)
from zoned.images.layers import (
    LayerLimits,
    LayerSource,
    StagingTree,
    apply_layer_blob,
    remove_tree_at,
)
from zoned.images.progress import Cancel, ImportProgress, Progress, no_progress
from zoned.images.reference import (
    Platform,
    Reference,
    digest_hex,
    host_platform,
    parse_platform,
    parse_reference,
)
from zoned.images.sources import (
    FetchedImage,
    RegistrySource,
    Source,
    check_source,
    describe,
    fetch,
    read_fetched,
    registry_reference,
)
from zoned.images.tools import ToolRun

log = logging.getLogger(__name__)

#: Bump when conversion changes what a root file system holds.
CONVERTER_VERSION: Final = 1
_ID_PREFIX_RE: Final = re.compile(r"(?:sha256:)?([0-9a-f]{12,64})")
_LOCK_POLL_SECONDS: Final = 0.05


@dataclass(frozen=True)
class StoreLimits:
    layers: LayerLimits = field(default_factory=LayerLimits)
    max_layers: int = 256
    max_blob_bytes: int = 64 * 1024**3
    fetch_seconds: float = 3600.0
    build_seconds: float = 3600.0
    lock_wait_seconds: float = 3600.0


class BlobRecord(msgspec.Struct, frozen=True, kw_only=True):
    digest: str
    size: int
    media_type: str


class ManifestRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One manifest the image was fetched by, with its layers (in order)."""

    digest: str
    size: int
    media_type: str
    layers: list[BlobRecord]


class RootfsRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The converted root file system: ``roots/<hex>.erofs``."""

    sha256: str
    size: int
    chunked: bool
    converter: int
    entries: int
    file_bytes: int
    dropped_xattrs: int
    convert_seconds: float


class ImageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the store knows of one image (``images/<hex>.json``)."""

    id: str
    platform: Platform
    created: str | None
    config: ImageConfig
    accounts: Accounts
    diff_ids: list[str]
    config_blob: BlobRecord
    manifests: list[ManifestRecord]
    repo_digests: list[str]
    rootfs: RootfsRecord
    imported_at: float


class ImageInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An image as ``list``/``inspect`` show it."""

    record: ImageRecord
    tags: list[str]
    rootfs_path: str

    @property
    def id(self) -> str:
        return self.record.id


class ImportResult(msgspec.Struct, frozen=True, kw_only=True):
    info: ImageInfo
    #: False when the image was already converted (by this or a concurrent import).
    converted: bool
    #: Seconds per phase: fetch, verify, wait, apply, build, publish.
    timings: dict[str, float]


class RemoveResult(msgspec.Struct, frozen=True, kw_only=True):
    untagged: list[str]
    removed: list[str]
    freed_bytes: int


class ImageSize(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tags: list[str]
    rootfs_bytes: int
    #: Manifests, config and layers of this image ...
    blob_bytes: int
    #: ... of which also used by another image.
    shared_blob_bytes: int


class StoreSizes(msgspec.Struct, frozen=True, kw_only=True):
    """Disk use (allocated bytes) per image and in all."""

    images: list[ImageSize]
    rootfs_bytes: int
    blob_bytes: int
    scratch_bytes: int
    total_bytes: int


class _Tags(msgspec.Struct, kw_only=True):
    version: int = 1
    tags: dict[str, str] = msgspec.field(default_factory=dict)


_record_encoder: Final = msgspec.json.Encoder()
_record_decoder: Final = msgspec.json.Decoder(ImageRecord)
_tags_decoder: Final = msgspec.json.Decoder(_Tags)


def _allocated(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_blocks * 512
    except FileNotFoundError:
        return 0


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_DIRECTORY if directory else 0) | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Operation:
    """One operation's scratch directory, locked (``fd``) while the operation lives."""

    path: Path
    fd: int

    def tools(self, cancel: Cancel, max_seconds: float, poll: Callable[[], None]) -> ToolRun:
        """How a tool of this operation runs: in its scratch directory, holding its lock."""
        return ToolRun(
            cancel=cancel,
            scratch=self.path,
            max_seconds=max_seconds,
            pass_fds=(self.fd,),
            poll=poll,
        )


class ImageStore:
    """The image store in ``root`` (created if missing). See the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        limits: StoreLimits | None = None,
        platform: Platform | None = None,
    ) -> None:
        self.root = root
        self.limits = limits or StoreLimits()
        #: The platform zones on this host run: the default, and the only one accepted.
        self.platform = platform or host_platform()
        self.blobs = root / "blobs" / "sha256"
        self.roots = root / "roots"
        self.images = root / "images"
        self.scratch_dir = root / "scratch"
        self.locks = root / "locks"
        self.tags_file = root / "tags.json"
        #: Root file systems hashed already: (dev, ino, size, mtime, ctime) -> (sha256, size).
        self._verified: dict[tuple[int, int, int, int, int], tuple[str, int]] = {}
        for directory, mode in (
            (root, 0o755),
            (root / "blobs", 0o755),
            (self.blobs, 0o755),
            (self.roots, 0o755),
            (self.images, 0o755),
            (self.scratch_dir, 0o700),
            (self.locks, 0o700),
        ):
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
            os.chmod(directory, mode)  # whatever the umask

    # -- locks and scratch ---------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, *, image: str, cancel: Cancel | None = None) -> Iterator[None]:
        """Hold lock ``locks/<name>`` (waiting, cancellably): one holder across
        threads and processes. The store's own are ``store.lock`` and
        ``convert-*.lock``; callers may take others (the default image's build)."""
        fd = os.open(self.locks / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            for _ in range(int(self.limits.lock_wait_seconds / _LOCK_POLL_SECONDS) + 1):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                if cancel is not None:
                    cancel.check(image)
                time.sleep(_LOCK_POLL_SECONDS)
            else:
                raise ImageHostError(
                    image, f"lock {name} stayed busy for {self.limits.lock_wait_seconds:.0f} s"
                )
            yield
        finally:
            os.close(fd)  # releases the flock

    def _store_lock(
        self, image: str, cancel: Cancel | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return self.lock("store.lock", image=image, cancel=cancel)

    @contextlib.contextmanager
    def operation(self, image: str) -> Iterator[_Operation]:
        """A private, locked scratch directory for one operation; removed afterwards."""
        with self._store_lock(image):
            path = Path(tempfile.mkdtemp(prefix="op-", dir=self.scratch_dir))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield _Operation(path, fd)
        finally:
            try:
                self._remove_scratch_entry(path.name)
            except OSError as exc:
                log.error("could not remove scratch directory %s: %s", path, exc)
            os.close(fd)

    def _remove_scratch_entry(self, name: str) -> None:
        parent = os.open(self.scratch_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                remove_tree_at(parent, name)
            else:
                os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent)

    # -- records and tags ------------------------------------------------------

    def _record_path(self, image_id: str) -> Path:
        return self.images / f"{digest_hex(image_id)}.json"

    def rootfs_file(self, image_id: str) -> Path:
        """Where image ``image_id``'s root file system is (or would be)."""
        return self.roots / f"{digest_hex(image_id)}.erofs"

    def _load_record(self, image_id: str) -> ImageRecord | None:
        try:
            data = self._record_path(image_id).read_bytes()
        except FileNotFoundError:
            return None
        return _record_decoder.decode(data)

    def _records(self) -> list[ImageRecord]:
        records = []
        for entry in sorted(self.images.iterdir()):
            if not entry.name.endswith(".json"):
                continue
            try:
                records.append(_record_decoder.decode(entry.read_bytes()))
            except (msgspec.DecodeError, OSError) as exc:
                log.error("unreadable image record %s: %s", entry, exc)
        return records

    def _tags(self) -> dict[str, str]:
        try:
            return dict(_tags_decoder.decode(self.tags_file.read_bytes()).tags)
        except FileNotFoundError:
            return {}
        except msgspec.DecodeError as exc:
            log.error("unreadable %s (%s): no tags", self.tags_file, exc)
            return {}

    def _write_file(self, target: Path, data: bytes) -> None:
        """Replace ``target`` atomically and durably (mode 0644). Store lock held."""
        fd, temp = tempfile.mkstemp(dir=self.scratch_dir, prefix=".write-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fchmod(file.fileno(), 0o644)
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_path(target.parent, directory=True)

    def _save_tags(self, tags: dict[str, str]) -> None:
        self._write_file(
            self.tags_file, msgspec.json.encode(_Tags(tags=dict(sorted(tags.items()))))
        )

    def _info(self, record: ImageRecord, tags: dict[str, str]) -> ImageInfo:
        names = sorted(parse_reference(t).familiar() for t, i in tags.items() if i == record.id)
        return ImageInfo(record=record, tags=names, rootfs_path=str(self.rootfs_file(record.id)))

    # -- reading ---------------------------------------------------------------

    def resolve(self, reference: str) -> ImageRecord:
        """The image a tag, ``name@digest``, id or unique id prefix (12+ hex) names."""
        prefix = _ID_PREFIX_RE.fullmatch(reference)
        if prefix is not None:
            matches = [r for r in self._records() if digest_hex(r.id).startswith(prefix[1])]
            if len(matches) > 1:
                raise InvalidRequest(f"image id prefix {reference!r} is ambiguous")
            if matches:
                return matches[0]
        ref = parse_reference(reference)
        if ref.digest is not None:
            for record in self._records():
                if f"{ref.name}@{ref.digest}" in record.repo_digests or any(
                    m.digest == ref.digest for m in record.manifests
                ):
                    return record
        else:
            image_id = self._tags().get(str(ref))
            tagged = self._load_record(image_id) if image_id is not None else None
            if tagged is not None:
                return tagged
        raise ImageNotFound(reference, "not in the image store")

    def inspect(self, reference: str) -> ImageInfo:
        return self._info(self.resolve(reference), self._tags())

    def list_images(self) -> list[ImageInfo]:
        tags = self._tags()
        return [self._info(record, tags) for record in self._records()]

    def verify_rootfs(self, image_id: str) -> Path:
        """The image's root file system, after checking it is root's, 0644, and
        has the recorded size and sha256 (what a zone start should call).

        The hash is computed once per version of the file: a file whose
        device, inode, size, mtime and ctime are those of one already hashed
        here is not read again (any write, chmod, chown or rename onto it
        changes its ctime; only root can do either to a root-owned 0644 file).
        """
        record = self._load_record(image_id)
        if record is None:
            raise ImageNotFound(image_id, "not in the image store")
        path = self.rootfs_file(image_id)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise ImageHostError(image_id, f"its root file system {path} is missing") from None
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o644:
            raise ImageHostError(
                image_id,
                f"{path} is not a root-owned 0644 file (uid {st.st_uid},"
                f" mode {stat.S_IMODE(st.st_mode):o}): the store was tampered with",
            )
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        expected = (record.rootfs.sha256, record.rootfs.size)
        if self._verified.get(version) == expected:
            return path
        digest, size = file_sha256(path)
        if (digest, size) != expected:
            raise ImageHostError(
                image_id, f"{path} does not match its recorded sha256: the store is damaged"
            )
        self._verified[version] = expected
        return path

    def sizes(self) -> StoreSizes:
        records = self._records()
        tags = self._tags()
        users: dict[str, int] = {}
        for record in records:
            for digest in _blob_digests(record):
                users[digest] = users.get(digest, 0) + 1
        images = []
        for record in records:
            digests = _blob_digests(record)
            images.append(
                ImageSize(
                    id=record.id,
                    tags=self._info(record, tags).tags,
                    rootfs_bytes=_allocated(self.rootfs_file(record.id)),
                    blob_bytes=sum(_allocated(self.blobs / digest_hex(d)) for d in digests),
                    shared_blob_bytes=sum(
                        _allocated(self.blobs / digest_hex(d)) for d in digests if users[d] > 1
                    ),
                )
            )
        rootfs = sum(_allocated(p) for p in self.roots.iterdir())
        blobs = sum(_allocated(p) for p in self.blobs.iterdir())
        scratch = _tree_bytes(self.scratch_dir)
        meta = sum(_allocated(p) for p in self.images.iterdir()) + _allocated(self.tags_file)
        return StoreSizes(
            images=images,
            rootfs_bytes=rootfs,
            blob_bytes=blobs,
            scratch_bytes=scratch,
            total_bytes=rootfs + blobs + scratch + meta,
        )

    # -- importing -------------------------------------------------------------

    def requested_platform(self, image: str, platform: str | Platform | None) -> Platform:
        """``platform`` checked against the one this host's zones run (the default)."""
        if platform is None:
            return self.platform
        wanted = parse_platform(platform) if isinstance(platform, str) else platform
        if not self.platform.accepts(wanted) or not wanted.accepts(self.platform):
            raise InvalidImage(
                image, f"platform {wanted}: zones on this host run {self.platform} only"
            )
        return wanted

    def import_image(
        self,
        source: Source,
        *,
        platform: str | Platform | None = None,
        tags: Sequence[str] = (),
        progress: Progress = no_progress,
        cancel: Cancel | None = None,
    ) -> ImportResult:
        """Fetch, verify, convert (unless already converted) and tag one image.

        A registry source is tagged with its reference (when that has a tag);
        ``tags`` are added. On any error nothing of the import is kept.
        """
        image = describe(source)
        check_source(source)
        cancel = cancel or Cancel()
        wanted = self.requested_platform(image, platform)
        new_tags = [parse_reference(t) for t in tags]
        pulled = registry_reference(source)
        if pulled is not None and pulled.tag is not None and pulled.digest is None:
            new_tags.insert(0, pulled)
        timings: dict[str, float] = {}
        self.cleanup()
        with self.operation(image) as op:
            started = time.monotonic()
            fetched_dir = op.path / "fetched"

            def fetch_progress() -> None:
                progress(
                    ImportProgress(image=image, phase="fetch", bytes_done=_tree_bytes(fetched_dir))
                )

            progress(ImportProgress(image=image, phase="fetch"))
            expected = fetch(
                image,
                source,
                fetched_dir,
                wanted,
                tools=op.tools(cancel, self.limits.fetch_seconds, fetch_progress),
            )
            timings["fetch"] = time.monotonic() - started
            started = time.monotonic()
            progress(
                ImportProgress(image=image, phase="verify", bytes_done=_tree_bytes(fetched_dir))
            )
            fetched = read_fetched(
                image,
                fetched_dir,
                expected_manifest=expected,
                max_layers=self.limits.max_layers,
                max_blob_bytes=self.limits.max_blob_bytes,
            )
            if not wanted.accepts(fetched.config.platform):
                raise InvalidImage(
                    image, f"it is built for {fetched.config.platform}; zones here run {wanted}"
                )
            timings["verify"] = time.monotonic() - started
            image_id = fetched.manifest.config.digest
            started = time.monotonic()
            progress(ImportProgress(image=image, phase="wait"))
            with self.lock(f"convert-{digest_hex(image_id)[:2]}.lock", image=image, cancel=cancel):
                timings["wait"] = time.monotonic() - started
                existing = self._load_record(image_id)
                converted = existing is None or not self.rootfs_file(image_id).is_file()
                rootfs = None
                if converted:
                    rootfs = self._convert(image, op, fetched, cancel, progress, timings)
                started = time.monotonic()
                progress(ImportProgress(image=image, phase="publish"))
                with self._store_lock(image):
                    record = self._publish(image, op, fetched, rootfs, existing, pulled, new_tags)
                    info = self._info(record, self._tags())
                timings["publish"] = time.monotonic() - started
        progress(ImportProgress(image=image, phase="done"))
        return ImportResult(info=info, converted=converted, timings=timings)

    def _convert(
        self,
        image: str,
        op: _Operation,
        fetched: FetchedImage,
        cancel: Cancel,
        progress: Progress,
        timings: dict[str, float],
    ) -> tuple[RootfsRecord, Accounts]:
        started = time.monotonic()
        staging = op.path / "root"
        staging.mkdir(mode=0o755)
        os.chmod(staging, 0o755)
        layers = fetched.manifest.layers
        total = sum(layer.size for layer in layers)
        done_before = 0
        with StagingTree(staging, image, self.limits.layers) as tree:
            for number, (layer, diff_id) in enumerate(
                zip(layers, fetched.config.rootfs.diff_ids, strict=True), 1
            ):
                cancel.check(image)

                def on_bytes(count: int, number: int = number, before: int = done_before) -> None:
                    progress(
                        ImportProgress(
                            image=image,
                            phase="apply",
                            layers_done=number - 1,
                            layers_total=len(layers),
                            bytes_done=before + count,
                            bytes_total=total,
                        )
                    )

                on_bytes(0)
                apply_layer_blob(
                    tree,
                    LayerSource(
                        path=fetched.blob(layer.digest),
                        diff_id=diff_id,
                        label=f"layer {number} of {len(layers)} ({layer.digest})",
                    ),
                    cancel=cancel,
                    scratch=op.path,
                    pass_fds=(op.fd,),
                    on_bytes=on_bytes,
                )
                done_before += layer.size
            tree.finish()
            accounts = _read_accounts(tree)
            stats = tree.stats
        timings["apply"] = time.monotonic() - started
        started = time.monotonic()
        output = op.path / "rootfs.erofs"

        def build_progress() -> None:
            progress(
                ImportProgress(
                    image=image,
                    phase="build",
                    layers_done=len(layers),
                    layers_total=len(layers),
                    bytes_done=_allocated(output),
                    bytes_total=stats.file_bytes,
                )
            )

        build_progress()
        chunked = build_erofs(
            image,
            staging,
            output,
            image_id=fetched.manifest.config.digest,
            hole_bytes=stats.hole_bytes,
            tools=op.tools(cancel, self.limits.build_seconds, build_progress),
        )
        remove_tree_at(op.fd, "root")  # free the space before the copy is published
        os.chmod(output, 0o644)
        _fsync_path(output)
        digest, size = file_sha256(output)
        timings["build"] = time.monotonic() - started
        record = RootfsRecord(
            sha256=digest,
            size=size,
            chunked=chunked,
            converter=CONVERTER_VERSION,
            entries=stats.entries,
            file_bytes=stats.file_bytes,
            dropped_xattrs=stats.dropped_xattrs,
            convert_seconds=timings["apply"] + timings["build"],
        )
        return record, accounts

    def _publish_blob(self, source: Path, digest: str) -> None:
        target = self.blobs / digest_hex(digest)
        if target.exists():
            return
        os.chmod(source, 0o644)
        _fsync_path(source)
        os.rename(source, target)

    def _publish(
        self,
        image: str,
        op: _Operation,
        fetched: FetchedImage,
        rootfs: tuple[RootfsRecord, Accounts] | None,
        existing: ImageRecord | None,
        pulled: Reference | None,
        new_tags: list[Reference],
    ) -> ImageRecord:
        """Move the verified image into place; the record is the commit point. Store lock held."""
        manifest_file = op.path / "manifest.blob"
        manifest_file.write_bytes(fetched.manifest_bytes)
        self._publish_blob(manifest_file, fetched.manifest_digest)
        self._publish_blob(
            fetched.blob(fetched.manifest.config.digest), fetched.manifest.config.digest
        )
        for layer in fetched.manifest.layers:
            self._publish_blob(fetched.blob(layer.digest), layer.digest)
        _fsync_path(self.blobs, directory=True)
        image_id = fetched.manifest.config.digest
        manifest_record = ManifestRecord(
            digest=fetched.manifest_digest,
            size=len(fetched.manifest_bytes),
            media_type=fetched.manifest.media_type or "application/vnd.oci.image.manifest.v1+json",
            layers=[
                BlobRecord(digest=layer.digest, size=layer.size, media_type=layer.media_type)
                for layer in fetched.manifest.layers
            ],
        )
        repo_digest = f"{pulled.name}@{fetched.manifest_digest}" if pulled is not None else None
        if rootfs is not None:
            rootfs_record, accounts = rootfs
            os.replace(op.path / "rootfs.erofs", self.rootfs_file(image_id))
            _fsync_path(self.roots, directory=True)
            config = fetched.config
            base = ImageRecord(
                id=image_id,
                platform=config.platform,
                created=config.created,
                config=ImageConfig.from_container_config(config.config),
                accounts=accounts,
                diff_ids=list(config.rootfs.diff_ids),
                config_blob=BlobRecord(
                    digest=image_id,
                    size=fetched.manifest.config.size,
                    media_type=fetched.manifest.config.media_type,
                ),
                manifests=[],
                repo_digests=[],
                rootfs=rootfs_record,
                imported_at=time.time(),
            )
            if existing is not None:  # converted again: its root file system was lost
                base = msgspec.structs.replace(existing, rootfs=rootfs_record, accounts=accounts)
        else:
            assert existing is not None
            base = existing
        manifests = list(base.manifests)
        if all(m.digest != manifest_record.digest for m in manifests):
            manifests.append(manifest_record)
        repo_digests = list(base.repo_digests)
        if repo_digest and repo_digest not in repo_digests:
            repo_digests.append(repo_digest)
        record = msgspec.structs.replace(base, manifests=manifests, repo_digests=repo_digests)
        if record != existing:
            self._write_file(self._record_path(image_id), _record_encoder.encode(record))
        if new_tags:
            tags = self._tags()
            for ref in new_tags:
                tags[str(ref)] = image_id
            self._save_tags(tags)
        return record

    # -- copying from another store ---------------------------------------------

    def copy_from(
        self, other: ImageStore, reference: str, *, tags: Sequence[str] = ()
    ) -> ImageInfo:
        """Image ``reference`` of the store ``other`` in this store too, with the
        tags it has there and ``tags``: its blobs and root file system hard-linked
        where both stores share a file system (else copied), each checked
        against its digest first. A no-op but for the tags when it is here already.
        """
        record = other.resolve(reference)
        image = reference
        other.verify_rootfs(record.id)
        new_tags = [parse_reference(t) for t in (*other.inspect(record.id).tags, *tags)]
        self.cleanup()
        with (
            self.operation(image) as op,
            self.lock(f"convert-{digest_hex(record.id)[:2]}.lock", image=image),
        ):
            existing = self._load_record(record.id)
            copy_files = existing is None or not self.rootfs_file(record.id).is_file()
            if copy_files:
                for digest in sorted(_blob_digests(record)):
                    target = op.path / digest_hex(digest)
                    _link_or_copy(other.blobs / digest_hex(digest), target)
                    actual, _ = file_sha256(target)
                    if actual != digest:
                        raise ImageHostError(image, f"blob {digest} of {other.root} is damaged")
                _link_or_copy(other.rootfs_file(record.id), op.path / "rootfs.erofs")
            with self._store_lock(image):
                if copy_files:
                    for digest in _blob_digests(record):
                        self._publish_blob(op.path / digest_hex(digest), digest)
                    _fsync_path(self.blobs, directory=True)
                    os.replace(op.path / "rootfs.erofs", self.rootfs_file(record.id))
                    _fsync_path(self.roots, directory=True)
                    self._write_file(self._record_path(record.id), _record_encoder.encode(record))
                stored = self._load_record(record.id)
                assert stored is not None
                current = self._tags()
                for ref in new_tags:
                    current[str(ref)] = record.id
                self._save_tags(current)
                return self._info(stored, current)

    # -- tagging, removing, pruning, cleaning --------------------------------------

    def tag(self, reference: str, new_tag: str) -> ImageInfo:
        """Point ``new_tag`` at the image ``reference`` names (moving it if it named another)."""
        ref = parse_reference(new_tag)
        if ref.digest is not None:
            raise InvalidRequest(f"a tag cannot carry a digest: {new_tag!r}")
        with self._store_lock(reference):
            record = self.resolve(reference)
            tags = self._tags()
            tags[str(ref)] = record.id
            self._save_tags(tags)
            return self._info(record, tags)

    def remove(self, reference: str, *, in_use: Collection[str] = ()) -> RemoveResult:
        """Untag ``reference`` if it is one of several tags of its image, else remove
        the image (refused while ``in_use`` names it: ids or manifest digests)."""
        with self._store_lock(reference):
            self._cleanup_locked()
            record = self.resolve(reference)
            tags = self._tags()
            mine = [t for t, i in tags.items() if i == record.id]
            is_tag = _ID_PREFIX_RE.fullmatch(reference) is None and "@" not in reference
            if is_tag:
                tag = str(parse_reference(reference))
                if tag in mine and len(mine) > 1:
                    del tags[tag]
                    self._save_tags(tags)
                    return RemoveResult(
                        untagged=[parse_reference(tag).familiar()], removed=[], freed_bytes=0
                    )
            if _in_use(record, in_use):
                raise ImageInUse(reference, "a zone uses it")
            freed = self._delete_locked(record, tags)
            return RemoveResult(
                untagged=sorted(parse_reference(t).familiar() for t in mine),
                removed=[record.id],
                freed_bytes=freed,
            )

    def prune(self, in_use: Collection[str]) -> RemoveResult:
        """Remove every image ``in_use`` does not name, with the blobs only they used."""
        with self._store_lock("prune"):
            self._cleanup_locked()
            tags = self._tags()
            removed, untagged, freed = [], [], 0
            for record in self._records():
                if _in_use(record, in_use):
                    continue
                untagged += [
                    parse_reference(t).familiar() for t, i in tags.items() if i == record.id
                ]
                freed += self._delete_locked(record, tags)
                removed.append(record.id)
            return RemoveResult(untagged=sorted(untagged), removed=removed, freed_bytes=freed)

    def _delete_locked(self, record: ImageRecord, tags: dict[str, str]) -> int:
        for tag in [t for t, i in tags.items() if i == record.id]:
            del tags[tag]
        self._save_tags(tags)
        self._record_path(record.id).unlink()
        _fsync_path(self.images, directory=True)
        freed = _allocated(self.rootfs_file(record.id))
        self.rootfs_file(record.id).unlink(missing_ok=True)
        used = {d for other in self._records() for d in _blob_digests(other)}
        for digest in _blob_digests(record) - used:
            path = self.blobs / digest_hex(digest)
            freed += _allocated(path)
            path.unlink(missing_ok=True)
        return freed

    def cleanup(self) -> int:
        """Remove what interrupted operations left (dead scratch directories, root
        file systems and blobs no record names, tags of missing images); the count."""
        with self._store_lock("cleanup"):
            return self._cleanup_locked()

    def _cleanup_locked(self) -> int:
        removed = 0
        for entry in os.listdir(self.scratch_dir):
            if not self._scratch_entry_dead(entry):
                continue
            try:
                self._remove_scratch_entry(entry)
                removed += 1
                log.info("removed %s, left by an interrupted operation", self.scratch_dir / entry)
            except OSError as exc:
                log.error("could not remove %s: %s", self.scratch_dir / entry, exc)
        records = self._records()
        ids = {digest_hex(r.id) for r in records}
        for root_file in self.roots.iterdir():
            if root_file.name.removesuffix(".erofs") not in ids:
                root_file.unlink()
                removed += 1
        used = {digest_hex(d) for r in records for d in _blob_digests(r)}
        for blob in self.blobs.iterdir():
            if blob.name not in used:
                blob.unlink()
                removed += 1
        tags = self._tags()
        known = {r.id for r in records}
        live = {t: i for t, i in tags.items() if i in known}
        if live != tags:
            self._save_tags(live)
            removed += len(tags) - len(live)
        return removed

    def _scratch_entry_dead(self, name: str) -> bool:
        """Whether scratch entry ``name`` belongs to no live operation."""
        try:
            fd = os.open(
                self.scratch_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            )
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return True  # a symlink: never ours
            raise
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                return True  # a temporary file of a write that died
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        finally:
            os.close(fd)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``, or a copy (0644) across file systems."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        with open(source, "rb") as src, open(target, "xb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(target, 0o644)


def _blob_digests(record: ImageRecord) -> set[str]:
    digests = {record.config_blob.digest}
    for manifest in record.manifests:
        digests.add(manifest.digest)
        digests.update(layer.digest for layer in manifest.layers)
    return digests


def _in_use(record: ImageRecord, in_use: Collection[str]) -> bool:
    return record.id in in_use or any(m.digest in in_use for m in record.manifests)


def _tree_bytes(path: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (
                    os.stat(os.path.join(directory, name), follow_symlinks=False).st_blocks * 512
                )
    return total


def _read_accounts(tree: StagingTree) -> Accounts:
    def text(path: tuple[str, ...]) -> str:
        data = tree.read_regular_file(path, MAX_ACCOUNT_FILE_BYTES)
        return data.decode("utf-8", "replace") if data else ""

    return Accounts(
        users=parse_passwd(text(("etc", "passwd"))), groups=parse_group(text(("etc", "group")))
    )


__all__ = [
    "ImageInfo",
    "ImageRecord",
    "ImageStore",
    "ImportCancelled",
    "ImportResult",
    "RegistrySource",
    "RemoveResult",
    "StoreLimits",
    "StoreSizes",
]
