"""The client's directory listing: what the zone's find+stat prints, read without trusting it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from zoned.client import DirectoryListing, DirEntry
from zoned.client.files import _LIST_SCRIPT, _ListingParser
from zoned.errors import InvalidRequest


def parse(data: bytes, max_entries: int = 100, *, pieces: int = 1) -> DirectoryListing:
    parser = _ListingParser(max_entries)
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        if not parser.feed(data[start : start + step]):
            return parser.listing(complete=False)
    return parser.listing(complete=True)


LISTING = (
    b"81a4 12 1700000000 ./notes.txt\n"
    b"41ed 4096 1700000001 ./src\n"
    b"a1ff 7 1700000002 ./link\n"
    b"81a4 1 5 ./two\nlines\n"
    b"1180 0 5 ./fifo\n"
)


def test_entries_sorted_with_kinds_modes_and_names_with_newlines() -> None:
    for pieces in (1, 3, len(LISTING)):  # however the output is split
        entries, complete = parse(LISTING, pieces=pieces)
        assert complete
        assert entries == [
            DirEntry("fifo", "fifo", 0, 0o600, 5),
            DirEntry("link", "symlink", 7, 0o777, 1700000002),
            DirEntry("notes.txt", "file", 12, 0o644, 1700000000),
            DirEntry("src", "directory", 4096, 0o755, 1700000001),
            DirEntry("two\nlines", "file", 1, 0o644, 5),
        ]


def test_a_listing_stops_at_max_entries() -> None:
    entries, complete = parse(LISTING, max_entries=2)
    assert not complete and [e.name for e in entries] == ["notes.txt", "src"]
    entries, complete = parse(LISTING, max_entries=5)
    assert complete and len(entries) == 5
    assert parse(b"", max_entries=1) == ([], True)


def test_names_are_kept_as_bytes_would_be() -> None:
    (entry,), _ = parse(b"81a4 1 1 ./caf\xe9\n")
    assert entry.name.encode("utf-8", "surrogateescape") == b"caf\xe9"


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\n",
        b"81a4 1 1 notdotslash\n",
        b"81a4 1 1 ./" + b"x" * 5000 + b"\n",
        b"81a4 1 1 ./x\n" + b"y" * 5000,
        b"81a4 1 1 ./x\n" + b"y\n" * 3000,
    ],
)
def test_what_cannot_be_a_listing_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidRequest, match="the zone sent"):
        parse(data)


def test_the_script_on_this_hosts_busybox(tmp_path: Path) -> None:
    # The same find and stat as in the workload root (Debian's busybox).
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "a file").write_text("abc")
    (directory / "new\nline").write_text("")
    (directory / "sub").mkdir()
    (directory / "to-a").symlink_to("a file")
    done = subprocess.run(
        ["busybox", "sh", "-c", _LIST_SCRIPT, "zoned-list", str(directory)],
        capture_output=True,
        check=True,
    )
    entries, complete = parse(done.stdout)
    assert complete
    assert [(e.name, e.kind, e.size) for e in entries] == [
        ("a file", "file", 3),
        ("new\nline", "file", 0),
        ("sub", "directory", entries[2].size),
        ("to-a", "symlink", 6),
    ]
    missing = subprocess.run(
        ["busybox", "sh", "-c", _LIST_SCRIPT, "zoned-list", str(directory / "nope")],
        capture_output=True,
        check=False,
    )
    assert missing.returncode != 0 and b"nope" in missing.stderr
