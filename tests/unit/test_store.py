"""ZoneStore: round trips, atomic replacement, corrupt-file quarantine."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from zoned.errors import InvalidRequest
from zoned.store import ZoneStore


class Record(msgspec.Struct, frozen=True):
    name: str
    vcpus: int
    cpus: list[int] = msgspec.field(default_factory=list)


@pytest.fixture
def store(tmp_path: Path) -> ZoneStore[Record]:
    return ZoneStore(tmp_path, Record)


def test_round_trip(store: ZoneStore[Record]) -> None:
    store.save("alpha", Record("alpha", 2, [2, 3]))
    store.save("beta", Record("beta", 1))
    assert store.load_all() == {
        "alpha": Record("alpha", 2, [2, 3]),
        "beta": Record("beta", 1),
    }
    assert store.load("alpha") == Record("alpha", 2, [2, 3])
    assert store.load("gamma") is None


def test_files_are_json_under_zones(store: ZoneStore[Record], tmp_path: Path) -> None:
    store.save("alpha", Record("alpha", 2))
    path = tmp_path / "zones" / "alpha.json"
    assert msgspec.json.decode(path.read_bytes()) == {"name": "alpha", "vcpus": 2, "cpus": []}
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "zones").stat().st_mode & 0o777 == 0o700


def test_save_replaces(store: ZoneStore[Record]) -> None:
    store.save("alpha", Record("alpha", 1))
    store.save("alpha", Record("alpha", 4))
    assert store.load_all() == {"alpha": Record("alpha", 4)}
    assert [p.name for p in store.directory.iterdir()] == ["alpha.json"]


def test_empty_store(store: ZoneStore[Record]) -> None:
    assert store.load_all() == {}
    assert store.corrupt_files() == []
    assert store.delete("alpha") is False


def test_delete(store: ZoneStore[Record]) -> None:
    store.save("alpha", Record("alpha", 1))
    assert store.delete("alpha") is True
    assert store.delete("alpha") is False
    assert store.load_all() == {}


def test_interrupted_save_keeps_old_record(store: ZoneStore[Record]) -> None:
    # A crash after writing the temporary file but before the rename leaves
    # the old record in place and a stray temp file behind.
    store.save("alpha", Record("alpha", 1))
    stray = store.directory / ".alpha.k2j3h4.tmp"
    stray.write_bytes(msgspec.json.encode(Record("alpha", 8))[:10])
    assert store.load_all() == {"alpha": Record("alpha", 1)}
    assert not stray.exists()


def test_failed_rename_keeps_old_record_and_cleans_up(
    store: ZoneStore[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save("alpha", Record("alpha", 1))

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.save("alpha", Record("alpha", 8))
    monkeypatch.undo()
    assert [p.name for p in store.directory.iterdir()] == ["alpha.json"]
    assert store.load("alpha") == Record("alpha", 1)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"name": "alpha"}',  # missing field
        b'{"name": "alpha", "vcpus": "two"}',  # wrong type
        b"\xff\xfe",
    ],
)
def test_corrupt_file_is_quarantined(store: ZoneStore[Record], content: bytes) -> None:
    store.save("good", Record("good", 1))
    (store.directory / "alpha.json").write_bytes(content)
    assert store.load_all() == {"good": Record("good", 1)}
    corrupt = store.directory / "alpha.json.corrupt"
    assert corrupt.read_bytes() == content
    assert store.corrupt_files() == [corrupt]
    # Loading again is quiet and the zone can be saved afresh.
    assert store.load_all() == {"good": Record("good", 1)}
    store.save("alpha", Record("alpha", 2))
    assert store.load_all()["alpha"] == Record("alpha", 2)


def test_second_corruption_does_not_overwrite_first(store: ZoneStore[Record]) -> None:
    (store.directory).mkdir(parents=True)
    (store.directory / "alpha.json").write_bytes(b"first")
    store.load_all()
    (store.directory / "alpha.json").write_bytes(b"second")
    store.load_all()
    assert [p.read_bytes() for p in store.corrupt_files()] == [b"first", b"second"]


def test_foreign_files_are_ignored(store: ZoneStore[Record]) -> None:
    store.directory.mkdir(parents=True)
    (store.directory / "README").write_text("hello")
    (store.directory / "Not_A_Zone.json").write_text("{}")
    assert store.load_all() == {}
    assert (store.directory / "README").exists()
    assert (store.directory / "Not_A_Zone.json").exists()


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "Alpha", "1abc", "a" * 64, ".hidden"])
def test_invalid_names_are_rejected(store: ZoneStore[Record], name: str) -> None:
    with pytest.raises(InvalidRequest):
        store.save(name, Record(name, 1))
    with pytest.raises(InvalidRequest):
        store.delete(name)
