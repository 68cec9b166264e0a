"""Images made here by umoci, skopeo and GNU tar, converted by the store, and the
result mounted read-only and compared with what the tools put in (and with what
``umoci unpack``, an independent applier, makes of the same image)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from tests.integration.imagetools import (
    Layout,
    hardlink_groups,
    mounted,
    require_tools,
    run,
    skopeo_copy,
    snapshot,
    write_tar,
)
from zoned.images.imageconfig import process_for
from zoned.images.sources import DockerArchiveSource, OciLayoutSource, Source
from zoned.images.store import ImageStore

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
OLD = 981173106  # 2001-02-03 04:05:06


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    require_tools("umoci", "skopeo", "mkfs.erofs", "fsck.erofs", "zstd", "tar")


def build_layers(layout: Layout, work: Path) -> None:
    """Four layers: a base, deletions and a hard link, an opaque insert, a raw layer
    with a hard link into a lower layer and an opaque marker after its entries."""
    with layout.edit() as root:
        for directory in ("etc", "home/app", "srv/data", "opt/keep", "d/sub", "e", "usr/bin"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "dev").mkdir(exist_ok=True)
        (root / "run").mkdir(exist_ok=True)
        (root / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
        )
        (root / "etc/group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
        os.chown(root / "home/app", 1000, 1000)
        os.chmod(root / "home/app", 0o750)
        tool = root / "usr/bin/tool"
        tool.write_bytes(b"#!/bin/sh\necho tool\n")
        os.chmod(tool, 0o4755)
        os.setxattr(tool, "user.origin", b"layer-1")
        os.setxattr(tool, "security.capability", CAPABILITY)
        (root / "srv/shared").mkdir()
        os.chmod(root / "srv/shared", 0o2775)
        os.chown(root / "srv/shared", 0, 50)
        (root / "tmp").mkdir()
        os.chmod(root / "tmp", 0o1777)
        (root / "a").write_text("shared inode\n")
        os.chown(root / "a", 1000, 1001)
        (root / "srv/data/old").write_text("hidden by the opaque insert\n")
        (root / "opt/keep/file").write_text("hidden by the raw layer's opaque marker\n")
        (root / "d/sub/x").write_text("x\n")
        (root / "e/y").write_text("y\n")
        (root / "usr/bin/x").write_text("linked three times\n")
        os.link(root / "usr/bin/x", root / "usr/bin/y")
        (root / "lib").symlink_to("usr/lib")
        (root / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
        os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(root / "dev/vdz", 0o660 | 0o060000, os.makedev(254, 7))
        os.mkfifo(root / "run/fifo")
        os.chmod(root / "run/fifo", 0o620)
        (root / "old-file").write_text("from 2001\n")
        os.utime(root / "old-file", (OLD, OLD))
        big = bytes(range(256)) * 4096 * 3  # 3 MiB, not zeros
        (root / "srv/blob").write_bytes(big)
    with layout.edit() as root:
        for path in (root / "e/y", root / "d/sub/x"):
            path.unlink()
        (root / "e").rmdir()
        os.link(root / "a", root / "b")
        (root / "etc/motd").write_text("second layer\n")
    replacement = work / "data-replacement"
    replacement.mkdir()
    (replacement / "new").write_text("only this survives\n")
    layout.insert(replacement, "/srv/data", opaque=True)
    entries: list[tuple[object, bytes | None]] = []
    link = tarfile.TarInfo("usr/bin/z")
    link.type, link.linkname = tarfile.LNKTYPE, "usr/bin/x"
    entries.append((link, None))
    raw = tarfile.TarInfo("usr/bin/raw")
    raw.mode, raw.uid, raw.gid, raw.mtime = 0o750, 7, 8, OLD
    raw.pax_headers = {"SCHILY.xattr.user.raw": "from tarfile", "SCHILY.xattr.trusted.x": "dropped"}
    entries.append((raw, b"raw layer\n"))
    opt = tarfile.TarInfo("opt")
    opt.type, opt.mode = tarfile.DIRTYPE, 0o755
    entries.append((opt, None))
    entries.append((tarfile.TarInfo("opt/new"), b"kept: written by the opaque layer\n"))
    entries.append((tarfile.TarInfo("opt/.wh..wh..opq"), b""))
    entries.append((tarfile.TarInfo("etc/.wh.motd"), b""))
    layout.add_raw_layer(write_tar(work / "raw.tar", entries))
    layout.config(
        "--config.entrypoint=/usr/bin/tool",
        "--config.cmd=serve",
        "--config.cmd=--verbose",
        "--config.env=MODE=image",
        "--config.workingdir=/srv",
        "--config.user=app",
    )
    layout.gc()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    work = tmp_path_factory.mktemp("layout")
    made = Layout(work / "oci", "v1").create()
    build_layers(made, work)
    return made


def test_layers_apply_with_whiteouts_opaque_dirs_links_owners_modes_xattrs(
    layout: Layout, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    result = store.import_image(OciLayoutSource(path=str(layout.path), reference="v1"))
    assert result.converted
    record = result.info.record
    assert len(record.manifests[0].layers) == 4
    rootfs = Path(result.info.rootfs_path)
    run("fsck.erofs", rootfs)
    with mounted(rootfs, tmp_path / "mnt") as mnt:
        nodes = snapshot(mnt)
        # Whiteouts (made by umoci repack from deletions) and opaque directories.
        assert "e" not in nodes and "e/y" not in nodes and "d/sub/x" not in nodes
        assert nodes["d/sub"].kind == "dir"
        assert sorted(p for p in nodes if p.startswith("srv/data/")) == ["srv/data/new"]
        assert sorted(p for p in nodes if p.startswith("opt/")) == ["opt/new"]
        assert "etc/motd" not in nodes
        # Hard links: within a layer, re-emitted by umoci, and into a lower layer.
        groups = hardlink_groups(mnt)
        assert frozenset({"a", "b"}) in groups
        assert frozenset({"usr/bin/x", "usr/bin/y", "usr/bin/z"}) in groups
        # Owners, modes, xattrs (dropped: trusted.*), mtimes.
        tool = nodes["usr/bin/tool"]
        assert (tool.mode, tool.uid, tool.gid) == (0o4755, 0, 0)
        assert dict(tool.xattrs) == {"security.capability": CAPABILITY, "user.origin": b"layer-1"}
        assert (nodes["home/app"].mode, nodes["home/app"].uid) == (0o750, 1000)
        assert (nodes["srv/shared"].mode, nodes["srv/shared"].gid) == (0o2775, 50)
        assert nodes["tmp"].mode == 0o1777
        assert (nodes["a"].uid, nodes["a"].gid) == (1000, 1001)
        raw = nodes["usr/bin/raw"]
        assert (raw.mode, raw.uid, raw.gid, raw.mtime) == (0o750, 7, 8, OLD)
        assert dict(raw.xattrs) == {"user.raw": b"from tarfile"}
        assert nodes["old-file"].mtime == OLD
        # Symlinks verbatim, device nodes under /dev, FIFOs.
        assert nodes["lib"].content == "usr/lib"
        assert nodes["etc/localtime"].content == "/usr/share/zoneinfo/UTC"
        assert (nodes["dev/null"].kind, nodes["dev/null"].content) == ("char", "1:3")
        assert (nodes["dev/vdz"].kind, nodes["dev/vdz"].content) == ("block", "254:7")
        assert (nodes["run/fifo"].kind, nodes["run/fifo"].mode) == ("fifo", 0o620)
        assert (mnt / "srv/blob").read_bytes() == bytes(range(256)) * 4096 * 3
        # The independent applier agrees on everything (dropping what it keeps and we do not).
        bundle = tmp_path / "bundle"
        run("umoci", "unpack", "--image", layout.image, bundle)
        theirs = snapshot(bundle / "rootfs")
        theirs["usr/bin/raw"] = raw  # umoci keeps trusted.x; we drop it by policy
        assert nodes == theirs
    assert record.rootfs.dropped_xattrs == 1
    assert oct(os.stat(rootfs).st_mode & 0o7777) == "0o644" and os.stat(rootfs).st_uid == 0


def test_image_config_and_accounts_are_kept_beside_the_image(
    layout: Layout, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    info = store.import_image(
        OciLayoutSource(path=str(layout.path), reference="v1"), tags=["test/converted:v1"]
    ).info
    assert store.inspect("test/converted:v1") == info
    config = info.record.config
    assert (config.entrypoint, config.cmd, config.working_dir, config.user) == (
        ["/usr/bin/tool"],
        ["serve", "--verbose"],
        "/srv",
        "app",
    )
    assert "MODE=image" in config.env
    default = process_for("test/converted:v1", config, info.record.accounts)
    assert default.argv == ["/usr/bin/tool", "serve", "--verbose"]
    assert (default.uid, default.gid, default.additional_gids, default.cwd) == (
        1000,
        1000,
        [50],
        "/srv",
    )
    assert "HOME=/home/app" in default.env
    override = process_for("x", config, info.record.accounts, args=["status"])
    assert override.argv == ["/usr/bin/tool", "status"]


def test_gzip_zstd_and_uncompressed_layers_convert_to_the_same_tree(
    layout: Layout, tmp_path: Path
) -> None:
    zstd = tmp_path / "zstd"
    skopeo_copy(f"oci:{layout.image}", f"oci:{zstd}:v1", "--dest-compress-format=zstd")
    archive = tmp_path / "image.tar"
    skopeo_copy(f"oci:{layout.image}", f"docker-archive:{archive}:test/archive:v1")
    trees = []
    transports: list[Source] = [
        OciLayoutSource(path=str(layout.path), reference="v1"),
        OciLayoutSource(path=str(zstd), reference="v1"),
        DockerArchiveSource(path=str(archive)),
    ]
    for number, source in enumerate(transports):
        store = ImageStore(tmp_path / f"store-{number}")
        result = store.import_image(source)
        media_types = {layer.media_type for layer in result.info.record.manifests[0].layers}
        trees.append((result.info.id, media_types, result.info.rootfs_path))
    ids = {image_id for image_id, _, _ in trees}
    assert len(ids) == 1  # one image, by its config digest, whatever the transport
    assert any(t.endswith("tar+gzip") for t in trees[0][1])
    assert all(t.endswith("tar+zstd") for t in trees[1][1])
    snapshots = []
    for number, (_, _, rootfs) in enumerate(trees):
        with mounted(Path(rootfs), tmp_path / f"mnt-{number}") as mnt:
            snapshots.append(snapshot(mnt))
    assert snapshots[0] == snapshots[1] == snapshots[2]


def test_one_store_converts_an_image_once_across_transports(layout: Layout, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    skopeo_copy(f"oci:{layout.image}", f"docker-archive:{archive}:test/archive:v1")
    store = ImageStore(tmp_path / "store")
    first = store.import_image(OciLayoutSource(path=str(layout.path), reference="v1"), tags=["a"])
    second = store.import_image(DockerArchiveSource(path=str(archive)), tags=["b"])
    assert first.converted and not second.converted
    assert second.info.id == first.info.id
    assert second.info.tags == ["a:latest", "b:latest"]
    assert len(second.info.record.manifests) == 2  # the layout's and the archive's
    assert len(list(store.roots.iterdir())) == 1
    sizes = store.sizes()
    assert sizes.images[0].rootfs_bytes == sizes.rootfs_bytes > 0
    assert sizes.total_bytes >= sizes.rootfs_bytes + sizes.blob_bytes


def test_large_sparse_files_keep_their_holes(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    big = source / "big"
    size = 4200 * 1024 * 1024  # past 4 GiB (mkfs.erofs reads and hashes every byte of it)
    with open(big, "wb") as file:
        file.truncate(size)
        for offset, data in ((0, b"head"), (2560 * 1024 * 1024, b"middle"), (size - 4, b"tail")):
            file.seek(offset)
            file.write(data)
    layer = tmp_path / "sparse.tar"
    run("tar", "--format=pax", "--sparse", "-C", source, "-cf", layer, "big")
    assert layer.stat().st_size < 1024 * 1024
    layout = Layout(tmp_path / "oci").create()
    layout.add_raw_layer(layer)
    store = ImageStore(tmp_path / "store")
    record = store.import_image(OciLayoutSource(path=str(layout.path))).info.record
    assert record.rootfs.chunked
    rootfs = store.rootfs_file(record.id)
    assert rootfs.stat().st_blocks * 512 < 64 * 1024 * 1024  # holes stayed holes
    with mounted(rootfs, tmp_path / "mnt") as mnt, open(mnt / "big", "rb") as file:
        assert os.fstat(file.fileno()).st_size == size
        for offset, data in ((0, b"head"), (2560 * 1024 * 1024, b"middle"), (size - 4, b"tail")):
            file.seek(offset)
            assert file.read(len(data)) == data
        file.seek(1024 * 1024 * 1024)
        assert file.read(4096) == bytes(4096)


def test_staging_tree_and_fetched_copy_never_reach_the_store(
    layout: Layout, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    store.import_image(OciLayoutSource(path=str(layout.path), reference="v1"))
    assert list(store.scratch_dir.iterdir()) == []
    for directory in (store.root, store.blobs, store.roots, store.images):
        assert oct(directory.stat().st_mode & 0o7777) == "0o755"
    for path in [*store.blobs.iterdir(), *store.roots.iterdir(), *store.images.iterdir()]:
        st = path.stat()
        assert (st.st_uid, oct(st.st_mode & 0o7777)) == (0, "0o644"), path
    assert oct(store.scratch_dir.stat().st_mode & 0o777) == "0o700"
