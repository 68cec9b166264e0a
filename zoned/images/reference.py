"""Image references, digests and platforms: parsing and normalisation (pure).

References follow Docker's grammar and normalisation, because that is what
users type and what registries expect: ``alpine`` is
``docker.io/library/alpine:latest``; ``127.0.0.1:5000/team/app:v1`` names a
registry by its first component because that component has a ``.`` or a
``:`` (or is ``localhost``); a reference carries a tag, a digest, or both
(``name:tag@sha256:...``: the digest decides). Only ``sha256`` digests are
accepted: it is the only algorithm OCI requires and the only one the store
addresses by.

Platforms are ``os/architecture[/variant]`` in Go's (and OCI's) spelling;
``x86_64`` and ``aarch64`` are accepted as their aliases.
"""

from __future__ import annotations

import os
import re
from typing import Final

import msgspec

from zoned.errors import InvalidRequest

DEFAULT_DOMAIN: Final = "docker.io"
OFFICIAL_PREFIX: Final = "library/"
DEFAULT_TAG: Final = "latest"
MAX_NAME_LENGTH: Final = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE: Final = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?")
_PATH_COMPONENT_RE: Final = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE: Final = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE: Final = re.compile(r"sha256:[a-f0-9]{64}")


def check_digest(digest: str, what: str = "digest") -> str:
    """``digest`` if it is ``sha256:<64 lowercase hex>``, else ``InvalidRequest``."""
    if not DIGEST_RE.fullmatch(digest):
        raise InvalidRequest(f"{what} {digest[:100]!r} is not a sha256 digest (sha256:<64 hex>)")
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a checked digest (the store's file name for it)."""
    return check_digest(digest)[len("sha256:") :]


class Reference(msgspec.Struct, frozen=True):
    """A normalised image reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """The short form Docker prints: ``alpine:latest``, ``team/app:v1``."""
        text = str(self)
        prefix = f"{DEFAULT_DOMAIN}/"
        if self.domain == DEFAULT_DOMAIN:
            text = text.removeprefix(prefix).removeprefix(OFFICIAL_PREFIX)
        return text

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, None, digest)


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; a name without tag or digest gets ``:latest``.

    Raises ``InvalidRequest`` naming what is wrong with it.
    """
    if not text or len(text) > 2 * MAX_NAME_LENGTH or text != text.strip():
        raise InvalidRequest(f"invalid image reference {text[:100]!r}")
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        check_digest(digest, f"digest of image reference {text!r}")
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidRequest(f"invalid tag {tag!r} in image reference {text!r}")
    first, sep, remainder = rest.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        domain, path = first, remainder
        if not _DOMAIN_RE.fullmatch(domain):
            raise InvalidRequest(f"invalid registry {domain!r} in image reference {text!r}")
    else:
        domain, path = DEFAULT_DOMAIN, rest
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    if not path or not all(_PATH_COMPONENT_RE.fullmatch(c) for c in path.split("/")):
        raise InvalidRequest(
            f"invalid repository name {rest!r} in image reference {text!r}"
            " (lowercase letters, digits and separators . _ __ - only)"
        )
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise InvalidRequest(f"image reference {text[:100]!r}... is too long")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


class Platform(msgspec.Struct, frozen=True):
    """What an image runs on, in OCI's words: ``linux``/``amd64``/``""``."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def accepts(self, image: Platform) -> bool:
        """Whether an image built for ``image`` runs here; an empty variant asks for none."""
        image = normalise_platform(image)
        wanted = normalise_platform(self)
        return (
            image.os == wanted.os
            and image.architecture == wanted.architecture
            and (not wanted.variant or image.variant == wanted.variant)
        )


_ARCH_ALIASES: Final = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i686": "386"}
#: Variants that are the default for their architecture, so "" means the same.
_DEFAULT_VARIANTS: Final = {("arm64", "v8"), ("amd64", "v1")}


def normalise_platform(platform: Platform) -> Platform:
    arch = _ARCH_ALIASES.get(platform.architecture, platform.architecture)
    variant = "" if (arch, platform.variant) in _DEFAULT_VARIANTS else platform.variant
    return Platform(platform.os, arch, variant)


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]``, e.g. ``linux/amd64`` or ``linux/arm/v7``."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"[a-z0-9_-]{1,32}", p) for p in parts):
        raise InvalidRequest(f"invalid platform {text[:100]!r}: expected os/arch[/variant]")
    return normalise_platform(Platform(*parts))


def platform_for_machine(machine: str) -> Platform:
    """The platform of a Linux host whose ``uname -m`` is ``machine``."""
    return normalise_platform(Platform("linux", machine))


def host_platform() -> Platform:
    """This host's platform: the only one its zones run."""
    return platform_for_machine(os.uname().machine)
