"""Service tests: the real daemon in-process, on a real unix socket, with
libvirt's in-process ``test:///default`` driver standing in for QEMU.

These exercise the control socket, the protocol and the zone manager's
bookkeeping quickly; the integration tests boot real zones.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from zoned.config import Config
from zoned.daemon import Daemon
from zoned.kernel.store import DEFAULT_STORE


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: unix socket paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="zt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def service_config(root: Path, **overrides: object) -> Config:
    values: dict[str, object] = {
        "socket_path": str(root / "zoned.sock"),
        "state_dir": str(root / "state"),
        "runtime_dir": str(root / "run"),
        "log_dir": str(root / "log"),
        "kernel_store": str(DEFAULT_STORE),
        "libvirt_uri": "test:///default",
        "accelerator": "tcg",
        "boot_timeout_s": 1.0,
        "reserved_memory_mib": 0,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        started: Daemon = await nursery.start(Daemon(service_config(short_tmp)).run)
        yield started
        nursery.cancel_scope.cancel()


@pytest.fixture
def threaded_daemon(short_tmp: Path) -> Iterator[Daemon]:
    """The daemon on its own trio loop in a thread, for synchronous tests
    (hypothesis drives examples synchronously, one daemon for all of them)."""
    ready = threading.Event()
    holder: dict[str, Any] = {}
    daemon = Daemon(service_config(short_tmp))

    async def main() -> None:
        with trio.CancelScope() as scope:
            holder["scope"] = scope
            holder["token"] = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                ready.set()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            holder["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=thread_main, name="zoned-test-daemon")
    thread.start()
    if not ready.wait(60) or "error" in holder:
        raise RuntimeError(f"daemon did not start: {holder.get('error')!r}")
    try:
        yield daemon
    finally:
        trio.from_thread.run_sync(holder["scope"].cancel, trio_token=holder["token"])
        thread.join(30)
        if "error" in holder:
            raise RuntimeError(f"daemon failed: {holder['error']!r}")
