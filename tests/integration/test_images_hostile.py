"""Bad input gets a clear error naming the image and the problem, and changes nothing:
nothing written outside the store, no half image, the store still fully usable.

Hostile layers are written with Python's tarfile (they are the hostile input)
and put into real layouts with ``umoci raw add-layer``; corrupt and incomplete
layouts are real umoci layouts damaged afterwards."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.imagetools import Layout, require_tools, write_tar
from zoned.images.errors import ImageError, ImageNotFound, InvalidImage
from zoned.images.sources import DockerArchiveSource, OciLayoutSource, Source
from zoned.images.store import ImageStore


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    require_tools("umoci", "skopeo", "mkfs.erofs")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory hostile layers aim at; it must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def base_layout(path: Path) -> Layout:
    layout = Layout(path, "v1").create()
    with layout.edit() as root:
        (root / "etc").mkdir()
        (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (root / "dir").mkdir()
        (root / "dir/file").write_text("base\n")
    return layout


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644 if kind == tarfile.REGTYPE else 0o777
    return info


def hostile(path: Path, entries: list[tuple[object, bytes | None]]) -> Layout:
    layout = base_layout(path)
    layout.add_raw_layer(write_tar(path.parent / f"{path.name}.tar", entries))
    return layout


def assert_refused(
    store: ImageStore,
    source: Source,
    error: type[ImageError],
    problem: str,
    outside: Path,
) -> ImageError:
    with pytest.raises(error) as caught:
        store.import_image(source)
    refused = caught.value
    assert refused.message.startswith(f"image {refused.image}: "), refused.message
    assert source_path(source) in refused.image
    assert problem in refused.problem, refused.problem
    assert store.list_images() == []
    for directory in (store.scratch_dir, store.roots, store.images, store.blobs):
        assert list(directory.iterdir()) == [], directory
    assert list(outside.iterdir()) == []
    return refused


def source_path(source: Source) -> str:
    return source.path if isinstance(source, OciLayoutSource | DockerArchiveSource) else ""


def layout_source(layout: Layout) -> OciLayoutSource:
    return OciLayoutSource(path=str(layout.path), reference=layout.tag)


def test_dot_dot_entries(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    escape = os.path.relpath(outside / "pwned", "/")
    layout = hostile(tmp_path / "l", [(entry("../" * 12 + escape), b"owned\n")])
    assert_refused(store, layout_source(layout), InvalidImage, "'..' in the path", outside)


def test_absolute_symlink_pointing_outside_then_a_file_through_it(
    tmp_path: Path, store: ImageStore, outside: Path
) -> None:
    layout = hostile(
        tmp_path / "l",
        [
            (entry("escape", tarfile.SYMTYPE, str(outside)), None),
            (entry("escape/pwned"), b"owned\n"),
        ],
    )
    refused = assert_refused(
        store, layout_source(layout), InvalidImage, "goes through symlink", outside
    )
    assert f"'escape' -> '{outside}'" in refused.problem


def test_relative_symlink_climbing_out_in_a_lower_layer(
    tmp_path: Path, store: ImageStore, outside: Path
) -> None:
    layout = base_layout(tmp_path / "l")
    with layout.edit() as root:
        (root / "dir/up").symlink_to("../" * 12 + os.path.relpath(outside, "/"))
    layout.add_raw_layer(write_tar(tmp_path / "h.tar", [(entry("dir/up/pwned"), b"owned\n")]))
    assert_refused(
        store, layout_source(layout), InvalidImage, "goes through symlink 'dir/up'", outside
    )


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("../../../../etc/passwd", "'..' in the path"),
        ("/etc/shadow", "'etc/shadow' is not in the image"),
        ("escape/passwd", "goes through symlink 'escape'"),
    ],
)
def test_hard_links_pointing_outside_the_root(
    tmp_path: Path, store: ImageStore, outside: Path, target: str, problem: str
) -> None:
    host_file = outside.parent / "host-secret"
    host_file.write_text("secret\n")
    links_before = host_file.stat().st_nlink
    layout = hostile(
        tmp_path / "l",
        [
            (entry("escape", tarfile.SYMTYPE, str(outside.parent)), None),
            (entry("stolen", tarfile.LNKTYPE, target.replace("passwd", "host-secret")), None),
        ],
    )
    assert_refused(
        store,
        layout_source(layout),
        InvalidImage,
        problem.replace("passwd", "host-secret"),
        outside,
    )
    assert host_file.stat().st_nlink == links_before


def test_device_node_outside_dev(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    node = entry("usr/mem", tarfile.CHRTYPE)
    node.devmajor, node.devminor = 1, 1
    layout = hostile(tmp_path / "l", [(node, None)])
    assert_refused(store, layout_source(layout), InvalidImage, "device node outside /dev", outside)


def test_truncated_layer(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", [(entry("big"), os.urandom(256 * 1024))])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: 100 * 1024])  # in the middle of the file's data
    layout = base_layout(tmp_path / "l")
    layout.add_raw_layer(cut)
    assert_refused(store, layout_source(layout), InvalidImage, "corrupt or truncated", outside)


def test_not_a_tar_layer(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    layout = base_layout(tmp_path / "l")
    layout.add_raw_layer(junk)
    assert_refused(store, layout_source(layout), InvalidImage, "layer 2 of 2", outside)


def test_corrupt_layer_blob(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    layout = base_layout(tmp_path / "l")
    blob = layout.blob(layout.layer_digests()[-1])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x55
    blob.write_bytes(bytes(data))
    assert_refused(store, layout_source(layout), InvalidImage, "digest mismatch", outside)


def test_layout_with_a_missing_blob(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    layout = base_layout(tmp_path / "l")
    digest = layout.layer_digests()[0]
    layout.blob(digest).unlink()
    refused = assert_refused(
        store, layout_source(layout), InvalidImage, "lacks layer 1 blob", outside
    )
    assert digest in refused.problem


@pytest.mark.parametrize("same_size", [True, False])
def test_manifest_whose_digest_does_not_match(
    tmp_path: Path, store: ImageStore, outside: Path, same_size: bool
) -> None:
    layout = base_layout(tmp_path / "l")
    index = json.loads((layout.path / "index.json").read_text())
    manifest_blob = layout.blob(index["manifests"][0]["digest"])
    data = manifest_blob.read_bytes()
    if same_size:  # one hex digit of the config digest changed: same length, other bytes
        at = data.index(b'"digest":"sha256:') + len(b'"digest":"sha256:')
        data = data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]
        problem = "does not match its digest"
    else:
        document = json.loads(data)
        document["annotations"] = {"swapped": "after signing"}
        data = json.dumps(document).encode()
        problem = "its descriptor says"
    manifest_blob.write_bytes(data)
    assert_refused(store, layout_source(layout), InvalidImage, problem, outside)


def test_image_for_another_architecture(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    layout = base_layout(tmp_path / "l")
    layout.config("--architecture=arm64")
    assert_refused(
        store,
        layout_source(layout),
        InvalidImage,
        "built for linux/arm64; zones here run linux/amd64",
        outside,
    )
    with pytest.raises(InvalidImage, match="zones on this host run linux/amd64 only"):
        store.import_image(layout_source(layout), platform="linux/arm64")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (
            lambda d: OciLayoutSource(path=str(base_layout(d / "l").path), reference="nope"),
            "no image named 'nope'",
        ),
        (lambda d: OciLayoutSource(path=str(d / "absent")), "no such OCI layout directory"),
        (lambda d: DockerArchiveSource(path=str(d / "absent.tar")), "no such archive"),
    ],
)
def test_references_that_do_not_resolve(
    tmp_path: Path,
    store: ImageStore,
    outside: Path,
    make: Callable[[Path], Source],
    problem: str,
) -> None:
    refused = assert_refused(store, make(tmp_path), ImageNotFound, problem, outside)
    assert refused.code == "not_found"


def test_the_store_stays_usable_after_refusals(
    tmp_path: Path, store: ImageStore, outside: Path
) -> None:
    bad = hostile(tmp_path / "bad", [(entry("../x"), b"x")])
    for _ in range(2):
        with pytest.raises(InvalidImage):
            store.import_image(layout_source(bad))
    good = base_layout(tmp_path / "good")
    result = store.import_image(layout_source(good), tags=["ok"])
    assert result.converted and store.inspect("ok").id == result.info.id
    assert list(store.scratch_dir.iterdir()) == []


def test_whiteout_of_dot_dot(tmp_path: Path, store: ImageStore, outside: Path) -> None:
    layout = hostile(tmp_path / "l", [(entry("dir/.wh..."), b"")])
    assert_refused(store, layout_source(layout), InvalidImage, "names no entry", outside)
