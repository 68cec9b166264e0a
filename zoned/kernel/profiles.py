"""Kernel profiles and the pinned source, as declared in ``guest-kernel/profiles.toml``."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

GUEST_KERNEL_DIR = Path(__file__).resolve().parent.parent.parent / "guest-kernel"


class Source(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    package: str
    version: str
    tarball: str


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str
    fragments: list[str]


class Profiles(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: Source
    profiles: dict[str, Profile]


def load_profiles(guest_kernel_dir: Path = GUEST_KERNEL_DIR) -> Profiles:
    """Read profiles.toml; unknown keys and missing fields are errors."""
    raw = tomllib.loads((guest_kernel_dir / "profiles.toml").read_text())
    return msgspec.convert(raw, Profiles)
