"""Trees out of a zone: a hostile tar stream, unpacked on this host without trusting it.

The archives are built here: crafted ones with :mod:`tarfile` as a writer
(it writes whatever name or link it is given, GNU long names included),
well-formed ones with the same busybox the agent uses. Each crafted one must
be refused naming its entry, write nothing outside the destination and leave
no destination (nor any scratch directory) behind.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from zoned.client.extract import TreeExtractor, TreeSummary
from zoned.client.tarstream import MAX_NAME_BYTES, TarReader, UnsafeTree, split_name
from zoned.images.hostfiles import BUSYBOX


class Spec(NamedTuple):
    """One member to write: its name, kind, contents, link target, mode."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    mode: int = 0o644


def file(name: str, data: bytes = b"") -> Spec:
    return Spec(name, data=data)


def directory(name: str) -> Spec:
    return Spec(name, tarfile.DIRTYPE, mode=0o755)


def symlink(name: str, target: str) -> Spec:
    return Spec(name, tarfile.SYMTYPE, link=target)


def hardlink(name: str, target: str) -> Spec:
    return Spec(name, tarfile.LNKTYPE, link=target)


def special(name: str, kind: bytes) -> Spec:
    return Spec(name, kind)


def archive(*members: Spec, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.mode = member.mode
            info.linkname = member.link
            info.mtime = 1_700_000_000
            info.size = len(member.data)
            tar.addfile(info, io.BytesIO(member.data))
    return buffer.getvalue()


def extract(
    data: bytes,
    dest: Path,
    *,
    piece: int = 700,
    max_entries: int = 1000,
    outward_links: bool = False,
) -> TreeSummary:
    extractor = TreeExtractor(dest, max_entries=max_entries, outward_links=outward_links)
    try:
        for start in range(0, len(data), piece):
            extractor.feed(data[start : start + piece])
        return extractor.finish()
    finally:
        extractor.abort()


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Path]:
    """A directory to copy into, with a sentinel file beside it that must never change;
    afterwards nothing but the sentinel (and what a test made on purpose) is left."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("untouched\n")
    (tmp_path / "into").mkdir()
    yield tmp_path / "into"
    assert sorted(p.name for p in outside.iterdir()) == ["file"]
    assert (outside / "file").read_text() == "untouched\n"


def refused(
    data: bytes, place: Path, match: str, *, max_entries: int = 1000, outward_links: bool = False
) -> None:
    dest = place / "copy"
    with pytest.raises(UnsafeTree, match=match):
        extract(data, dest, max_entries=max_entries, outward_links=outward_links)
    assert list(place.iterdir()) == [], "a refused copy left something behind"
    # Nothing was written anywhere under the test's directory but the sentinel.
    written = [p for p in place.parent.rglob("*") if p.name not in ("into", "outside", "file")]
    assert written == []


def test_names_that_leave_the_tree_are_refused(place: Path) -> None:
    refused(archive(file("../outside/evil")), place, r"'\.\./outside/evil'.*'\.\.'")
    refused(archive(file("ok/../../outside/evil")), place, "goes up")
    refused(archive(file("/tmp/evil")), place, "absolute")
    with pytest.raises(UnsafeTree, match="NUL"):
        split_name(b"a\0b")  # a header's own name field ends at its first NUL
    refused(archive(file("d/" * 1000 + "f")), place, "deeper than|longer than")
    refused(archive(file("x" * 300)), place, "component longer")


def test_writing_through_a_link_of_the_archive_is_refused(place: Path) -> None:
    through_link = archive(
        file("good.txt", b"fine"),
        symlink("link", str(place.parent / "outside")),
        file("link/evil", b"pwned"),
    )
    refused(through_link, place, r"'link/evil' is inside 'link', which is a symlink")
    relative_link = archive(symlink("up", "../../outside"), file("up/evil", b"pwned"))
    refused(relative_link, place, "inside 'up'")
    # Even allowed to keep outward links, nothing is written through one.
    refused(relative_link, place, "inside 'up'", outward_links=True)


def test_outward_links_refuse_the_copy_unless_allowed_and_are_never_followed(
    place: Path,
) -> None:
    for target in ("/etc/passwd", "../outside/file", "sub/../../x"):
        data = archive(file("a", b"a"), symlink("l", target))
        refused(data, place, r"'l' is a symbolic link to .* outside the tree")
    # A chain of links inside that ends outside.
    chain = archive(
        symlink("one", "two/.."),
        symlink("two", "dir/deeper"),
        directory("dir"),
        symlink("dir/deeper", "../.."),
    )
    refused(chain, place, "'dir/deeper'|'one'")
    refused(archive(symlink("p", "q"), symlink("q", "p")), place, "more than 40 links")

    # Allowed: made as they are, not followed (the sentinel is untouched).
    outward = archive(file("a", b"a"), symlink("l", "../outside/file"))
    summary = extract(outward, place / "copy", outward_links=True)
    assert summary.symlinks == 1
    assert os.readlink(place / "copy" / "l") == "../outside/file"
    # Links that stay inside need no permission.
    inside = archive(
        directory("dir"),
        file("dir/f", b"f"),
        symlink("dir/self", "../dir/f"),
        symlink("top", "dir/self"),
        symlink("dangling", "nowhere/x"),
    )
    extract(inside, place / "inside")
    assert (place / "inside" / "top").read_bytes() == b"f"
    for name in ("copy", "inside"):
        shutil.rmtree(place / name)


def test_the_long_name_symlink_chain_of_cve_2025_4517_writes_nothing(place: Path) -> None:
    """The shape of the CVE's proof of concept: nested directories of 247-character
    names, a chain of symbolic links whose resolved path passes PATH_MAX, a link
    out of the tree at its end and a write through it."""
    component = "d" * 247
    steps = "abcdefghijklmnop"
    members = []
    path = ""
    for step in steps:
        members += [directory(os.path.join(path, component))]
        members += [symlink(os.path.join(path, step), component)]
        path = os.path.join(path, component)
    link_path = os.path.join("/".join(steps), "l" * 254)
    members += [
        symlink(link_path, "../" * len(steps)),
        symlink("escape", link_path + "/.." * 2 + "/outside"),
        file("escape/evil", b"pwned"),
        hardlink("flaglink", "escape/file"),
    ]
    data = archive(*members)
    refused(data, place, "inside 'a'|inside 'escape'|outside the tree")
    refused(data, place, "inside", outward_links=True)


def test_hard_links_only_to_files_of_the_tree(place: Path) -> None:
    for target in ("../outside/file", str(place.parent / "outside" / "file"), "later"):
        data = archive(hardlink("h", target), file("later", b"x"))
        refused(data, place, "'h'")
    to_link = archive(symlink("l", "../outside/file"), hardlink("h", "l"))
    refused(to_link, place, "hard link to 'l', which is no file")


def test_special_files_duplicates_truncation_and_sizes_are_refused(place: Path) -> None:
    refused(archive(special("null", tarfile.CHRTYPE)), place, "character device")
    refused(archive(special("sda", tarfile.BLKTYPE)), place, "block device")
    refused(archive(special("pipe", tarfile.FIFOTYPE)), place, "FIFO")
    refused(archive(file("twice", b"1"), file("twice", b"2")), place, "'twice' appears twice")
    refused(archive(file("f", b"1"), directory("f")), place, "'f' appears twice")
    whole = archive(file("big", b"x" * 5000))
    refused(whole[:2048], place, "truncated")
    refused(whole.rstrip(b"\0"), place, "truncated")
    corrupt = bytearray(whole)
    corrupt[10] ^= 0xFF  # in the header's name: the checksum no longer matches
    refused(bytes(corrupt), place, "checksum")
    refused(whole + b"\1", place, "goes on after its end")
    many = archive(*(file(f"f{i}") for i in range(20)))
    refused(many, place, "more than 10 entries", max_entries=10)


def test_a_huge_long_name_record_is_refused_before_it_is_read(place: Path) -> None:
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = 10**9
    data = header.tobuf(format=tarfile.USTAR_FORMAT) + b"x" * 512
    with pytest.raises(UnsafeTree, match="long name or pax record of 1000000000 bytes"):
        TarReader().feed(data)
    name = "n/" * (MAX_NAME_BYTES // 2) + "end"
    refused(archive(file(name)), place, "long name or pax record of 4100 bytes")


def test_pax_headers_give_names_and_sizes(place: Path) -> None:
    data = archive(file("ü" * 120, b"pax"), directory("d"), fmt=tarfile.PAX_FORMAT)
    summary = extract(data, place / "copy")
    assert (place / "copy" / ("ü" * 120)).read_bytes() == b"pax"
    assert summary.files == 1
    shutil.rmtree(place / "copy")
    refused(archive(file("../x", b"1"), fmt=tarfile.PAX_FORMAT), place, "goes up")


def test_a_tree_from_busybox_tar_is_copied_whole(tmp_path: Path) -> None:
    """What the agent's tools really send: long names, links inside, hard links, modes."""
    source = tmp_path / "src"
    deep = source / ("x" * 120) / ("y" * 120)
    deep.mkdir(parents=True)
    (deep / ("z" * 200)).write_bytes(b"deep")
    (source / "run.sh").write_bytes(b"#!/bin/sh\n")
    (source / "run.sh").chmod(0o4755)  # setuid: not on this host
    (source / "hard").hardlink_to(source / "run.sh")
    (source / "link").symlink_to("run.sh")
    (source / "long").symlink_to(("x" * 120) + "/" + ("y" * 120) + "/" + ("z" * 200))
    (source / "locked").mkdir(mode=0o500)
    data = subprocess.run(
        [str(BUSYBOX), "tar", "-c", "-f", "-", "-C", str(source), "."],
        capture_output=True,
        check=True,
    ).stdout
    dest = tmp_path / "dest"
    summary = extract(data, dest, piece=4096)
    assert summary == TreeSummary(dest, 3, 4, 2, len(b"deep") + len(b"#!/bin/sh\n"))
    assert (dest / deep.relative_to(source) / ("z" * 200)).read_bytes() == b"deep"
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert (dest / "hard").stat().st_ino == (dest / "run.sh").stat().st_ino
    assert os.readlink(dest / "link") == "run.sh"
    assert (dest / "long").read_bytes() == b"deep"
    assert stat.S_IMODE((dest / "locked").stat().st_mode) == 0o700  # always the owner's
    assert int((dest / "run.sh").stat().st_mtime) == int((source / "run.sh").stat().st_mtime)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]
    # The destination must not exist: nothing is ever copied over anything.
    with pytest.raises(UnsafeTree, match="already exists"):
        extract(data, dest)
