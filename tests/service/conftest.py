"""Service tests: the real daemon in-process, on a real unix socket, with
libvirt's in-process ``test:///default`` driver standing in for QEMU.

These exercise the control socket, the protocol and the zone manager's
bookkeeping quickly; the integration tests boot real zones. Nothing here
needs a built kernel, busybox or mkfs.erofs: the daemon gets a kernel store
of tiny files in the test's directory and zone images from a builder that
writes tiny files (the test driver never reads them).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tests.tmpdirs import short_tmp_dir
from zoned.config import Config
from zoned.daemon import Daemon, ZoneImages
from zoned.images.integrity import write_recorded_sha256
from zoned.kernel.store import KernelManifest
from zoned.localdaemon import private_net_config


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: unix socket paths are limited to 108 bytes."""
    with short_tmp_dir("zt-") as path:
        yield path


FAKE_PROFILES = ("strict", "containers")
KERNEL_BYTES = b"not a kernel"


def fake_kernel_store(store: Path) -> Path:
    """A kernel store laid out as ``zoned-kernel build`` lays it out, of tiny files."""
    for profile in FAKE_PROFILES:
        build = store / f"{profile}-0000000000000000"
        build.mkdir(parents=True)
        (build / "bzImage").write_bytes(KERNEL_BYTES)
        (build / "config").write_text("# CONFIG_MODULES is not set\n")
        manifest = KernelManifest(
            profile=profile,
            kernel_version="6.12.0",
            kernel_release="6.12.0-fake",
            debian_package="linux-source-6.12",
            debian_version="6.12.0-1",
            fragments=[],
            fragment_hash="0" * 16,
            build_hash="0" * 16,
            compiler="none",
            build_time="2024-01-01T00:00:00Z",
            build_seconds=0.0,
            image="bzImage",
            image_sha256=hashlib.sha256(KERNEL_BYTES).hexdigest(),
            image_size=len(KERNEL_BYTES),
            cmdline=[],
        )
        (build / "manifest.json").write_bytes(msgspec.json.encode(manifest))
        (store / profile).symlink_to(build.name)
    return store


def fake_zone_images(config: Config) -> ZoneImages:
    """Stands in for the image builders: two tiny files in the image cache."""
    cache = Path(config.image_cache)
    cache.mkdir(parents=True, exist_ok=True)
    images = ZoneImages(
        boot_image=cache / "agent-fake.cpio", workload_root=cache / "workload-fake.erofs"
    )
    for path, data in ((images.boot_image, b"not an initramfs"), (images.workload_root, b"no")):
        assert path is not None
        path.write_bytes(data)
        # As the real builders do: the hash each zone start checks.
        write_recorded_sha256(path, hashlib.sha256(data).hexdigest())
    return images


def service_config(root: Path, **overrides: object) -> Config:
    values: dict[str, object] = {
        "socket_path": str(root / "zoned.sock"),
        "state_dir": str(root / "state"),
        "runtime_dir": str(root / "run"),
        "log_dir": str(root / "log"),
        "kernel_store": str(fake_kernel_store(root / "kernels")),
        "image_cache": str(root / "images"),
        "image_store": str(root / "oci"),
        "scratch_dir": str(root / "scratch"),
        # The test driver boots nothing: the built-in root's tiny stand-in will do.
        "default_image": "builtin",
        "libvirt_uri": "test:///default",
        "accelerator": "tcg",
        "boot_timeout_s": 1.0,
        "reserved_memory_mib": 0,
        # Zone networks of their own, never the host's production table or links.
        **private_net_config(root),
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        started: Daemon = await nursery.start(
            Daemon(service_config(short_tmp), zone_images=fake_zone_images).run
        )
        yield started
        nursery.cancel_scope.cancel()


@pytest.fixture
async def observed(short_tmp: Path) -> AsyncIterator[Daemon]:
    """A daemon with its metrics endpoint, small audit files and log retention,
    and an evidence directory of its own (quarantine)."""
    config = service_config(
        short_tmp,
        metrics_enabled=True,
        metrics_listen="127.0.0.1:0",
        metrics_stats_max_age_s=0.0,
        log_retention_max_bytes=3000,
        log_retention_interval_s=3600.0,
        evidence_dir=str(short_tmp / "evidence"),
        audit_max_bytes=4096,
        audit_max_files=2,
    )
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(Daemon(config, zone_images=fake_zone_images).run)
        yield daemon
        nursery.cancel_scope.cancel()


@pytest.fixture
def threaded_daemon(short_tmp: Path) -> Iterator[Daemon]:
    """The daemon on its own trio loop in a thread, for synchronous tests
    (hypothesis drives examples synchronously, one daemon for all of them)."""
    ready = threading.Event()
    holder: dict[str, Any] = {}
    daemon = Daemon(service_config(short_tmp), zone_images=fake_zone_images)

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
