"""The daemon's image service: the store, the images zones use, and the image requests.

The store (:mod:`zoned.images.store`) is opened once at start-up; every
call into it blocks (file IO, hashing, lock waits), so each runs on a worker
thread. Imports and pulls do not run in the daemon at all: each is one run
of the image helper (:mod:`zoned.images.helper`), a child process or a
socket-activated service with the rights conversion needs, which the
daemon feeds the request and whose progress it relays to the client. At
most ``max_image_imports`` run at once; others wait, and no other request
waits for them.

Rules:

- **Zones hold their image.** A zone's image is resolved and leased in one
  step under :attr:`ImageService.lock` (:meth:`acquire`), which removal and
  pruning also hold: an image a zone is being created from is never removed
  under it. The lease lasts until the zone is destroyed (or its creation
  fails); a restarted daemon re-leases the images of the zones it adopts.
  The zone's root file system is verified (:meth:`ImageStore.verify_rootfs`,
  root-owned, 0644, its recorded sha256) before its domain starts.
- **The default image is the setup step's** (``zoned-host-setup`` builds
  it): ``prune`` keeps it, ``rm`` refuses it, and no import or pull may take
  its tags (nor ``builtin``, the name of the built-in root).
- **The daemon never reads a client's path.** An import's archive comes
  over the connection (:class:`~zoned.protocol.ImportImage`); it is written
  to a scratch directory of the store, bounded by ``max_image_mib``, and
  handed to the helper from there.
- **A client that goes away cancels its import**: the helper's input is
  closed, it kills its tools and keeps nothing; the uploaded archive is
  removed.
- ``tls_verify`` may be off only for a registry on loopback.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import trio

from zoned import protocol as p
from zoned.config import Config
from zoned.errors import Conflict, InternalError, InvalidRequest, ZonedError, error_from_code
from zoned.images import helper
from zoned.images.default import DEFAULT_ALIAS, DEFAULT_TAG
from zoned.images.errors import ImageNotFound
from zoned.images.imageconfig import Accounts, ImageConfig
from zoned.images.progress import ImportProgress
from zoned.images.reference import parse_reference
from zoned.images.sources import RegistryAuth, RegistrySource
from zoned.images.store import ImageInfo, ImageStore, ImportResult, RemoveResult, StoreSizes
from zoned.images.workloadroot import BUILTIN_CONFIG, builtin_accounts
from zoned.server import Send, StreamInputs

log = logging.getLogger(__name__)

#: After its input closed, how long the helper may take to stop before it is killed.
HELPER_EXIT_S: Final = 30.0
#: Upload progress replies at most this often.
UPLOAD_PROGRESS_S: Final = 0.25
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "[::1]"})


@dataclass(frozen=True)
class ZoneImage:
    """The workload root of one zone: the image and what runs in it."""

    #: The image as the zone was asked for ("default", a tag, an id...).
    reference: str
    #: ``sha256:<config digest>``, or ``builtin``.
    id: str
    rootfs: Path
    #: The sha256 (hex) the root file system was verified against.
    sha256: str
    config: ImageConfig
    accounts: Accounts


def _normal(reference: str) -> str | None:
    """The normalised tag ``reference`` is, or None if it is no tag at all."""
    try:
        return str(parse_reference(reference))
    except ZonedError:
        return None


def wire_image(info: ImageInfo, *, zones: int, default: bool) -> p.ImageInfo:
    """The client's view of a store image."""
    record = info.record
    config = record.config
    layers = record.manifests[0].layers if record.manifests else []
    return p.ImageInfo(
        id=record.id,
        tags=list(info.tags),
        repo_digests=list(record.repo_digests),
        platform=str(record.platform),
        created=record.created,
        imported_at=record.imported_at,
        layers=len(layers),
        rootfs_bytes=record.rootfs.size,
        entrypoint=list(config.entrypoint),
        cmd=list(config.cmd),
        env=list(config.env),
        working_dir=config.working_dir,
        user=config.user,
        labels=dict(config.labels),
        zones=zones,
        default=default,
    )


def wire_removal(id: int, result: RemoveResult) -> p.ImageRemoveReply:
    return p.ImageRemoveReply(
        id=id, untagged=result.untagged, removed=result.removed, freed_bytes=result.freed_bytes
    )


def wire_progress(id: int, event: ImportProgress) -> p.ImageProgress:
    """The wire's ImageProgress carries an ImportProgress's fields as they are."""
    return p.ImageProgress(id=id, **msgspec.structs.asdict(event))


