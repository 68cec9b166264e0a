"""``zonectl cp``: files and directories between this host and a zone.

One side is ``ZONE:PATH`` (an absolute path in the zone's workload root),
the other a local path. A directory travels as a tar stream: packed here
from a sorted walk on the way in; on the way out unpacked by
:meth:`zoned.client.Client.get_tree` (what comes out of a zone is hostile:
no link it made is followed, links leading out of the tree refuse the copy
unless ``--outward-links``, and a refused copy leaves nothing). A file is
streamed and lands under its name only once whole. Like ``cp -r``, a
directory or file copied to an existing local directory lands inside it
under its own name; a directory never lands over anything. What comes out
of a zone is bounded by ``--max-bytes``.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

import trio

from zoned import protocol as p
from zoned.client import Client
from zoned.errors import InvalidRequest


def split_zone_path(text: str) -> tuple[str, str] | None:
    """``ZONE:PATH`` as (zone, path); None for a local path."""
    zone, sep, path = text.partition(":")
    if not sep or not re.fullmatch(p.ZONE_NAME_PATTERN, zone):
        return None
    if not path.startswith("/"):
        raise InvalidRequest(f"{text!r}: the path in a zone must be absolute")
    return zone, path


async def local_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as source:
        while chunk := await source.read(p.MAX_EXEC_CHUNK):
            yield chunk


def pack(directory: Path, into: Path) -> None:
    with tarfile.open(into, "w") as archive:
        for entry in sorted(directory.iterdir()):
            archive.add(entry, arcname=entry.name)


async def copy(
    client: Client, source_text: str, dest_text: str, max_bytes: int, *, outward_links: bool = False
) -> str:
    """Copy one way between this host and a zone; what was copied, for people."""
    source, dest = split_zone_path(source_text), split_zone_path(dest_text)
    if (source is None) == (dest is None):
        raise InvalidRequest("give exactly one side as ZONE:PATH (the other is a local path)")
    with tempfile.TemporaryDirectory(prefix="zonectl-") as tmp:
        scratch = Path(tmp) / "tree.tar"
        if dest is not None:
            zone, path = dest
            local = Path(source_text)
            if local.is_dir():
                await trio.to_thread.run_sync(pack, local, scratch)
                await client.put_tree(zone, path, local_chunks(scratch))
                what = "directory"
            else:
                if path.endswith("/"):
                    path += local.name
                mode = local.stat().st_mode & 0o777
                size = await client.put_file(zone, path, local_chunks(local), mode=mode)
                what = f"{size} bytes"
            return f"copied {source_text} to {zone}:{path} ({what})"
        assert source is not None
        zone, path = source
        local = Path(dest_text)
        if await client.is_directory(zone, path):
            if local.is_dir():
                name = PurePosixPath(path).name
                if not name:
                    raise InvalidRequest(f"{dest_text!r} exists: give a new name to copy / to")
                local = local / name
            tree = await client.get_tree(
                zone, path, local, max_bytes=max_bytes, outward_links=outward_links
            )
            what = (
                f"directory: {tree.files} files, {tree.directories} directories,"
                f" {tree.symlinks} links, {tree.bytes} bytes"
            )
        else:
            if local.is_dir():
                local = local / PurePosixPath(path).name
            partial = local.with_name(f".{local.name}.zonectl-partial")
            size = 0
            try:
                async with await trio.open_file(partial, "wb") as sink:
                    async for chunk in client.stream_file(zone, path, max_bytes=max_bytes):
                        await sink.write(chunk)
                        size += len(chunk)
                partial.replace(local)
            finally:
                partial.unlink(missing_ok=True)
            what = f"{size} bytes"
        return f"copied {zone}:{path} to {local} ({what})"
