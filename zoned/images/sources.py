"""Where images come from: a registry, an OCI layout, a ``docker save`` archive.

All three are fetched by Debian's ``skopeo copy`` into a ``dir:`` directory
in the store's scratch area: ``manifest.json`` exactly as the source has it
(so its digest is the one the registry knows) and each blob in a file named
by its digest. skopeo speaks the registry protocol (anonymous, basic and
token auth, TLS), resolves manifest lists for the requested platform
(``--override-os/--override-arch/--override-variant``) and checks every
blob's digest while copying. What skopeo does not check, we do:

- an OCI layout's own ``index.json``, read here first: the manifest it names
  (by ``org.opencontainers.image.ref.name``, or the only one) must hash to the
  digest the index gives and all its blobs must be present, else the layout
  is refused before anything is copied; the copied manifest must then be
  that one;
- after the copy, every blob again (:func:`read_fetched`): the config and
  each layer must have the size and sha256 their descriptor says.

Credentials never go on a command line when it can be helped: a user name
and password are written to an auth file (mode 0600) in the operation's
private scratch directory and passed as ``--authfile``; a caller's own auth
file is passed as it is. A bearer token (``registry_token``) can only be
given as ``--src-registry-token``, which puts it in skopeo's argv for the
duration of the pull.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from zoned.errors import InvalidRequest
from zoned.images.erofs import file_sha256
from zoned.images.errors import (
    ImageAccessDenied,
    ImageError,
    ImageHostError,
    ImageNotFound,
    InvalidImage,
)
from zoned.images.oci import (
    INDEX_TYPES,
    MAX_DOCUMENT_BYTES,
    ConfigFile,
    Descriptor,
    Manifest,
    document_kind,
    parse_config,
    parse_index,
    parse_manifest,
    select_manifest,
)
from zoned.images.reference import Platform, Reference, digest_hex, parse_reference
from zoned.images.tools import ToolRun

REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
#: What the OCI layout's ``ref.name`` may hold (its grammar, bounded).
_REF_NAME_RE: Final = re.compile(r"[A-Za-z0-9]+(?:(?:[-._:@/+]|--)[A-Za-z0-9]+){0,127}")


class RegistryAuth(msgspec.Struct, frozen=True, kw_only=True):
    """Credentials for a registry; all empty is an anonymous pull."""

    username: str | None = None
    password: str | None = None
    #: A bearer token the registry accepts (skopeo's ``--src-registry-token``).
    registry_token: str | None = None
    #: A containers-auth.json(5) file (skopeo's ``--authfile``).
    authfile: str | None = None


class RegistrySource(msgspec.Struct, frozen=True, kw_only=True, tag="registry"):
    """``reference`` (``name[:tag][@digest]``) from its registry."""

    reference: str
    auth: RegistryAuth | None = None
    #: Off only for a registry on loopback without TLS (tests, local mirrors).
    tls_verify: bool = True


class OciLayoutSource(msgspec.Struct, frozen=True, kw_only=True, tag="oci-layout"):
    """An OCI image layout directory; ``reference`` is the ``ref.name`` of one of
    its images (none: the layout must hold exactly one)."""

    path: str
    reference: str | None = None


class DockerArchiveSource(msgspec.Struct, frozen=True, kw_only=True, tag="docker-archive"):
    """A ``docker save`` archive; ``reference`` (``repo:tag``) picks one of its
    images (none: the archive must hold exactly one)."""

    path: str
    reference: str | None = None


Source = RegistrySource | OciLayoutSource | DockerArchiveSource


def describe(source: Source) -> str:
    """How errors name the image: the reference, or the path with its reference."""
    if isinstance(source, RegistrySource):
        return source.reference
    return f"{source.path}:{source.reference}" if source.reference else source.path


def registry_reference(source: Source) -> Reference | None:
    """The normalised reference of a registry source (``None`` for files)."""
    if isinstance(source, RegistrySource):
        return parse_reference(source.reference)
    return None


def check_source(source: Source) -> None:
    """Refuse what skopeo's transport syntax cannot carry (pure)."""
    if isinstance(source, RegistrySource):
        parse_reference(source.reference)
        return
    if not source.path.startswith("/"):
        raise InvalidRequest(f"image path {source.path!r} must be absolute")
    if ":" in source.path or "\0" in source.path:
        raise InvalidRequest(f"image path {source.path!r} may not contain ':'")
    if source.reference is None:
        return
    if isinstance(source, DockerArchiveSource):
        parse_reference(source.reference)
    elif not _REF_NAME_RE.fullmatch(source.reference):
        raise InvalidRequest(f"invalid image name {source.reference!r} in layout {source.path}")