class ImageService:
    """The image store of one daemon, the leases of its zones, the image requests."""

    def __init__(
        self, config: Config, *, builtin_root: Path | None, builtin_sha256: str = ""
    ) -> None:
        self.config = config
        self.builtin_root = builtin_root
        #: The built-in root's recorded hash; the zone manager verifies it at each start.
        self.builtin_sha256 = builtin_sha256
        self._store: ImageStore | None = None
        #: Held while an image is resolved for a zone, and while images are removed.
        self.lock = trio.Lock()
        #: zone name -> the image id it uses.
        self.leases: dict[str, str] = {}
        self._imports = trio.CapacityLimiter(config.max_image_imports)
        self._settings: dict[str, tuple[ImageConfig, Accounts]] = {}
        protected = {config.default_image, DEFAULT_TAG, DEFAULT_ALIAS, p.BUILTIN_IMAGE}
        self._protected_tags = {t for t in map(_normal, protected) if t is not None}

    @property
    def store(self) -> ImageStore:
        assert self._store is not None, "ImageService.open() was not awaited"
        return self._store

    async def open(self) -> None:
        """Open (and create) the store; remove what interrupted operations left."""
        root = Path(self.config.image_store)
        self._store = await trio.to_thread.run_sync(
            helper.store_for, root, self.config.max_image_mib
        )
        removed = await trio.to_thread.run_sync(self.store.cleanup)
        if removed:
            log.info(
                "image store %s: removed %d leftover(s) of interrupted operations", root, removed
            )

    # ------------------------------------------------------------- zones

    def builtin(self, reference: str = p.BUILTIN_IMAGE) -> ZoneImage:
        if self.builtin_root is None:
            raise InvalidRequest("this daemon has no built-in workload root")
        return ZoneImage(
            reference=reference,
            id=p.BUILTIN_IMAGE,
            rootfs=self.builtin_root,
            sha256=self.builtin_sha256,
            config=BUILTIN_CONFIG,
            accounts=builtin_accounts(),
        )

    async def acquire(self, zone: str, reference: str) -> ZoneImage:
        """The image ``reference`` names ("" for the default), leased to ``zone`` and
        verified. The caller releases it if the zone does not come to be."""
        wanted = reference or self.config.default_image
        if wanted == p.BUILTIN_IMAGE:
            return self.builtin(wanted)
        async with self.lock:
            try:
                record = await trio.to_thread.run_sync(self.store.resolve, wanted)
            except ImageNotFound as exc:
                if not reference:
                    raise ImageNotFound(
                        wanted,
                        "the default image (config default_image) is not in the image store"
                        f" {self.config.image_store}: run zoned-host-setup, which builds it",
                    ) from exc
                raise
            self.leases[zone] = record.id
        try:
            rootfs = await trio.to_thread.run_sync(self.store.verify_rootfs, record.id)
        except BaseException:
            self.release(zone)
            raise
        self._settings[record.id] = (record.config, record.accounts)
        return ZoneImage(
            reference=wanted,
            id=record.id,
            rootfs=rootfs,
            sha256=record.rootfs.sha256.removeprefix("sha256:"),
            config=record.config,
            accounts=record.accounts,
        )

    async def check(self, reference: str) -> None:
        """ImageNotFound (or InvalidRequest) unless ``reference`` names an image
        a zone could boot now; nothing is leased."""
        wanted = reference or self.config.default_image
        if wanted == p.BUILTIN_IMAGE:
            self.builtin(wanted)
            return
        await trio.to_thread.run_sync(self.store.resolve, wanted)

    def adopt(self, zone: str, image_id: str) -> None:
        """A zone found running at start-up keeps its image."""
        if image_id and image_id != p.BUILTIN_IMAGE:
            self.leases[zone] = image_id

    def release(self, zone: str) -> None:
        self.leases.pop(zone, None)

    def rename(self, zone: str, new_name: str) -> None:
        """``zone``'s lease is ``new_name``'s now (a pool zone acquired)."""
        if zone in self.leases:
            self.leases[new_name] = self.leases.pop(zone)

    def in_use(self) -> set[str]:
        return set(self.leases.values())

    async def settings(self, image_id: str) -> tuple[ImageConfig, Accounts]:
        """The run settings of a zone's image (its config and accounts)."""
        if not image_id or image_id == p.BUILTIN_IMAGE:
            return BUILTIN_CONFIG, builtin_accounts()
        cached = self._settings.get(image_id)
        if cached is None:
            record = await trio.to_thread.run_sync(self.store.resolve, image_id)
            cached = self._settings[image_id] = (record.config, record.accounts)
        return cached

    # ---------------------------------------------------------- requests

    async def handle(self, request: p.Request, send: Send, inputs: StreamInputs) -> None:
        """Carry out one image request."""
        match request:
            case p.ListImages():
                images = await self._list()
                await send(p.ImageListReply(id=request.id, images=images))
            case p.InspectImage():
                info = await trio.to_thread.run_sync(self.store.inspect, request.reference)
                await send(p.ImageReply(id=request.id, image=await self._wire(info)))
            case p.RemoveImage():
                await send(wire_removal(request.id, await self._remove(request.reference)))
            case p.PruneImages():
                await send(wire_removal(request.id, await self._prune()))
            case p.ImageSizes():
                sizes = await trio.to_thread.run_sync(self.store.sizes)
                await send(p.ImageSizesReply(id=request.id, sizes=_wire_sizes(sizes)))
            case p.PullImage():
                await self._reply_imported(request.id, await self._pull(request, send), send)
            case p.ImportImage():
                await self._reply_imported(
                    request.id, await self._import(request, send, inputs), send
                )
            case _:
                raise InternalError(f"{type(request).__name__} is not an image request")

    async def _default_id(self) -> str | None:
        try:
            record = await trio.to_thread.run_sync(self.store.resolve, self.config.default_image)
        except ZonedError:
            return None
        return record.id

    async def _wire(self, info: ImageInfo) -> p.ImageInfo:
        zones = sum(1 for image_id in self.leases.values() if image_id == info.id)
        return wire_image(info, zones=zones, default=info.id == await self._default_id())

    async def _list(self) -> list[p.ImageInfo]:
        infos = await trio.to_thread.run_sync(self.store.list_images)
        default = await self._default_id()
        in_use = list(self.leases.values())
        return [
            wire_image(info, zones=in_use.count(info.id), default=info.id == default)
            for info in infos
        ]

    async def _remove(self, reference: str) -> RemoveResult:
        async with self.lock:
            record = await trio.to_thread.run_sync(self.store.resolve, reference)
            if record.id == await self._default_id():
                tags = (await trio.to_thread.run_sync(self.store.inspect, record.id)).tags
                tag = _normal(reference)
                if tag is None or tag in self._protected_tags or len(tags) < 2:
                    raise Conflict(
                        f"image {reference}: it is the default image (config default_image);"
                        " zoned-host-setup owns it"
                    )
            in_use = self.in_use()
            return await trio.to_thread.run_sync(
                lambda: self.store.remove(reference, in_use=in_use)
            )

    async def _prune(self) -> RemoveResult:
        async with self.lock:
            keep = self.in_use()
            default = await self._default_id()
            if default is not None:
                keep.add(default)
            return await trio.to_thread.run_sync(lambda: self.store.prune(in_use=keep))

    # ------------------------------------------------------------ imports

    def _check_tags(self, tags: list[str], pulled: str | None = None) -> None:
        for tag in [*tags, *([pulled] if pulled is not None else [])]:
            normal = _normal(tag)
            if normal is None:
                raise InvalidRequest(f"invalid image tag {tag[:100]!r}")
            if normal in self._protected_tags:
                raise InvalidRequest(
                    f"image tag {tag!r} is reserved: the default image and the built-in root"
                    " are the setup step's"
                )

    async def _reply_imported(self, id: int, result: ImportResult, send: Send) -> None:
        image = await self._wire(result.info)
        await send(p.ImageReply(id=id, image=image, converted=result.converted))

    async def _pull(self, request: p.PullImage, send: Send) -> ImportResult:
        reference = parse_reference(request.reference)
        self._check_tags(
            request.tags, request.reference if reference.tag and not reference.digest else None
        )
        if not request.tls_verify and reference.domain.rsplit(":", 1)[0] not in _LOOPBACK:
            raise InvalidRequest(
                f"tls_verify may be off only for a registry on loopback, not {reference.domain}"
            )
        auth = None
        if request.username or request.password or request.registry_token:
            auth = RegistryAuth(
                username=request.username,
                password=request.password,
                registry_token=request.registry_token,
            )
        source = RegistrySource(
            reference=request.reference, auth=auth, tls_verify=request.tls_verify
        )
        work = helper.HelperRequest(source=source, platform=request.platform, tags=request.tags)
        return await self._run_helper(request.id, work, send)

    async def _import(
        self, request: p.ImportImage, send: Send, inputs: StreamInputs
    ) -> ImportResult:
        limit = self.config.max_image_mib * 1024 * 1024
        if request.size > limit:
            raise InvalidRequest(
                f"the archive has {request.size} bytes; this daemon imports at most"
                f" {self.config.max_image_mib} MiB (max_image_mib)"
            )
        self._check_tags(request.tags)
        if inputs is None:
            raise InternalError("import_image without its input channel")
        async with self._scratch("upload") as directory:
            archive = directory / "upload.tar"
            await _receive(request, inputs, archive, send)
            source = helper.UploadedArchive(path=str(archive), reference=request.reference)
            work = helper.HelperRequest(source=source, platform=request.platform, tags=request.tags)
            return await self._run_helper(request.id, work, send)

    @contextlib.asynccontextmanager
    async def _scratch(self, what: str) -> AsyncIterator[Path]:
        """A locked scratch directory of the store (removed afterwards, whatever happens)."""
        manager = self.store.operation(what)
        operation = await trio.to_thread.run_sync(manager.__enter__)
        try:
            yield operation.path
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(manager.__exit__, None, None, None)

    async def _run_helper(self, id: int, work: helper.HelperRequest, send: Send) -> ImportResult:
        async with self._imports, self._helper() as stream:
            await stream.send_all(helper.frame(work))
            reader = _Frames(stream)
            while (payload := await reader.next()) is not None:
                match helper.decode_reply(payload):
                    case helper.HelperProgress(progress=event):
                        await send(wire_progress(id, event))
                    case helper.HelperImported(result=result):
                        return result
                    case helper.HelperFailed(code=code, message=message):
                        raise error_from_code(code, message)
        raise InternalError("the image helper ended without a result; see the daemon log")

    @contextlib.asynccontextmanager
    async def _helper(self) -> AsyncIterator[trio.abc.Stream]:
        """A connection to a fresh image helper; closing it tells the helper to stop."""
        if self.config.image_helper_socket:
            try:
                stream = await trio.open_unix_socket(self.config.image_helper_socket)
            except OSError as exc:
                raise InternalError(
                    f"cannot reach the image helper at {self.config.image_helper_socket}: {exc}"
                ) from exc
            try:
                yield stream
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            return
        argv = [
            sys.executable,
            "-m",
            "zoned.images.helper",
            "--store",
            self.config.image_store,
            "--max-image-mib",
            str(self.config.max_image_mib),
        ]
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            yield trio.StapledStream(process.stdin, process.stdout)
        finally:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()
                with trio.move_on_after(HELPER_EXIT_S):
                    await process.wait()
                if process.returncode is None:
                    log.warning("the image helper did not stop within %gs: killed", HELPER_EXIT_S)
                    process.kill()
                    await process.wait()
                await process.stdout.aclose()


