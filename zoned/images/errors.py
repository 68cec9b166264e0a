"""Errors about one image: each names the image and the problem.

The codes follow whose fault it is (see :mod:`zoned.errors`): bad input
(a corrupt layer, a hostile entry, a digest that does not match, the wrong
platform) is ``invalid_request``; a reference that does not resolve is
``not_found``; a registry refusing our credentials ``permission_denied``;
an image a zone still uses ``conflict``; a host tool that is missing or
fails for reasons of its own, or a full disk, ``internal``.
"""

from __future__ import annotations

from zoned.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ZonedError,
)


class ImageError(ZonedError):
    """Something about ``image`` (as the caller named it) went wrong: ``problem``."""

    def __init__(self, image: str, problem: str) -> None:
        super().__init__(f"image {image}: {problem}")
        self.image = image
        self.problem = problem


class ImageNotFound(ImageError, NotFound):
    """The reference does not resolve: not in the store, the registry or the archive."""


class InvalidImage(ImageError, InvalidRequest):
    """The image is refused: corrupt, hostile, unsupported or for another platform."""


class ImageAccessDenied(ImageError, PermissionDenied):
    """The registry refused the credentials (or wanted some)."""


class ImageInUse(ImageError, Conflict):
    """The image cannot be removed: a zone uses it."""


class ImageHostError(ImageError, InternalError):
    """The host failed us: a tool (skopeo, mkfs.erofs, zstd, mmdebstrap) missing or
    failing, no space left, a privilege the converter lacks."""


class ImportCancelled(ImageError, InternalError):
    """The caller cancelled the operation; nothing of it was kept."""
