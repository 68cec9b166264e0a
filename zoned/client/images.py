"""The image calls of :class:`~zoned.client.Client`: pull, import, list, inspect, remove.

Pulls and imports are streams: the daemon reports progress
(:class:`~zoned.protocol.ImageProgress`, at most a few a second) to the
``progress`` callback, then the image. Cancelling the call (or closing the
client) cancels the import in the daemon; nothing of it is kept.

An import sends the archive over the connection; the daemon never opens a
path of the client's (it runs as root): this client reads what it may read.
A directory is an OCI image layout and goes as a tar of its ``oci-layout``,
``index.json`` and ``blobs/sha256/*`` (links followed, as the caller may
read them); a file (a ``docker save`` archive, an OCI archive) goes as it is.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from zoned import protocol as p
from zoned.client.connection import STREAM_BUFFER, ClientError, Connection, expect
from zoned.client.options import ImportOptions, PullOptions, wire_request
from zoned.errors import InvalidRequest, innermost

if TYPE_CHECKING:
    from typing import Unpack

#: Bytes per ImageData message.
UPLOAD_CHUNK = p.MAX_IMAGE_CHUNK
_BLOCK = tarfile.BLOCKSIZE

#: Called with each progress report of a pull or import.
ProgressCallback = Callable[[p.ImageProgress], None]


class _Archive:
    """What an import sends: its size up front, then its bytes in pieces."""

    def __init__(self, members: list[tuple[str, Path, int]] | None, file: Path, size: int) -> None:
        self._members = members
        self._file = file
        self.size = size

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> _Archive:
        source = trio.Path(path)
        try:
            st = await source.stat()
        except OSError as exc:
            raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
        if stat.S_ISREG(st.st_mode):
            return cls(None, Path(path), st.st_size)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidRequest(f"{path} is neither an OCI layout directory nor an archive file")
        members = await trio.to_thread.run_sync(_layout_members, Path(path))
        size = sum(_BLOCK + _padded(length) for _, _, length in members) + 2 * _BLOCK
        return cls(members, Path(path), size)

    async def pieces(self) -> AsyncIterator[bytes]:
        if self._members is None:
            async for piece in _read_file(self._file, self.size):
                yield piece
            return
        for name, member, length in self._members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = length, 0o644, 0
            yield info.tobuf(format=tarfile.USTAR_FORMAT)
            async for piece in _read_file(member, length):
                yield piece
            if length % _BLOCK:
                yield bytes(_BLOCK - length % _BLOCK)
        yield bytes(2 * _BLOCK)


def _padded(length: int) -> int:
    return -(-length // _BLOCK) * _BLOCK


def _layout_members(root: Path) -> list[tuple[str, Path, int]]:
    """The files of the OCI layout at ``root``: (name in the tar, path, size). Blocking."""
    members = []
    for name in ("oci-layout", "index.json"):
        path = root / name
        if not path.is_file():
            raise InvalidRequest(f"{root} is not an OCI image layout: it has no {name}")
        members.append((name, path, path.stat().st_size))
    blobs = root / "blobs" / "sha256"
    if blobs.is_dir():
        for path in sorted(blobs.iterdir()):
            if path.is_file():
                members.append((f"blobs/sha256/{path.name}", path, path.stat().st_size))
    return members


async def _read_file(path: Path, length: int) -> AsyncIterator[bytes]:
    """Exactly ``length`` bytes of ``path``, in pieces; a file that changed is an error."""
    left = length
    async with await trio.open_file(path, "rb") as file:
        while left:
            piece = await file.read(min(UPLOAD_CHUNK, left))
            if not piece:
                raise ClientError(f"{path} shrank while it was being sent")
            left -= len(piece)
            yield piece


def _chunks(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The pieces regrouped into UPLOAD_CHUNK-sized messages (the last shorter)."""

    async def regroup() -> AsyncIterator[bytes]:
        buffer = bytearray()
        async for piece in pieces:
            buffer += piece
            while len(buffer) >= UPLOAD_CHUNK:
                yield bytes(buffer[:UPLOAD_CHUNK])
                del buffer[:UPLOAD_CHUNK]
        if buffer:
            yield bytes(buffer)

    return regroup()