class _Frames:
    """Frames from the helper (length-prefixed, bounded)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            data = await self._stream.receive_some(1 << 16)
            if not data:
                return False
            self._buffer += data
        return True

    async def next(self) -> bytes | None:
        if not await self._fill(4):
            return None
        length = helper.frame_length(bytes(self._buffer[:4]))
        if not await self._fill(4 + length):
            return None
        payload = bytes(self._buffer[4 : 4 + length])
        del self._buffer[: 4 + length]
        return payload


async def _receive(
    request: p.ImportImage,
    inputs: trio.MemoryReceiveChannel[p.StreamInput],
    archive: Path,
    send: Send,
) -> None:
    """Write the client's archive to ``archive``: exactly ``request.size`` bytes, then eof."""
    received = 0
    reported = trio.current_time()
    async with await trio.open_file(archive, "xb") as file:
        async for message in inputs:
            if not isinstance(message, p.ImageData):
                raise InvalidRequest("an import takes image_data input only")
            received += len(message.data)
            if received > request.size:
                raise InvalidRequest(
                    f"the archive is longer than the {request.size} bytes announced"
                )
            if message.data:
                await file.write(message.data)
            now = trio.current_time()
            if message.eof or now - reported >= UPLOAD_PROGRESS_S:
                reported = now
                await send(
                    p.ImageProgress(
                        id=request.id,
                        image="the uploaded archive",
                        phase="upload",
                        bytes_done=received,
                        bytes_total=request.size,
                    )
                )
            if message.eof:
                break
        else:
            raise InvalidRequest("the client stopped sending before the archive's end")
    if received != request.size:
        raise InvalidRequest(
            f"the archive ended after {received} of the {request.size} bytes announced"
        )


def _wire_sizes(sizes: StoreSizes) -> p.ImageStoreSizes:
    return p.ImageStoreSizes(
        images=[
            p.ImageSizeInfo(
                id=i.id,
                tags=list(i.tags),
                rootfs_bytes=i.rootfs_bytes,
                blob_bytes=i.blob_bytes,
                shared_blob_bytes=i.shared_blob_bytes,
            )
            for i in sizes.images
        ],
        rootfs_bytes=sizes.rootfs_bytes,
        blob_bytes=sizes.blob_bytes,
        scratch_bytes=sizes.scratch_bytes,
        total_bytes=sizes.total_bytes,
    )
