"""Evidence bundles: what a quarantine collects of a zone, hashed, with a manifest.

A bundle is one directory, ``<evidence_dir>/<zone>-<uuid8>-<UTC time>/``,
root's alone (mode 0700 inside an evidence directory of mode 0700): no zone's
QEMU (an unprivileged uid) can reach it. It holds the collected files,
``MANIFEST.json`` (what was collected, from what, by whom, each file's
size and sha256, what failed) and ``SHA256SUMS`` (``sha256sum -c`` checks
it).

Rules:

- Every step is recorded, never raised: a file that cannot be written
  whole (a full disk, a source that vanished) is removed, its error is
  listed, and the bundle is *partial*; the steps after it still run (a
  smaller file may still fit). Files listed in the manifest are whole.
- A partial bundle says so three ways: ``"partial": true`` in the manifest,
  the reply, and an empty ``PARTIAL`` file (which needs no disk blocks, so
  it can be made when nothing else fits any more).
- Blocking file IO and hashing: call from a worker thread. Sources are
  read through descriptors opened without following links (a name a zone
  could have planted never leads elsewhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from zoned.protocol import CallerInfo, EvidenceBundle, EvidenceFile

MANIFEST: Final = "MANIFEST.json"
SUMS: Final = "SHA256SUMS"
PARTIAL: Final = "PARTIAL"
CHUNK: Final = 1024 * 1024


class EvidenceManifest(msgspec.Struct, frozen=True, kw_only=True):
    """``MANIFEST.json``: the bundle's table of contents."""

    zone: str
    uuid: str
    domain_name: str
    collected_at: float
    collected_by: CallerInfo
    partial: bool
    files: list[EvidenceFile]
    errors: list[str] = []
    # What the zone ran and booted, as the daemon recorded it.
    zone_state: str = ""
    identity: dict[str, str] = {}
    notes: list[str] = []


def bundle_name(zone: str, uuid: str, when: float) -> str:
    stamp = datetime.fromtimestamp(when, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{zone}-{uuid[:8]}-{stamp}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as source:
        while block := source.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """One bundle being written (see the module's rules)."""

    path: Path
    files: list[EvidenceFile] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, evidence_dir: Path, zone: str, uuid: str, when: float) -> Bundle:
        """Make the bundle's directory (and the evidence directory, mode 0700)."""
        evidence_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(evidence_dir, 0o700)
        name = bundle_name(zone, uuid, when)
        path = evidence_dir / name
        suffix = 1
        while True:
            try:
                path.mkdir(mode=0o700)
                break
            except FileExistsError:
                suffix += 1
                path = evidence_dir / f"{name}.{suffix}"
        return cls(path)

    @property
    def partial(self) -> bool:
        return bool(self.errors)

    def _failed(self, name: str, exc: BaseException | str) -> None:
        self.errors.append(f"{name}: {exc}")
        with contextlib.suppress(OSError):
            (self.path / name).unlink()

    def _listed(self, name: str) -> None:
        target = self.path / name
        self.files.append(
            EvidenceFile(name=name, size_bytes=target.stat().st_size, sha256=sha256_of(target))
        )

    def _made(self, name: str, make: Callable[[Path], None]) -> bool:
        """``make`` the file ``name`` at its path and list it; a failure is noted."""
        try:
            make(self.path / name)
            self._listed(name)
            return True
        except OSError as exc:
            self._failed(name, exc)
            return False

    def add_bytes(self, name: str, data: bytes) -> bool:
        return self._made(name, lambda target: _write_out(target, [data]))

    def add_copy(self, name: str, source: Path) -> bool:
        """Copy a regular file in (links are not followed); a missing source is noted."""
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self.errors.append(f"{name}: {source} does not exist")
            return False
        except OSError as exc:
            self._failed(name, f"cannot open {source}: {exc}")
            return False
        try:
            with os.fdopen(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    self.errors.append(f"{name}: {source} is not a regular file")
                    return False
                _write_out(self.path / name, iter(lambda: src.read(CHUNK), b""))
            self._listed(name)
            return True
        except OSError as exc:
            self._failed(name, exc)
            return False

    def add_concatenation(self, name: str, sources: Iterable[Path]) -> bool:
        """Several files (a console log and its rotated copies) as one, in order."""
        parts: list[bytes] = []
        try:
            for source in sources:
                fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as src:
                    parts.append(src.read())
        except OSError as exc:
            self._failed(name, f"cannot read: {exc}")
            return False
        return self.add_bytes(name, b"".join(parts))

    def adopt(self, name: str) -> bool:
        """List a file someone else wrote into the bundle (libvirtd's memory dump)."""
        return self._made(name, lambda target: os.chmod(target, 0o600))

    def fail(self, name: str, reason: str) -> None:
        """A step that failed elsewhere (a libvirt call): note it, remove its leftovers."""
        self._failed(name, reason)

    def finish(
        self,
        *,
        zone: str,
        uuid: str,
        domain_name: str,
        collected_by: CallerInfo,
        zone_state: str,
        identity: dict[str, str],
        notes: list[str],
    ) -> EvidenceBundle:
        """Write the manifest and the sums; the bundle as the reply reports it."""
        sums = "".join(f"{entry.sha256}  {entry.name}\n" for entry in self.files)
        if not self._write_small(SUMS, sums.encode()):
            self.errors.append(f"{SUMS}: could not be written")
        manifest = EvidenceManifest(
            zone=zone,
            uuid=uuid,
            domain_name=domain_name,
            collected_at=time.time(),
            collected_by=collected_by,
            partial=self.partial,
            files=list(self.files),
            errors=list(self.errors),
            zone_state=zone_state,
            identity=identity,
            notes=notes,
        )
        if not self._write_small(MANIFEST, msgspec.json.format(msgspec.json.encode(manifest))):
            self.errors.append(f"{MANIFEST}: could not be written")
        if self.partial:
            with contextlib.suppress(OSError):
                (self.path / PARTIAL).touch(mode=0o600)
        return EvidenceBundle(
            path=str(self.path),
            size_bytes=_directory_size(self.path),
            partial=self.partial,
            files=list(self.files),
            errors=list(self.errors),
        )

    def _write_small(self, name: str, data: bytes) -> bool:
        try:
            _write_out(self.path / name, [data])
            return True
        except OSError:
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
            return False


def _write_out(path: Path, blocks: Iterable[bytes]) -> None:
    """A new file of ``blocks``, mode 0600, on disk (fsynced) when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for block in blocks:
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def _directory_size(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in path.iterdir():
            with contextlib.suppress(OSError):
                total += entry.lstat().st_size
    return total


def kernel_identity(kernel_image: Path) -> tuple[dict[str, str], Path | None]:
    """The kernel's build facts beside its image: its manifest file (to copy in)
    and the sha256 of the config it was built from."""
    build = kernel_image.parent
    facts: dict[str, str] = {"kernel_image": str(kernel_image)}
    config = build / "config"
    with contextlib.suppress(OSError):
        facts["kernel_config_sha256"] = sha256_of(config)
    manifest = build / "manifest.json"
    return facts, manifest if manifest.is_file() else None


def verify(bundle_path: Path) -> list[str]:
    """Check a bundle's files against its SHA256SUMS; the mismatches (empty: all match)."""
    problems = []
    for line in (bundle_path / SUMS).read_text().splitlines():
        digest, _, name = line.partition("  ")
        try:
            actual = sha256_of(bundle_path / name)
        except OSError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if actual != digest:
            problems.append(f"{name}: sha256 {actual}, the manifest says {digest}")
    return problems
