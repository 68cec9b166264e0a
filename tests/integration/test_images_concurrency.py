"""Two importers of one image convert it once; an importer killed mid-pull or
mid-conversion leaves nothing that looks complete and the next operation removes
what it left; host tools die with their caller or on cancellation.

Importers run as real separate processes (``python -c``). Where a test must
kill one at a given point, the importer's progress callback writes a marker
file and then blocks, so the kill lands exactly in that phase: no sleeps, no
timing in the assertions."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.imagetools import Layout, require_tools, write_tar
from zoned.images.errors import ImportCancelled
from zoned.images.progress import Cancel, ImportProgress
from zoned.images.sources import OciLayoutSource
from zoned.images.store import ImageStore, ImportResult
from zoned.images.tools import run_tool

IMPORTER = """
import json, pathlib, sys, time
from zoned.images.sources import OciLayoutSource
from zoned.images.store import ImageStore

store_dir, layout, stop_phase, marker, go = sys.argv[1:]
for _ in range(600):  # wait for the starting signal (60 s at most)
    if pathlib.Path(go).exists():
        break
    time.sleep(0.1)

def progress(event):
    # Stop at the start of a phase; in "apply", once some of the layer is applied.
    if event.phase == stop_phase and (stop_phase != "apply" or event.bytes_done > 0):
        pathlib.Path(marker).write_text(event.phase)
        time.sleep(3600)  # the test kills us here

result = ImageStore(pathlib.Path(store_dir)).import_image(
    OciLayoutSource(path=layout, reference="v1"), progress=progress
)
print(json.dumps({"converted": result.converted, "id": result.info.id}))
"""


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    require_tools("umoci", "skopeo", "mkfs.erofs")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """An image big enough (128 MiB of incompressible data in 32 files) that each
    phase runs for a while."""
    work = tmp_path_factory.mktemp("layout")
    made = Layout(work / "oci", "v1").create()
    entries: list[tuple[object, bytes | None]] = []
    for number in range(32):
        entries.append((tarfile.TarInfo(f"data/file-{number:02}"), os.urandom(4 * 1024 * 1024)))
    made.add_raw_layer(write_tar(work / "data.tar", entries))
    return made


class Importer:
    def __init__(self, store: Path, layout: Layout, work: Path, stop_phase: str = "never") -> None:
        self.marker = work / f"marker-{id(self)}"
        self.go = work / "go"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                IMPORTER,
                str(store),
                str(layout.path),
                stop_phase,
                str(self.marker),
                str(self.go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait_for_marker(self) -> None:
        for _ in range(1200):  # 120 s at most
            if self.marker.exists():
                return
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                pytest.fail(f"importer exited before its stop point:\n{err.decode()}")
            time.sleep(0.1)
        pytest.fail("importer did not reach its stop point in 120 s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def result(self) -> dict[str, object]:
        out, err = self.process.communicate(timeout=600)
        assert self.process.returncode == 0, err.decode()
        return json.loads(out)  # type: ignore[no-any-return]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def wait_until_gone(text: str) -> None:
    for _ in range(300):  # 30 s at most: pdeathsig is asynchronous
        if not processes_mentioning(text):
            return
        time.sleep(0.1)
    survivors = subprocess.run(
        ["ps", "-eo", "pid,ppid,stat,args"], capture_output=True, text=True, check=False
    ).stdout
    pytest.fail(f"processes outlived their caller: {processes_mentioning(text)}\n{survivors}")


def wait_until_unlocked(directory: Path) -> None:
    """Until nothing holds ``directory``'s operation lock: a killed tool's descriptors
    close only at the end of its exit, after its command line is gone from /proc."""
    for _ in range(300):  # 30 s at most
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.1)
        finally:
            os.close(fd)
    pytest.fail(f"{directory} stayed locked after its importer was killed")


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "store"
    ImageStore(path)
    yield path


def test_two_processes_importing_one_image_convert_it_once(
    layout: Layout, store_dir: Path, tmp_path: Path
) -> None:
    importers = [Importer(store_dir, layout, tmp_path) for _ in range(2)]
    (tmp_path / "go").touch()
    results = [importer.result() for importer in importers]
    assert sorted(bool(r["converted"]) for r in results) == [False, True]
    assert results[0]["id"] == results[1]["id"]
    store = ImageStore(store_dir)
    assert len(store.list_images()) == 1
    assert len(list(store.roots.iterdir())) == 1
    assert list(store.scratch_dir.iterdir()) == []


def test_two_threads_importing_one_image_convert_it_once(layout: Layout, store_dir: Path) -> None:
    store = ImageStore(store_dir)
    results: list[ImportResult] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait(timeout=60)
            results.append(
                store.import_image(OciLayoutSource(path=str(layout.path), reference="v1"))
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert sorted(r.converted for r in results) == [False, True]
    assert len(list(store.roots.iterdir())) == 1


# "verify": the copy is fetched, nothing checked or published; "apply": the staging
# tree is half made; "build": the tree is complete, its EROFS image not begun.
@pytest.mark.parametrize("phase", ["verify", "apply", "build"])
def test_a_killed_import_leaves_nothing_that_looks_complete(
    layout: Layout, store_dir: Path, tmp_path: Path, phase: str
) -> None:
    (tmp_path / "go").touch()
    importer = Importer(store_dir, layout, tmp_path, stop_phase=phase)
    importer.wait_for_marker()
    store = ImageStore(store_dir)
    leftover = list(store.scratch_dir.iterdir())
    assert len(leftover) == 1
    assert store.cleanup() == 0  # the importer lives: its scratch directory stays
    assert store.scratch_dir.joinpath(leftover[0].name).exists()
    importer.kill()
    wait_until_unlocked(leftover[0])
    assert store.list_images() == []
    assert list(store.images.iterdir()) == [] and list(store.roots.iterdir()) == []
    with pytest.raises(Exception, match="not in the image store"):
        store.resolve("sha256:" + "0" * 64)
    # The next operation removes what the dead one left, then works.
    result = store.import_image(OciLayoutSource(path=str(layout.path), reference="v1"))
    assert result.converted
    assert list(store.scratch_dir.iterdir()) == []
    assert store.verify_rootfs(result.info.id)


def test_cleanup_removes_files_no_record_names(layout: Layout, store_dir: Path) -> None:
    store = ImageStore(store_dir)
    image_id = store.import_image(OciLayoutSource(path=str(layout.path), reference="v1")).info.id
    # What a crash between publishing steps would leave: a root and a blob without
    # record, a temporary write, a dead operation's directory.
    (store.roots / ("ab" * 32 + ".erofs")).write_bytes(b"orphan")
    (store.blobs / ("cd" * 32)).write_bytes(b"orphan")
    (store.scratch_dir / ".write-dead").write_bytes(b"partial")
    (store.scratch_dir / "op-dead" / "root").mkdir(parents=True)
    assert store.cleanup() == 4
    assert [p.name for p in store.roots.iterdir()] == [image_id.removeprefix("sha256:") + ".erofs"]
    assert list(store.scratch_dir.iterdir()) == []
    assert store.verify_rootfs(image_id)


CALLER = """
import pathlib, sys
from zoned.images.progress import Cancel
from zoned.images.tools import run_tool