class ImageCalls(Connection):
    """The image requests of :class:`~zoned.client.Client`."""

    async def list_images(self) -> list[p.ImageInfo]:
        """Every image of the daemon's store."""
        reply = await self._call(lambda id: p.ListImages(id=id))
        return expect(reply, p.ImageListReply).images

    async def inspect_image(self, reference: str) -> p.ImageInfo:
        """One image by tag, ``name@digest``, id or id prefix; NotFound if none."""
        reply = await self._call(lambda id: p.InspectImage(id=id, reference=reference))
        return expect(reply, p.ImageReply).image

    async def remove_image(self, reference: str) -> p.ImageRemoveReply:
        """Untag ``reference``, or remove its image if that was its last tag (or an id).

        :class:`~zoned.errors.Conflict` while a zone uses it, and for the default image.
        """
        reply = await self._call(lambda id: p.RemoveImage(id=id, reference=reference))
        return expect(reply, p.ImageRemoveReply)

    async def prune_images(self) -> p.ImageRemoveReply:
        """Remove every image no zone uses (not the default image)."""
        reply = await self._call(lambda id: p.PruneImages(id=id))
        return expect(reply, p.ImageRemoveReply)

    async def image_sizes(self) -> p.ImageStoreSizes:
        """The store's disk use, per image and in all."""
        reply = await self._call(lambda id: p.ImageSizes(id=id))
        return expect(reply, p.ImageSizesReply).sizes

    async def pull_image(
        self,
        reference: str,
        *,
        progress: ProgressCallback | None = None,
        **options: Unpack[PullOptions],
    ) -> p.ImageInfo:
        """Fetch ``reference`` from its registry into the daemon's store, converted
        (``options``: :class:`~zoned.client.options.PullOptions`)."""

        def build(id: int) -> p.Request:
            return wire_request(p.PullImage, id, options, reference=reference)

        request_id, replies = await self._start(build, STREAM_BUFFER, stream=True)
        try:
            with replies:
                return await self._image_stream(replies, progress)
        finally:
            self._forget(request_id)

    async def import_image(
        self,
        path: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
        **options: Unpack[ImportOptions],
    ) -> p.ImageInfo:
        """Import the OCI layout directory or archive file at ``path`` (read by this
        client; ``options``: :class:`~zoned.client.options.ImportOptions`)."""
        archive = await _Archive.open(path)
        request_id, replies = await self._start(
            lambda id: wire_request(p.ImportImage, id, options, size=archive.size),
            STREAM_BUFFER,
            stream=True,
        )

        async def upload() -> None:
            pieces = _chunks(archive.pieces())
            piece = await anext(pieces, None)
            while piece is not None:
                following = await anext(pieces, None)
                await self._send_input(
                    p.ImageData(id=request_id, data=piece, eof=following is None)
                )
                piece = following

        try:
            with replies:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(upload)
                    image = await self._image_stream(replies, progress)
                    nursery.cancel_scope.cancel()
                return image
        except BaseExceptionGroup as group:
            inner = innermost(group)
            if isinstance(inner, Exception) and not isinstance(inner, BaseExceptionGroup):
                raise inner from None
            raise
        finally:
            self._forget(request_id)

    async def _image_stream(
        self, replies: trio.MemoryReceiveChannel[p.Reply], progress: ProgressCallback | None
    ) -> p.ImageInfo:
        while True:
            reply = await self._receive(replies)
            if isinstance(reply, p.ImageProgress):
                if progress is not None:
                    progress(reply)
                continue
            return expect(reply, p.ImageReply).image
