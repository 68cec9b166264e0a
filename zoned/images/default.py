"""The default image: Debian bookworm (minbase) with python3, from the host's own apt sources.

``mmdebstrap`` builds the root file system as a tar (in its ``unshare``
mode: as root that keeps real owners but gives the build a private mount
namespace, so a killed build leaves no mount behind); the tar becomes the
single zstd layer of an OCI layout written here (config: ``PATH``,
``LANG=C.UTF-8``, ``Cmd ["/bin/bash"]`` like Debian's own container image);
the layout is imported like any other image and tagged
``zoned/default:bookworm`` and ``default``. Documentation, man pages and
info files are left out as in Debian's ``-slim`` images; copyright files
stay. Everything is built in the store's scratch area.

The apt sources are the host's: every enabled ``sources.list`` /
``*.sources`` / ``*.list`` file under ``/etc/apt`` that names the suite.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from zoned.images.erofs import file_sha256
from zoned.images.errors import ImageHostError, ImageNotFound
from zoned.images.progress import Cancel, ImportProgress, Progress, no_progress
from zoned.images.reference import parse_reference
from zoned.images.sources import OciLayoutSource
from zoned.images.store import ImageInfo, ImageStore
from zoned.images.tools import run_tool

SUITE: Final = "bookworm"
DEFAULT_TAG: Final = "zoned/default:bookworm"
DEFAULT_ALIAS: Final = "default"
DEFAULT_PATH_ENV: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What Debian's slim images leave out (copyright files stay).
DPKG_EXCLUDES: Final = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
)
BUILD_SECONDS: Final = 1800.0
APT_DIR: Final = Path("/etc/apt")


class DefaultImage(msgspec.Struct, frozen=True, kw_only=True):
    info: ImageInfo
    #: False when the store had it already (nothing was done).
    built: bool
    #: Seconds: mmdebstrap, layout (hash, compress, write), then the import's phases.
    timings: dict[str, float]


def host_apt_sources(suite: str = SUITE, apt_dir: Path = APT_DIR) -> list[Path]:
    """The host's enabled apt source files that name ``suite``."""
    candidates = [apt_dir / "sources.list"]
    listing = apt_dir / "sources.list.d"
    if listing.is_dir():
        candidates += sorted(
            p for p in listing.iterdir() if p.suffix in (".list", ".sources") and p.is_file()
        )
    word = re.compile(rf"(^|\s){re.escape(suite)}(\s|$)", re.MULTILINE)
    found = []
    for path in candidates:
        try:
            text = path.read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            continue
        active = "\n".join(
            line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        )
        if word.search(active):
            found.append(path)
    return found


def mmdebstrap_argv(output: Path, sources: Sequence[Path], architecture: str) -> list[str]:
    """The ``mmdebstrap`` command line for the default image's tar (pure)."""
    return [
        "mmdebstrap",
        "--quiet",
        "--mode=unshare",
        "--variant=minbase",
        "--include=python3",
        "--format=tar",
        f"--architectures={architecture}",
        *(f"--dpkgopt={option}" for option in DPKG_EXCLUDES),
        SUITE,
        str(output),
        *(str(s) for s in sources),
    ]


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def layout_documents(
    *,
    layer_digest: str,
    layer_size: int,
    diff_id: str,
    architecture: str,
    created: str,
) -> tuple[bytes, bytes]:
    """The config and the manifest of the default image (pure)."""
    config = _json(
        {
            "created": created,
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": [DEFAULT_PATH_ENV, "LANG=C.UTF-8"],
                "Cmd": ["/bin/bash"],
                "WorkingDir": "/",
                "Labels": {"org.opencontainers.image.title": f"zoned default ({SUITE})"},
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [
                {
                    "created": created,
                    "created_by": f"mmdebstrap --variant=minbase --include=python3 {SUITE}",
                }
            ],
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{hashlib.sha256(config).hexdigest()}",
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                    "digest": layer_digest,
                    "size": layer_size,
                }
            ],
        }
    )
    return config, manifest


def _put_blob(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}"


def ensure_default_image(
    store: ImageStore,
    *,
    sources: Sequence[Path] | None = None,
    progress: Progress = no_progress,
    cancel: Cancel | None = None,
) -> DefaultImage:
    """The default image, built and imported unless the store has it already."""
    cancel = cancel or Cancel()
    # One build at a time: a second caller waits, then finds the image.
    with store.lock("default-image.lock", image=DEFAULT_TAG, cancel=cancel):
        try:
            info = store.inspect(DEFAULT_TAG)
        except ImageNotFound:
            return _build(store, sources, progress, cancel)
    if parse_reference(DEFAULT_ALIAS).familiar() not in info.tags:
        info = store.tag(DEFAULT_TAG, DEFAULT_ALIAS)
    return DefaultImage(info=info, built=False, timings={})


def _build(
    store: ImageStore, sources: Sequence[Path] | None, progress: Progress, cancel: Cancel
) -> DefaultImage:
    timings: dict[str, float] = {}
    started = time.monotonic()
    image = DEFAULT_TAG
    apt_sources = list(sources) if sources is not None else host_apt_sources()
    if not apt_sources:
        raise ImageHostError(image, f"the host has no enabled apt source for {SUITE}")
    architecture = store.platform.architecture
    with store.operation(image) as op:
        progress(ImportProgress(image=image, phase="fetch"))
        tar = op.path / "root.tar"
        env = {**os.environ, "TMPDIR": str(op.path)}
        result = run_tool(
            image,
            mmdebstrap_argv(tar, apt_sources, architecture),
            cancel=cancel,
            scratch=op.path,
            max_seconds=BUILD_SECONDS,
            pass_fds=(op.fd,),
            env=env,
        )
        if result.returncode != 0:
            raise ImageHostError(image, f"mmdebstrap failed: {result.stderr[-2000:]}")
        timings["mmdebstrap"] = time.monotonic() - started
        started = time.monotonic()
        diff_id = _file_digest(tar)
        layout = op.path / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        compressed = op.path / "layer.tar.zst"
        result = run_tool(
            image,
            ["zstd", "-q", "-T0", "-3", str(tar), "-o", str(compressed)],
            cancel=cancel,
            scratch=op.path,
            max_seconds=BUILD_SECONDS,
            pass_fds=(op.fd,),
        )
        if result.returncode != 0:
            raise ImageHostError(image, f"zstd failed: {result.stderr}")
        tar.unlink()
        layer_digest = _file_digest(compressed)
        layer_size = compressed.stat().st_size
        os.rename(compressed, blobs / layer_digest.removeprefix("sha256:"))
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        config, manifest = layout_documents(
            layer_digest=layer_digest,
            layer_size=layer_size,
            diff_id=diff_id,
            architecture=architecture,
            created=created,
        )
        _put_blob(blobs, config)
        manifest_digest = _put_blob(blobs, manifest)
        (layout / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": SUITE},
                }
            ],
        }
        (layout / "index.json").write_bytes(_json(index))
        timings["layout"] = time.monotonic() - started
        imported = store.import_image(
            OciLayoutSource(path=str(layout), reference=SUITE),
            tags=[DEFAULT_TAG, DEFAULT_ALIAS],
            progress=progress,
            cancel=cancel,
        )
    timings.update({f"import_{phase}": t for phase, t in imported.timings.items()})
    return DefaultImage(info=imported.info, built=True, timings=timings)


def _file_digest(path: Path) -> str:
    return file_sha256(path)[0]