scratch, marker, seconds = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
run_tool(
    "test",
    ["sleep", seconds],
    cancel=Cancel(),
    scratch=scratch,
    max_seconds=600,
    poll=lambda: marker.touch(),
)
"""


def unique_seconds() -> str:
    """A sleep length no other process on this shared machine uses."""
    return f"300.{os.getpid()}{time.monotonic_ns() % 10**6:06}"


def test_tools_die_with_their_caller(tmp_path: Path) -> None:
    marker = tmp_path / "running"
    seconds = unique_seconds()
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(tmp_path), str(marker), seconds])
    for _ in range(600):
        if marker.exists():
            break
        assert caller.poll() is None, "the caller exited early"
        time.sleep(0.1)
    sleepers = [c for c in processes_mentioning(f"sleep {seconds}") if "setpriv" not in c]
    assert sleepers, "the tool is not running"
    caller.send_signal(signal.SIGKILL)
    caller.wait(timeout=30)
    wait_until_gone(f"sleep {seconds}")


def test_cancelling_a_tool_kills_it(tmp_path: Path) -> None:
    cancel = Cancel()
    seconds = unique_seconds()
    with pytest.raises(ImportCancelled):
        run_tool(
            "test",
            ["sleep", seconds],
            cancel=cancel,
            scratch=tmp_path,
            max_seconds=600,
            poll=cancel.set,  # called while sleep runs
        )
    assert not processes_mentioning(f"sleep {seconds}")


def test_cancelling_an_import_keeps_nothing(layout: Layout, store_dir: Path) -> None:
    store = ImageStore(store_dir)
    cancel = Cancel()

    def progress(event: ImportProgress) -> None:
        if event.phase == "apply" and event.bytes_done > 0:
            cancel.set()  # half-way through the layer

    with pytest.raises(ImportCancelled, match="cancelled"):
        store.import_image(
            OciLayoutSource(path=str(layout.path), reference="v1"), progress=progress, cancel=cancel
        )
    assert store.list_images() == []
    assert list(store.scratch_dir.iterdir()) == [] and list(store.roots.iterdir()) == []
