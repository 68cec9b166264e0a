"""The store's bookkeeping on real images: tags and references, inspect and list,
remove and prune (images in use stay, shared blobs stay), sizes, verification."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.imagetools import Layout, require_tools, run
from zoned.images.errors import ImageHostError, ImageInUse, ImageNotFound
from zoned.images.sources import OciLayoutSource
from zoned.images.store import ImageStore


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    require_tools("umoci", "skopeo", "mkfs.erofs")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Layout]:
    """Two images sharing their first layer."""
    work = tmp_path_factory.mktemp("layouts")
    base = Layout(work / "oci", "base").create()
    with base.edit() as root:
        (root / "shared").write_text("in both images\n" * 1000)
    derived = Layout(work / "oci", "derived")
    # A second image in the same layout, made from the first.
    run("umoci", "tag", "--image", base.image, "derived")
    with derived.edit() as root:
        (root / "own").write_text("only in derived\n")
    return base, derived


def source(layout: Layout) -> OciLayoutSource:
    return OciLayoutSource(path=str(layout.path), reference=layout.tag)


def test_tags_references_and_inspect(layouts: tuple[Layout, Layout], tmp_path: Path) -> None:
    base, _ = layouts
    store = ImageStore(tmp_path / "store")
    info = store.import_image(source(base), tags=["team/base:1", "team/base:latest"]).info
    assert info.tags == ["team/base:1", "team/base:latest"]
    for reference in (
        "team/base:1",
        "docker.io/team/base:1",
        "team/base",
        info.id,
        info.id.removeprefix("sha256:")[:12],
        f"team/base@{info.record.manifests[0].digest}",
    ):
        assert store.resolve(reference).id == info.id, reference
    with pytest.raises(ImageNotFound, match="image team/base:2: not in the image store"):
        store.resolve("team/base:2")
    retagged = store.tag("team/base:1", "other:x")
    assert "other:x" in retagged.tags
    assert [i.id for i in store.list_images()] == [info.id]
    record = store.inspect("other:x").record
    assert record.platform.architecture == "amd64"
    assert record.rootfs.size == os.stat(store.rootfs_file(info.id)).st_size
    assert record.manifests[0].layers[0].size > 0 and record.diff_ids


def test_remove_untags_first_then_removes_unless_in_use(
    layouts: tuple[Layout, Layout], tmp_path: Path
) -> None:
    base, derived = layouts
    store = ImageStore(tmp_path / "store")
    one = store.import_image(source(base), tags=["a:1", "a:2"]).info
    two = store.import_image(source(derived), tags=["b:1"]).info
    assert store.remove("a:2").untagged == ["a:2"]
    assert store.inspect("a:1").id == one.id
    with pytest.raises(ImageInUse, match="image a:1: a zone uses it"):
        store.remove("a:1", in_use={one.id})
    shared_layer = one.record.manifests[0].layers[0].digest
    removed = store.remove("a:1")
    assert removed.removed == [one.id] and removed.freed_bytes > 0
    assert not store.rootfs_file(one.id).exists()
    assert (store.blobs / shared_layer.removeprefix("sha256:")).exists()  # derived uses it
    assert store.verify_rootfs(two.id)
    with pytest.raises(ImageNotFound):
        store.resolve("a:1")


def test_prune_keeps_images_in_use_and_their_blobs(
    layouts: tuple[Layout, Layout], tmp_path: Path
) -> None:
    base, derived = layouts
    store = ImageStore(tmp_path / "store")
    one = store.import_image(source(base), tags=["a:1"]).info
    two = store.import_image(source(derived), tags=["b:1"]).info
    sizes = store.sizes()
    by_id = {s.id: s for s in sizes.images}
    assert by_id[one.id].shared_blob_bytes > 0 and by_id[two.id].shared_blob_bytes > 0
    assert sizes.total_bytes > sizes.rootfs_bytes + sizes.blob_bytes - 1
    result = store.prune(in_use={two.id})
    assert result.removed == [one.id] and result.untagged == ["a:1"]
    assert [i.id for i in store.list_images()] == [two.id]
    assert store.verify_rootfs(two.id)
    for digest in (
        two.record.config_blob.digest,
        *(layer.digest for layer in two.record.manifests[0].layers),
    ):
        assert (store.blobs / digest.removeprefix("sha256:")).exists()
    assert store.prune(in_use=set()).removed == [two.id]
    assert list(store.blobs.iterdir()) == [] and list(store.roots.iterdir()) == []


def test_verify_rootfs_notices_a_changed_or_reowned_file(
    layouts: tuple[Layout, Layout], tmp_path: Path
) -> None:
    base, _ = layouts
    store = ImageStore(tmp_path / "store")
    image_id = store.import_image(source(base)).info.id
    rootfs = store.rootfs_file(image_id)
    os.chown(rootfs, 64055, 0)  # what libvirt's dynamic ownership would do
    with pytest.raises(ImageHostError, match="not a root-owned 0644 file"):
        store.verify_rootfs(image_id)
    os.chown(rootfs, 0, 0)
    with open(rootfs, "r+b") as file:
        file.seek(1500)
        byte = file.read(1)
        file.seek(1500)
        file.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ImageHostError, match="does not match its recorded sha256"):
        store.verify_rootfs(image_id)
