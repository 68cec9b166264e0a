"""Shared images are checked before each zone boots them (zoned.images.integrity).

Real files in a temporary directory; the tests run as root (the daemon does),
so they can also hand files to other uids.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tmpdirs import short_tmp_dir
from zoned.errors import IntegrityError
from zoned.images.integrity import (
    ImageVerifier,
    read_recorded_sha256,
    recorded_sha256_path,
    write_recorded_sha256,
)

DATA = b"a kernel, say" * 1000
DIGEST = hashlib.sha256(DATA).hexdigest()
OTHER_UID = 2013265999


@pytest.fixture
def image() -> Iterator[Path]:
    with short_tmp_dir("zt-images-") as directory:
        directory.chmod(0o755)
        path = directory / "bzImage"
        path.write_bytes(DATA)
        path.chmod(0o644)
        yield path


def test_an_intact_image_passes_and_is_hashed_once(image: Path) -> None:
    verifier = ImageVerifier()
    verifier.check(image, DIGEST, "kernel")
    verifier.check(image, DIGEST, "kernel")
    assert verifier.hashed == 1


def test_a_rewrite_is_caught_even_with_size_and_mtime_put_back(image: Path) -> None:
    verifier = ImageVerifier()
    verifier.check(image, DIGEST, "kernel")
    before = image.stat()
    with image.open("r+b") as file:
        file.write(b"A")  # same size
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(IntegrityError) as refused:
        verifier.check(image, DIGEST, "kernel")
    assert str(image) in refused.value.message and "has changed" in refused.value.message
    assert DIGEST in refused.value.message


def test_a_replaced_file_is_hashed_again(image: Path) -> None:
    verifier = ImageVerifier()
    verifier.check(image, DIGEST, "kernel")
    replacement = image.with_name("new")
    replacement.write_bytes(DATA)
    replacement.chmod(0o644)
    os.replace(replacement, image)
    verifier.check(image, DIGEST, "kernel")
    assert verifier.hashed == 2


def test_a_file_handed_to_another_uid_is_given_back_when_its_hash_matches(image: Path) -> None:
    """What libvirt's relabelling left behind before zones had uids of their own."""
    os.chown(image, OTHER_UID, OTHER_UID)
    image.chmod(0o664)
    ImageVerifier().check(image, DIGEST, "boot image")
    info = image.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 0, 0o644)


def test_a_changed_file_of_another_uid_is_refused_and_left_alone(image: Path) -> None:
    image.write_bytes(DATA + b"!")
    os.chown(image, OTHER_UID, OTHER_UID)
    with pytest.raises(IntegrityError, match="has changed"):
        ImageVerifier().check(image, DIGEST, "boot image")
    assert image.stat().st_uid == OTHER_UID


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda d: os.chmod(d, 0o775), "is writable by others (mode 775)"),
        (lambda d: os.chown(d, OTHER_UID, 0), f"belongs to uid {OTHER_UID}, not root"),
    ],
)
def test_a_directory_others_could_swap_the_file_in_is_refused(
    image: Path, prepare: object, message: str
) -> None:
    prepare(image.parent)  # type: ignore[operator]
    with pytest.raises(IntegrityError, match="cannot be trusted") as refused:
        ImageVerifier().check(image, DIGEST, "kernel")
    assert message in refused.value.message


def test_sticky_world_writable_directories_are_fine_and_links_are_followed(image: Path) -> None:
    # /tmp itself (1777) is on the path; a link to the image is judged by its target.
    link = image.with_name("current")
    link.symlink_to(image.name)
    ImageVerifier().check(link, DIGEST, "kernel")
    with short_tmp_dir("zt-unsafe-") as unsafe:
        unsafe.chmod(0o777)
        (unsafe / "bzImage").write_bytes(DATA)
        image.unlink()
        image.symlink_to(unsafe / "bzImage")
        with pytest.raises(IntegrityError, match="is writable by others"):
            ImageVerifier().check(image, DIGEST, "kernel")


def test_missing_files_and_directories_instead_of_files_are_refused(image: Path) -> None:
    with pytest.raises(IntegrityError, match="is missing"):
        ImageVerifier().check(image.with_name("gone"), DIGEST, "kernel")
    with pytest.raises(IntegrityError, match="is not a regular file"):
        ImageVerifier().check(image.parent, DIGEST, "kernel")


def test_the_recorded_hash_sits_beside_the_image_in_sha256sum_format(image: Path) -> None:
    assert read_recorded_sha256(image) is None
    write_recorded_sha256(image, DIGEST)
    assert recorded_sha256_path(image).read_text() == f"{DIGEST}  bzImage\n"
    assert read_recorded_sha256(image) == DIGEST
    recorded_sha256_path(image).write_text(f"{DIGEST}  another-file\n")
    assert read_recorded_sha256(image) is None
    recorded_sha256_path(image).write_text("not a digest  bzImage\n")
    assert read_recorded_sha256(image) is None
