"""Uploaded archives and scratch disks as the daemon makes them; the agent finding its disks."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from zoned.agent.system import disks_by_serial, writable_layer
from zoned.images.errors import InvalidImage
from zoned.images.scratch import (
    ScratchDiskError,
    create_scratch_disk,
    mkfs_argv,
    remove_stale,
    scratch_path,
)
from zoned.images.upload import archive_kind, unpack_layout

BLOB = "blobs/sha256/" + "ab" * 32


def archive(path: Path, members: list[tuple[str, bytes | str | None]]) -> Path:
    """A tar of files (bytes), symlinks (str) and directories (None)."""
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def test_docker_archives_and_oci_archives_are_told_apart(tmp_path: Path) -> None:
    docker = archive(tmp_path / "d.tar", [("manifest.json", b"[]"), ("repositories", b"{}")])
    # Docker 25 and later write both: the docker manifest decides.
    both = archive(tmp_path / "b.tar", [("oci-layout", b"{}"), ("manifest.json", b"[]")])
    oci = archive(tmp_path / "o.tar", [("./oci-layout", b"{}"), ("./index.json", b"{}")])
    assert [archive_kind("x", path) for path in (docker, both, oci)] == [
        "docker-archive",
        "docker-archive",
        "oci-layout",
    ]
    (tmp_path / "junk").write_bytes(b"\x00" * 100 + os.urandom(1000))
    with pytest.raises(InvalidImage, match="image x: the uploaded archive is not a tar"):
        archive_kind("x", tmp_path / "junk")
    with pytest.raises(InvalidImage, match="neither"):
        archive_kind("x", archive(tmp_path / "n.tar", [("etc/passwd", b"root")]))


def test_a_layout_unpacks_to_exactly_its_files(tmp_path: Path) -> None:
    source = archive(
        tmp_path / "o.tar",
        [
            ("./", None),
            ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
            ("index.json", b"{}"),
            ("blobs/", None),
            ("blobs/sha256/", None),
            (BLOB, b"layer bytes"),
            ("manifest.json", b"[]"),  # skipped: not part of a layout
            ("blobs/sha512/" + "cd" * 64, b"skipped"),
        ],
    )
    layout = unpack_layout("x", source, tmp_path / "layout")
    files = sorted(str(p.relative_to(layout)) for p in layout.rglob("*") if p.is_file())
    assert files == [BLOB, "index.json", "oci-layout"]
    assert (layout / BLOB).read_bytes() == b"layer bytes"


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([("oci-layout", b"{}"), ("index.json", b"{}"), (BLOB, "/etc/shadow")], "not a regular"),
        ([("oci-layout", b"{}"), ("index.json", "/etc/shadow")], "not a regular"),
        ([("oci-layout", b"{}"), ("../index.json", b"{}")], "leaves the layout"),
        ([("oci-layout", b"{}"), ("blobs/sha256/../../x", b"{}")], "leaves the layout"),
        ([("oci-layout", b"{}"), ("etc/passwd", b"x")], "not part of an OCI layout"),
        ([("oci-layout", b"{}"), ("blobs/sha256/nothex", b"x")], "not part of an OCI layout"),
        ([("oci-layout", b"{}"), ("index.json", b"{}"), ("index.json", b"{}")], "appears twice"),
        ([("oci-layout", b"{}")], "lacks index.json"),
    ],
)
def test_a_hostile_layout_is_refused(
    tmp_path: Path, members: list[tuple[str, bytes | str | None]], problem: str
) -> None:
    with pytest.raises(InvalidImage, match=problem):
        unpack_layout("x", archive(tmp_path / "bad.tar", members), tmp_path / "layout")
    outside = {p.name for p in tmp_path.iterdir()}
    assert outside <= {"bad.tar", "layout"}


def test_a_scratch_disk_is_a_sparse_ext4_file_of_its_owner(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.fail("mkfs.ext4 is missing: apt-get install e2fsprogs")
    path = scratch_path(tmp_path / "scratch", "web", "6f1c2a9e-0000-4000-8000-000000000001")
    assert path.name == "web-6f1c2a9e-0000-4000-8000-000000000001.ext4"
    owner = (os.getuid(), os.getgid())
    create_scratch_disk(path, 64, owner)
    st = path.stat()
    assert (st.st_size, st.st_mode & 0o777, (st.st_uid, st.st_gid)) == (64 << 20, 0o600, owner)
    assert st.st_blocks * 512 < 8 << 20, "not sparse"
    assert (tmp_path / "scratch").stat().st_mode & 0o777 == 0o711
    probe = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True)
    assert "has_journal" not in probe.stdout and "zoned-writable" in probe.stdout
    with pytest.raises(ScratchDiskError, match="cannot make the scratch disk"):
        create_scratch_disk(path, 64, owner)  # it exists: never overwritten
    stale = tmp_path / "scratch" / "gone-1.ext4"
    stale.write_bytes(b"")
    assert remove_stale(tmp_path / "scratch", {path}) == [stale]
    assert path.exists() and not stale.exists()
    assert mkfs_argv(path, "x")[:1] == ["mkfs.ext4"]


def test_the_agent_finds_its_disks_by_serial_and_its_layer_on_the_cmdline(tmp_path: Path) -> None:
    sys_block = tmp_path / "block"
    for name, serial in (("vda", "zoned-writable\n"), ("vdb", "zoned-image"), ("vdc", "")):
        (sys_block / name).mkdir(parents=True)
        (sys_block / name / "serial").write_text(serial)
    (sys_block / "loop0").mkdir()
    assert disks_by_serial(str(sys_block)) == {
        "zoned-writable": "/dev/vda",
        "zoned-image": "/dev/vdb",
    }
    assert disks_by_serial(str(tmp_path / "none")) == {}
    cmdline = tmp_path / "cmdline"
    for text, expected in (
        ("console=ttyS0 zoned.zone=a zoned.writable=tmpfs:128", ("tmpfs", 128)),
        ("zoned.writable=disk", ("disk", None)),
        ("zoned.writable=tmpfs:0 quiet", ("tmpfs", None)),
        ("zoned.writable=tmpfs:x", ("tmpfs", None)),
        ("console=ttyS0", ("tmpfs", None)),
    ):
        cmdline.write_text(text)
        assert writable_layer(str(cmdline)) == expected, text
    assert writable_layer(str(tmp_path / "missing")) == ("tmpfs", None)