def skopeo_argv(
    source: Source, destination: Path, platform: Platform, authfile: Path | None
) -> list[str]:
    """The ``skopeo copy`` command line that fetches ``source`` into ``destination`` (pure)."""
    argv = [
        "skopeo",
        "copy",
        "--quiet",
        "--remove-signatures",
        f"--override-os={platform.os}",
        f"--override-arch={platform.architecture}",
    ]
    if platform.variant:
        argv.append(f"--override-variant={platform.variant}")
    if isinstance(source, RegistrySource):
        if not source.tls_verify:
            argv.append("--src-tls-verify=false")
        if authfile is not None:
            argv.append(f"--authfile={authfile}")
        if source.auth is not None and source.auth.registry_token:
            argv.append(f"--src-registry-token={source.auth.registry_token}")
        reference = parse_reference(source.reference)
        if reference.digest is not None:  # the digest decides; skopeo takes one of the two
            reference = reference.with_digest(reference.digest)
        transport = f"docker://{reference}"
    elif isinstance(source, OciLayoutSource):
        transport = f"oci:{source.path}" + (f":{source.reference}" if source.reference else "")
    else:
        transport = f"docker-archive:{source.path}"
        if source.reference:
            transport += f":{parse_reference(source.reference)}"
    return [*argv, transport, f"dir:{destination}"]


def write_authfile(source: RegistrySource, directory: Path) -> Path | None:
    """An auth file for ``source``'s user name and password (mode 0600), or the caller's."""
    auth = source.auth
    if auth is None:
        return None
    if auth.authfile:
        return Path(auth.authfile)
    if auth.username is None and auth.password is None:
        return None
    if not auth.username or auth.password is None or ":" in auth.username:
        raise InvalidRequest("registry credentials need a user name (without ':') and a password")
    token = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
    domain = parse_reference(source.reference).domain
    path = directory / "auth.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"auths": {domain: {"auth": token}}}, file)
    return path


_FATAL_RE: Final = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')


def skopeo_message(stderr: str) -> str:
    """skopeo's own error message out of its log lines."""
    matches = _FATAL_RE.findall(stderr)
    if not matches:
        return stderr.strip().splitlines()[-1] if stderr.strip() else "skopeo failed"
    text: str = matches[-1]
    return text.replace('\\"', '"').replace("\\\\", "\\")


def classify_skopeo_failure(image: str, message: str) -> ImageError:
    """The error for a failed fetch, by what skopeo said (pure)."""
    lowered = message.lower()
    if "no space left" in lowered:
        return ImageHostError(image, f"no space left while fetching: {message}")
    if any(s in lowered for s in ("unauthorized", "authentication required", "denied")):
        return ImageAccessDenied(image, f"the registry refused access: {message}")
    if "did not match" in lowered or "does not match" in lowered:
        return InvalidImage(image, f"digest mismatch: {message}")
    if "no image found in manifest list" in lowered or "choosing image instance" in lowered:
        return InvalidImage(image, f"no image for the requested platform: {message}")
    if any(
        s in lowered
        for s in (
            "manifest unknown",
            "name unknown",
            "not found",
            "connection refused",
            "no such host",
            "dial tcp",
            "pinging container registry",
        )
    ):
        return ImageNotFound(image, f"does not resolve: {message}")
    return InvalidImage(image, f"cannot be fetched: {message}")


