"""zoned-mcp's results: output bounded head and tail, text that never fails, errors in words."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
from hypothesis import given

from zoned import protocol as p
from zoned.client import ConnectionLost, DaemonUnavailable, DirEntry
from zoned.errors import NotFound
from zoned.mcp import results as r


def test_output_within_the_limit_is_kept_whole() -> None:
    out = r.BoundedOutput("stdout", 16)
    for piece in (b"hello ", b"world", b"\n"):
        out.add(piece)
    assert (out.text(), out.total, out.cut, out.note()) == ("hello world\n", 12, 0, None)


def test_output_beyond_the_limit_keeps_its_head_and_tail() -> None:
    out = r.BoundedOutput("stderr", 10)
    out.add(b"0123456789")
    out.add(b"abcdefghij" * 100)
    out.add(b"END")
    assert out.total == 1013 and out.cut == 1003
    head, marker, tail = out.text().split("\n")
    assert (head, tail) == ("01234", "ijEND")
    assert marker == "[... 1003 bytes of stderr cut here by zoned-mcp ...]"
    assert (
        out.note()
        == "stderr was 1013 bytes: the first 5 and the last 5 are shown, 1003 cut in between"
    )


def test_a_cut_never_splits_a_character() -> None:
    out = r.BoundedOutput("stdout", 8)  # 4 bytes of head, 4 of tail
    out.add("aaé".encode() + b"x" * 20 + "éé".encode())
    head, _, tail = out.text().split("\n")
    assert (head, tail) == ("aaé", "éé")
    out = r.BoundedOutput("stdout", 8)
    out.add(b"abc" + "é".encode()[:1] + b"z" * 20 + "€".encode())
    head, _, tail = out.text().split("\n")
    assert head == "abc"  # the half character is left out, not replaced
    assert tail == "z€"


@given(chunks=st.lists(st.binary(max_size=300), max_size=30), limit=st.integers(2, 200))
def test_bounded_output_holds_at_most_its_limit(chunks: list[bytes], limit: int) -> None:
    out = r.BoundedOutput("stdout", limit)
    for chunk in chunks:
        out.add(chunk)
    whole = b"".join(chunks)
    assert out.total == len(whole)
    kept = len(whole) - out.cut
    assert kept <= limit and kept == min(limit, len(whole))
    text = out.text()  # never raises, whatever the bytes
    if not out.cut:
        assert text == whole.decode(errors="replace")


def test_file_text_says_what_it_changed() -> None:
    assert r.file_text("ok é".encode(), "utf-8", truncated=False) == ("ok é", [])
    text, notes = r.file_text(b"\xff\xfeok", "utf-8", truncated=False)
    assert text == "\ufffd\ufffdok" and "base64" in notes[0]
    assert r.file_text("é".encode()[:1], "utf-8", truncated=True) == ("", [])
    assert r.file_text(b"\x00\xff", "base64", truncated=False) == ("AP8=", [])
    # A file that holds U+FFFD itself is valid UTF-8: no note.
    assert r.file_text("\ufffd".encode(), "utf-8", truncated=False) == ("\ufffd", [])


def test_command_notes() -> None:
    quiet = r.BoundedOutput("stdout", 10)
    loud = r.BoundedOutput("stderr", 4)
    loud.add(b"123456")
    killed = p.ExecExit(id=1, signal=9, oom_killed=True)
    assert r.command_notes(killed, quiet, loud, timed_out=True, timeout_s=2.5) == [
        "timed out after 2.5 s: killed with SIGKILL",
        "the out-of-memory killer killed it (or a process it started)",
        "stderr was 6 bytes: the first 2 and the last 2 are shown, 2 cut in between",
    ]
    assert r.command_notes(p.ExecExit(id=1, signal=15), quiet, quiet, False, 1) == [
        "ended by SIGTERM"
    ]
    assert r.command_notes(p.ExecExit(id=1, exit_code=0), quiet, quiet, False, 1) == []
    assert r.signal_name(63) == "signal 63"


def test_errors_in_words() -> None:
    assert r.error_text(r.ToolInputError("bad")) == "bad"
    assert r.error_text(NotFound("no zone 'x'")) == "no zone 'x' (not_found)"
    unavailable = DaemonUnavailable(Path("/run/z.sock"), FileNotFoundError(2, "No such file"))
    assert r.error_text(unavailable).startswith("cannot connect to zoned at /run/z.sock")
    lost = r.error_text(ConnectionLost("the daemon closed the connection"))
    assert "zones of this session are gone" in lost and "restart zoned-mcp" in lost
    bug = r.error_text(KeyError("secret internals"))
    assert "secret" not in bug and "internal error" in bug
    assert isinstance(r.ToolInputError("x"), r.EXPECTED_ERRORS)
    assert not isinstance(KeyError(), r.EXPECTED_ERRORS)


def test_file_entries_have_valid_names() -> None:
    raw = b"caf\xe9".decode("utf-8", "surrogateescape")  # latin-1 bytes from the zone
    entry = r.file_entry(DirEntry(raw, "file", 3, 0o640, 17))
    assert entry == r.FileEntry(name="caf\ufffd", type="file", size=3, mode="640", mtime=17)
