"""ZoneStore: round trips, atomic replacement, corrupt-file quarantine."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import msgspec
import pytest
import trio

from zoned.errors import InvalidRequest
from zoned.store import RecordWriter, ZoneStore


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


# ---------------------------------------------------------------- RecordWriter


class ThreadNotingStore(ZoneStore[Record]):
    """Notes the thread every save and delete ran on."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, Record)
        self.threads: list[threading.Thread] = []

    def save(self, name: str, record: Record) -> None:
        self.threads.append(threading.current_thread())
        super().save(name, record)

    def delete(self, name: str) -> bool:
        self.threads.append(threading.current_thread())
        return super().delete(name)


async def test_writes_run_in_order_on_worker_threads_and_announce_after(tmp_path: Path) -> None:
    store = ThreadNotingStore(tmp_path)
    writer = RecordWriter(store)
    seen_on_disk: list[Record | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for vcpus in (1, 2, 3):
            writer.save(
                "alpha",
                Record("alpha", vcpus),
                then=lambda: seen_on_disk.append(store.load("alpha")),
            )
        last = writer.delete("alpha", then=lambda: seen_on_disk.append(store.load("alpha")))
        await last.wait()
        nursery.cancel_scope.cancel()
    # Each announcement saw its own write on disk, in the order they were asked for.
    assert seen_on_disk == [Record("alpha", 1), Record("alpha", 2), Record("alpha", 3), None]
    assert len(store.threads) == 4
    assert threading.main_thread() not in store.threads


async def test_a_failed_write_is_reported_to_its_waiter_and_still_announced(
    tmp_path: Path,
) -> None:
    writer = RecordWriter(ZoneStore(tmp_path, Record))
    announced: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        bad = writer.save("Not A Name", Record("x", 1), then=lambda: announced.append("bad"))
        with pytest.raises(InvalidRequest):
            await bad.wait()
        good = writer.save("beta", Record("beta", 1), then=lambda: announced.append("good"))
        await good.wait()
        nursery.cancel_scope.cancel()
    assert announced == ["bad", "good"]
    assert ZoneStore(tmp_path, Record).load("beta") == Record("beta", 1)


async def test_a_cancelled_writer_finishes_what_was_queued(tmp_path: Path) -> None:
    writer = RecordWriter(ZoneStore(tmp_path, Record))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writes = [writer.save(f"z{i}", Record(f"z{i}", i)) for i in range(5)]
        nursery.cancel_scope.cancel()
    assert all(write.done.is_set() for write in writes)
    assert sorted(ZoneStore(tmp_path, Record).load_all()) == [f"z{i}" for i in range(5)]


async def test_a_write_asked_for_after_the_writer_ended_is_done_at_once(tmp_path: Path) -> None:
    """A shielded clean-up that outlives the writer task (a pool zone destroyed
    while the daemon stops) still gets its write, and its wait returns."""
    writer = RecordWriter(ZoneStore(tmp_path, Record))
    announced: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.save("gamma", Record("gamma", 1)).wait()
        nursery.cancel_scope.cancel()
    late = writer.delete("gamma", then=lambda: announced.append("deleted"))
    with trio.fail_after(5):
        await late.wait()
    assert announced == ["deleted"]
    assert ZoneStore(tmp_path, Record).load_all() == {}
    bad = writer.save("Not A Name", Record("x", 1))
    with pytest.raises(InvalidRequest):
        await bad.wait()
