"""Archives a client uploaded: a ``docker save`` archive, or an OCI layout as a tar.

The daemon never opens a path a client names (it runs as root; a client
could name a file only root may read). The client reads its own archive or
layout and sends the bytes; the daemon writes them to a scratch file of the
store, and the import helper decides here what they are:

- a tar with ``manifest.json`` at its top is a ``docker save`` archive
  (Docker 25 and later also put an OCI layout beside it): skopeo reads it as
  it is (``docker-archive:``);
- else a tar with ``oci-layout`` at its top is an OCI layout (an "OCI
  archive"): it is unpacked into a fresh directory of the operation and
  imported like any layout, with every check a layout gets.

Unpacking takes only what a layout is made of, as regular files:
``oci-layout``, ``index.json`` and ``blobs/sha256/<64 hex>``; directories on
those paths are made here, never taken from the archive. Anything else at
the top level (``manifest.json``, ``repositories``, a ``blobs/sha512``...)
is skipped; a link, a device, a name with ``..``, a duplicate, or a blob
anywhere else is refused, naming the entry. Blocking: run in a worker thread.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path
from typing import Final, Literal

from zoned.images.errors import InvalidImage

ArchiveKind = Literal["docker-archive", "oci-layout"]
_BLOB_RE: Final = re.compile(r"blobs/sha256/[0-9a-f]{64}")
_LAYOUT_FILES: Final = frozenset({"oci-layout", "index.json"})
_COPY_CHUNK: Final = 1 << 20


def _name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def archive_kind(image: str, path: Path) -> ArchiveKind:
    """What the uploaded tar at ``path`` holds; :class:`InvalidImage` if neither."""
    top: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = _name(member)
                if "/" not in name:
                    top.add(name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidImage(image, f"the uploaded archive is not a tar: {exc}") from None
    if "manifest.json" in top:
        return "docker-archive"
    if "oci-layout" in top:
        return "oci-layout"
    raise InvalidImage(
        image,
        "the uploaded archive is neither a docker save archive (no manifest.json)"
        " nor an OCI layout (no oci-layout)",
    )


def unpack_layout(image: str, archive: Path, destination: Path) -> Path:
    """The OCI layout of ``archive`` unpacked into ``destination`` (made here, empty)."""
    destination.mkdir(mode=0o700)
    blobs = destination / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    seen: set[str] = set()
    try:
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                name = _name(member)
                if not name or (member.isdir() and name in ("blobs", "blobs/sha256")):
                    continue
                parts = name.split("/")
                if ".." in parts or name.startswith("/"):
                    raise InvalidImage(image, f"archive entry {member.name!r} leaves the layout")
                wanted = name in _LAYOUT_FILES or _BLOB_RE.fullmatch(name) is not None
                if not wanted:
                    if "/" not in name and (member.isfile() or member.isdir()):
                        continue  # docker's manifest.json, repositories, ...
                    if name.startswith("blobs/") and not name.startswith("blobs/sha256/"):
                        continue  # other digest algorithms: nothing here uses them
                    raise InvalidImage(
                        image, f"archive entry {member.name!r} is not part of an OCI layout"
                    )
                if not member.isfile():
                    raise InvalidImage(
                        image, f"archive entry {member.name!r} is not a regular file"
                    )
                if name in seen:
                    raise InvalidImage(image, f"archive entry {member.name!r} appears twice")
                seen.add(name)
                source = tar.extractfile(member)
                assert source is not None
                fd = os.open(
                    destination / name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                )
                with os.fdopen(fd, "wb") as target:
                    while chunk := source.read(_COPY_CHUNK):
                        target.write(chunk)
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidImage(image, f"the uploaded archive is corrupt: {exc}") from None
    if not seen >= _LAYOUT_FILES:
        missing = ", ".join(sorted(_LAYOUT_FILES - seen))
        raise InvalidImage(image, f"the uploaded OCI layout lacks {missing}")
    return destination
