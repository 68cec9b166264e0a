"""The newc writer, checked by extracting its archives with GNU cpio."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from zoned.cpio import CpioWriter


def _archive(build: Callable[[CpioWriter], None]) -> bytes:
    out = io.BytesIO()
    writer = CpioWriter(out)
    build(writer)
    writer.finish()
    return out.getvalue()


def _sample(writer: CpioWriter) -> None:
    writer.directory("etc", mode=0o750)
    writer.file("/etc/hostname", b"zone\n", mode=0o640, uid=0, gid=4)
    writer.file("usr/lib/deep/nested/file.bin", bytes(range(256)) * 3, mode=0o755)
    writer.file("empty", b"")
    writer.file("odd", b"x" * 5)
    writer.symlink("usr/bin/python3", "/usr/lib/deep/nested/file.bin")
    writer.symlink("relative", "etc/hostname")
    writer.char_device("dev/console", 5, 1, mode=0o600)
    writer.char_device("dev/null", 1, 3, mode=0o666)
    writer.directory("tmp", mode=0o1777)


def _extract(archive: bytes, into: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("extracting device nodes with cpio needs root", pytrace=False)
    into.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=into,
        check=True,
    )


def test_extracts_to_the_written_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _extract(_archive(_sample), root)

    hostname = root / "etc/hostname"
    assert hostname.read_bytes() == b"zone\n"
    assert stat.S_IMODE(hostname.stat().st_mode) == 0o640
    assert (hostname.stat().st_uid, hostname.stat().st_gid) == (0, 4)
    assert hostname.stat().st_mtime == 0
    assert stat.S_IMODE((root / "etc").stat().st_mode) == 0o750

    binary = root / "usr/lib/deep/nested/file.bin"
    assert binary.read_bytes() == bytes(range(256)) * 3
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    assert (root / "empty").read_bytes() == b""
    assert (root / "odd").read_bytes() == b"xxxxx"

    assert os.readlink(root / "usr/bin/python3") == "/usr/lib/deep/nested/file.bin"
    assert os.readlink(root / "relative") == "etc/hostname"

    console = (root / "dev/console").lstat()
    assert stat.S_ISCHR(console.st_mode)
    assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
    null = (root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666

    tmp = (root / "tmp").stat()
    assert stat.S_ISDIR(tmp.st_mode)
    assert stat.S_IMODE(tmp.st_mode) == 0o1777


def test_lists_entries_in_write_order_with_parents_first() -> None:
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=_archive(_sample), capture_output=True, check=True
    ).stdout.decode()
    assert listing.splitlines() == [
        "etc",
        "etc/hostname",
        "usr",
        "usr/lib",
        "usr/lib/deep",
        "usr/lib/deep/nested",
        "usr/lib/deep/nested/file.bin",
        "empty",
        "odd",
        "usr/bin",
        "usr/bin/python3",
        "relative",
        "dev",
        "dev/console",
        "dev/null",
        "tmp",
    ]


def test_output_is_deterministic_and_ends_with_the_trailer() -> None:
    first = _archive(_sample)
    assert first == _archive(_sample)
    assert len(first) % 4 == 0
    assert first.startswith(b"070701")
    assert b"TRAILER!!!\0" in first[-512:]


def test_header_layout() -> None:
    archive = _archive(lambda w: w.file("a", b"hi", mode=0o600))
    header = archive[:110]
    fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _, _, _, _, namesize, check = fields
    assert (ino, mode, uid, gid, nlink, mtime, size, namesize, check) == (
        1,
        stat.S_IFREG | 0o600,
        0,
        0,
        1,
        0,
        2,
        2,
        0,
    )
    # 110-byte header + "a\0" padded to 112, then the data padded to 4.
    assert archive[110:112] == b"a\0"
    assert archive[112:116] == b"hi\0\0"


@pytest.mark.parametrize("path", ["", "/", "a/../b", "./a", "a//b", "a\0b"])
def test_rejects_bad_paths(path: str) -> None:
    writer = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError, match="invalid archive path"):
        writer.file(path, b"")


def test_rejects_duplicates_and_writes_after_finish() -> None:
    writer = CpioWriter(io.BytesIO())
    writer.file("a", b"")
    with pytest.raises(ValueError, match="duplicate"):
        writer.file("/a", b"x")
    writer.directory("d")
    writer.directory("d")  # An existing directory is fine (parents are implicit).
    writer.finish()
    with pytest.raises(ValueError, match="finished"):
        writer.file("b", b"")