def _read_bounded(image: str, path: Path, what: str, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidImage(image, f"{what} is missing ({path.name})") from None
    except OSError as exc:
        raise InvalidImage(image, f"cannot read {what}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise InvalidImage(image, f"{what} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise InvalidImage(image, f"{what} is larger than {limit} bytes")
    return data


def _check_blob(image: str, path: Path, desc: Descriptor, what: str) -> None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise InvalidImage(image, f"{what} {desc.digest} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidImage(image, f"{what} {desc.digest} is not a regular file")
    if st.st_size != desc.size:
        raise InvalidImage(
            image, f"{what} {desc.digest} has {st.st_size} bytes, its descriptor says {desc.size}"
        )
    actual, _ = file_sha256(path)
    if actual != desc.digest:
        raise InvalidImage(image, f"{what} {desc.digest} does not match its digest: it is {actual}")


def verify_layout(image: str, source: OciLayoutSource, platform: Platform) -> str:
    """Check an OCI layout before copying; the digest of the manifest it names."""
    root = Path(source.path)
    if not root.is_dir():
        raise ImageNotFound(image, "no such OCI layout directory")
    layout = _read_bounded(image, root / "oci-layout", "the layout's oci-layout file", 4096)
    try:
        version = json.loads(layout).get("imageLayoutVersion")
    except (ValueError, AttributeError):
        version = None
    if version != "1.0.0":
        raise InvalidImage(image, "not an OCI layout (oci-layout lacks imageLayoutVersion 1.0.0)")
    index_data = _read_bounded(image, root / "index.json", "index.json", MAX_DOCUMENT_BYTES)
    index = parse_index(image, index_data)
    if source.reference is not None:
        named = [
            d
            for d in index.manifests
            if (d.annotations or {}).get(REF_NAME_ANNOTATION) == source.reference
        ]
        if not named:
            raise ImageNotFound(image, f"the layout has no image named {source.reference!r}")
        desc = named[0]
    elif len(index.manifests) == 1:
        desc = index.manifests[0]
    else:
        raise InvalidImage(
            image, f"the layout holds {len(index.manifests)} images: name one of them"
        )
    for _ in range(4):  # an index may nest indexes; a few levels at most
        blob = root / "blobs" / "sha256" / digest_hex(desc.digest)
        _check_blob(image, blob, desc, "manifest")
        data = _read_bounded(image, blob, f"manifest {desc.digest}", MAX_DOCUMENT_BYTES)
        if desc.media_type not in INDEX_TYPES and document_kind(image, data) == "manifest":
            manifest = parse_manifest(image, data, max_layers=1 << 16, max_blob_bytes=1 << 62)
            for number, layer in enumerate([manifest.config, *manifest.layers]):
                what = f"layer {number}" if number else "config"
                path = root / "blobs" / "sha256" / digest_hex(layer.digest)
                if not path.is_file():
                    raise InvalidImage(image, f"the layout lacks {what} blob {layer.digest}")
            return desc.digest
        desc = select_manifest(image, parse_index(image, data), platform)
    raise InvalidImage(image, "the layout's indexes nest too deeply")


@dataclass(frozen=True)
class FetchedImage:
    """A verified copy of one image in a scratch directory."""

    directory: Path
    manifest_bytes: bytes
    manifest_digest: str
    manifest: Manifest
    config_bytes: bytes
    config: ConfigFile

    def blob(self, digest: str) -> Path:
        return self.directory / digest_hex(digest)


def fetch(
    image: str,
    source: Source,
    destination: Path,
    platform: Platform,
    *,
    tools: ToolRun,
) -> str | None:
    """Copy ``source`` into ``destination`` (a ``dir:`` directory) with skopeo.

    Returns the manifest digest the source promised (an OCI layout's index,
    a reference's digest), ``None`` when it promised none (a tag).
    """
    expected: str | None = None
    if isinstance(source, OciLayoutSource):
        expected = verify_layout(image, source, platform)
    elif isinstance(source, DockerArchiveSource):
        path = Path(source.path)
        if not path.exists():
            raise ImageNotFound(image, "no such archive")
        if not path.is_file():
            raise InvalidImage(image, "not a docker save archive (not a regular file)")
    authfile = write_authfile(source, tools.scratch) if isinstance(source, RegistrySource) else None
    argv = skopeo_argv(source, destination, platform, authfile)
    result = tools.run(image, argv, env={**os.environ, "TMPDIR": str(tools.scratch)})
    if result.returncode != 0:
        raise classify_skopeo_failure(image, skopeo_message(result.stderr))
    return expected


def read_fetched(
    image: str,
    directory: Path,
    *,
    expected_manifest: str | None,
    max_layers: int,
    max_blob_bytes: int,
) -> FetchedImage:
    """Read and verify what skopeo copied: the manifest, then every blob's size and sha256."""
    manifest_bytes = _read_bounded(
        image, directory / "manifest.json", "manifest", MAX_DOCUMENT_BYTES
    )
    manifest_digest = f"sha256:{hashlib.sha256(manifest_bytes).hexdigest()}"
    if expected_manifest is not None and manifest_digest != expected_manifest:
        raise InvalidImage(
            image,
            f"manifest digest mismatch: expected {expected_manifest}, got {manifest_digest}",
        )
    manifest = parse_manifest(
        image, manifest_bytes, max_layers=max_layers, max_blob_bytes=max_blob_bytes
    )
    config_path = directory / digest_hex(manifest.config.digest)
    _check_blob(image, config_path, manifest.config, "config")
    config_bytes = _read_bounded(image, config_path, "config", MAX_DOCUMENT_BYTES)
    config = parse_config(image, config_bytes, len(manifest.layers))
    for number, layer in enumerate(manifest.layers, 1):
        _check_blob(image, directory / digest_hex(layer.digest), layer, f"layer {number}")
    return FetchedImage(
        directory=directory,
        manifest_bytes=manifest_bytes,
        manifest_digest=manifest_digest,
        manifest=manifest,
        config_bytes=config_bytes,
        config=config,
    )
