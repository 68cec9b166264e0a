"""The kernel store: built images with their config and manifest.

Layout::

    <store>/<profile>-<hash16>/bzImage
    <store>/<profile>-<hash16>/config
    <store>/<profile>-<hash16>/manifest.json
    <store>/<profile> -> <profile>-<hash16>      (the current build)

The hash covers everything that shapes the image (source version, fragments,
compiler, build tool version), so an unchanged request finds its build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from zoned.errors import NotFound

#: Where the daemon and ``zoned-kernel`` keep built kernels unless told otherwise.
DEFAULT_STORE = Path("/var/lib/zoned/kernels")


class KernelManifest(msgspec.Struct, frozen=True, kw_only=True):
    profile: str
    kernel_version: str  # the upstream version, e.g. 6.12.117
    kernel_release: str  # what `uname -r` prints in the guest
    debian_package: str
    debian_version: str
    fragments: list[str]
    fragment_hash: str
    build_hash: str
    compiler: str
    build_time: str  # ISO 8601, when this image was built
    build_seconds: float
    image: str  # file name inside the build directory
    image_sha256: str
    image_size: int
    cmdline: list[str]  # the profile's hardened command line (without per-host parts)
    not_enabled: list[str] = []  # requested-elsewhere options left out on purpose, with why


@dataclass(frozen=True)
class KernelImage:
    directory: Path
    image: Path
    config: Path
    manifest: KernelManifest


def read_build(directory: Path) -> KernelImage:
    manifest = msgspec.json.decode((directory / "manifest.json").read_bytes(), type=KernelManifest)
    return KernelImage(directory, directory / manifest.image, directory / "config", manifest)


def find_kernel(store: Path, profile: str) -> KernelImage:
    """The current build of ``profile``; NotFound names the command that builds it."""
    link = store / profile
    if not (link / "manifest.json").is_file():
        raise NotFound(
            f"no kernel for profile {profile!r} in {store}: "
            f"build it with `zoned-kernel build --profile {profile} --store {store}`"
        )
    return read_build(link.resolve())


def list_kernels(store: Path) -> list[KernelImage]:
    """The current build of every profile present in the store."""
    if not store.is_dir():
        return []
    return [
        read_build(entry.resolve())
        for entry in sorted(store.iterdir())
        if entry.is_symlink() and (entry / "manifest.json").is_file()
    ]
