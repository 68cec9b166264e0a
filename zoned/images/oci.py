"""OCI and Docker image documents: indexes, manifests, configs (pure).

Only what the store needs is decoded; unknown fields are ignored (both
specifications allow extensions), but every field we use is type-checked,
sizes are bounded, and anything that is not a container image (artifacts,
schema 1 manifests, Windows layers, unknown compressions) is refused by
name. Layer compression is decided by the blob's first bytes, as Docker
does: ``docker save`` archives label uncompressed layers ``tar.gzip``.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from zoned.images.errors import InvalidImage
from zoned.images.reference import DIGEST_RE, Platform

OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_LIST})
CONFIG_TYPES: Final = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)
#: Largest manifest, index or config we read (Docker's own limit is 4 MiB).
MAX_DOCUMENT_BYTES: Final = 4 * 1024 * 1024

Compression = Literal["none", "gzip", "zstd"]
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


class Descriptor(msgspec.Struct, frozen=True):
    media_type: str = msgspec.field(name="mediaType")
    digest: str
    size: int
    platform: DescriptorPlatform | None = None
    annotations: dict[str, str] | None = None


class DescriptorPlatform(msgspec.Struct, frozen=True):
    os: str
    architecture: str
    variant: str = ""


class Index(msgspec.Struct, frozen=True):
    schema_version: int = msgspec.field(name="schemaVersion")
    manifests: list[Descriptor]
    media_type: str | None = msgspec.field(name="mediaType", default=None)


class Manifest(msgspec.Struct, frozen=True):
    schema_version: int = msgspec.field(name="schemaVersion")
    config: Descriptor
    layers: list[Descriptor]
    media_type: str | None = msgspec.field(name="mediaType", default=None)


class ContainerConfig(msgspec.Struct, frozen=True):
    """The part of an image config that says how to run it (Docker's spelling)."""

    Entrypoint: list[str] | None = None
    Cmd: list[str] | None = None
    Env: list[str] | None = None
    WorkingDir: str | None = None
    User: str | None = None
    Labels: dict[str, str] | None = None
    StopSignal: str | None = None


class RootFS(msgspec.Struct, frozen=True):
    type: str
    diff_ids: list[str]


class ConfigFile(msgspec.Struct, frozen=True):
    architecture: str
    os: str
    rootfs: RootFS
    variant: str = ""
    config: ContainerConfig | None = None
    created: str | None = None

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


_index_decoder: Final = msgspec.json.Decoder(Index)
_manifest_decoder: Final = msgspec.json.Decoder(Manifest)
_config_decoder: Final = msgspec.json.Decoder(ConfigFile)


class _MediaTypeOnly(msgspec.Struct):
    media_type: str | None = msgspec.field(name="mediaType", default=None)
    schema_version: int | None = msgspec.field(name="schemaVersion", default=None)
    manifests: list[msgspec.Raw] | None = None


_peek_decoder: Final = msgspec.json.Decoder(_MediaTypeOnly)


def _check_descriptor(image: str, what: str, desc: Descriptor, max_size: int) -> None:
    if not DIGEST_RE.fullmatch(desc.digest):
        raise InvalidImage(image, f"{what} has digest {desc.digest[:80]!r}: only sha256 is used")
    if not 0 <= desc.size <= max_size:
        raise InvalidImage(image, f"{what} {desc.digest} claims {desc.size} bytes")


def document_kind(image: str, data: bytes) -> Literal["index", "manifest"]:
    """Whether ``data`` is an index (manifest list) or an image manifest."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidImage(image, f"manifest is {len(data)} bytes, more than we read")
    try:
        peek = _peek_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidImage(image, f"manifest is not valid JSON: {exc}") from None
    if peek.schema_version != 2:
        raise InvalidImage(
            image, f"manifest schema version {peek.schema_version} is not supported (only 2)"
        )
    if peek.media_type in INDEX_TYPES or (peek.media_type is None and peek.manifests is not None):
        return "index"
    if peek.media_type is None or peek.media_type in MANIFEST_TYPES:
        return "manifest"
    raise InvalidImage(image, f"manifest media type {peek.media_type!r} is not a container image")


def parse_index(image: str, data: bytes) -> Index:
    try:
        index = _index_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidImage(image, f"index is not a valid OCI index: {exc}") from None
    for desc in index.manifests:
        _check_descriptor(image, "index entry", desc, MAX_DOCUMENT_BYTES)
    return index


def parse_manifest(image: str, data: bytes, *, max_layers: int, max_blob_bytes: int) -> Manifest:
    """Decode and check an image manifest (OCI or Docker schema 2)."""
    if document_kind(image, data) != "manifest":
        raise InvalidImage(image, "expected an image manifest, found an index")
    try:
        manifest = _manifest_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidImage(image, f"manifest is not a valid image manifest: {exc}") from None
    if manifest.config.media_type not in CONFIG_TYPES:
        raise InvalidImage(
            image, f"config media type {manifest.config.media_type!r} is not a container image"
        )
    _check_descriptor(image, "config", manifest.config, MAX_DOCUMENT_BYTES)
    if not manifest.layers:
        raise InvalidImage(image, "manifest has no layers")
    if len(manifest.layers) > max_layers:
        raise InvalidImage(image, f"{len(manifest.layers)} layers, more than {max_layers}")
    for number, layer in enumerate(manifest.layers, 1):
        if layer.media_type not in LAYER_TYPES:
            raise InvalidImage(
                image, f"layer {number} has media type {layer.media_type!r}: not a tar layer"
            )
        _check_descriptor(image, f"layer {number}", layer, max_blob_bytes)
    return manifest


def parse_config(image: str, data: bytes, layers: int) -> ConfigFile:
    """Decode and check an image config whose manifest has ``layers`` layers."""
    try:
        config = _config_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidImage(image, f"config is not a valid image config: {exc}") from None
    if config.rootfs.type != "layers":
        raise InvalidImage(image, f"config rootfs type {config.rootfs.type!r} is not 'layers'")
    if len(config.rootfs.diff_ids) != layers:
        raise InvalidImage(
            image,
            f"config lists {len(config.rootfs.diff_ids)} layer digests, the manifest {layers}",
        )
    for diff_id in config.rootfs.diff_ids:
        if not DIGEST_RE.fullmatch(diff_id):
            raise InvalidImage(image, f"config has layer digest {diff_id[:80]!r}: not sha256")
    for name, values in (
        ("Entrypoint", config.config and config.config.Entrypoint),
        ("Cmd", config.config and config.config.Cmd),
        ("Env", config.config and config.config.Env),
    ):
        for value in values or ():
            if "\0" in value:
                raise InvalidImage(image, f"config {name} holds a NUL byte")
    return config


def select_manifest(image: str, index: Index, platform: Platform) -> Descriptor:
    """The index entry for ``platform`` (what ``skopeo`` picks for the same request)."""
    candidates = [
        desc
        for desc in index.manifests
        if desc.media_type in MANIFEST_TYPES
        and desc.platform is not None
        and platform.accepts(
            Platform(desc.platform.os, desc.platform.architecture, desc.platform.variant)
        )
    ]
    if not candidates:
        offered = sorted(
            {
                str(Platform(d.platform.os, d.platform.architecture, d.platform.variant))
                for d in index.manifests
                if d.platform is not None
            }
        )
        raise InvalidImage(
            image, f"no {platform} image in its index (it has: {', '.join(offered) or 'none'})"
        )
    return candidates[0]


def sniff_compression(head: bytes) -> Compression:
    """A layer's compression by its first bytes (a tar starts with a file name)."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"
