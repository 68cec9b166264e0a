"""Zones isolated from each other on the host (issue 11, findings 2 and 5), on real zones.

As one zone's QEMU uid (a process with that uid and gid and no groups, what a
QEMU escape would be), another zone's memory, its runtime directory and agent
socket, and the shared kernel, boot image and workload root are out of
reach. Each QEMU sits under its memory and task limits. A changed shared
image is refused at the next zone start. A second user of the zoned group
cannot see or touch the first one's zone.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import destroy_domains, domain_name, private_zoned, qemu_pid
from tests.peers import SYSTEM_PYTHON, Attempt, probe_as, relay_as, unused_uids
from tests.tmpdirs import short_tmp_dir
from tests.zone_events import watching
from zoned import cgroups
from zoned import protocol as p
from zoned.client import Client
from zoned.client.sync import SyncClient
from zoned.config import Config
from zoned.errors import InternalError, NotFound
from zoned.images.bootimage import build_boot_image
from zoned.images.integrity import recorded_sha256_path
from zoned.images.workloadroot import build_workload_root
from zoned.kernel.store import DEFAULT_STORE, find_kernel
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

PREFIX = "iso"
CGROUP_ROOT = Path(Config().cgroup_root)
#: What a process gets trying what it may not (EACCES for files, EPERM for signals).
DENIED = {"EACCES", "EPERM"}


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    with private_zoned(PREFIX) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def two_zones(zoned: LocalDaemon) -> Iterator[tuple[p.ZoneInfo, p.ZoneInfo]]:
    client = SyncClient(zoned.socket)
    zones = (client.create_zone(f"{PREFIX}a"), client.create_zone(f"{PREFIX}b"))
    try:
        yield zones
    finally:
        for zone in zones:
            with contextlib.suppress(NotFound):
                client.destroy_zone(zone.name)


def pid_of(zoned: LocalDaemon, zone: p.ZoneInfo) -> int:
    pid = qemu_pid(zoned.domain_name(zone.name))
    assert pid is not None, f"no QEMU for {zone.name}"
    return pid


def status_ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """Uid:, Gid: and Groups: of a process."""
    fields: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(n) for n in value.split()]
    return fields["Uid"], fields["Gid"], fields["Groups"]


def test_each_qemu_runs_as_its_zones_own_uid_and_gid_with_no_other_group(
    zoned: LocalDaemon, two_zones: tuple[p.ZoneInfo, p.ZoneInfo]
) -> None:
    a, b = two_zones
    assert a.qemu_uid is not None and b.qemu_uid is not None and a.qemu_uid != b.qemu_uid
    for zone in (a, b):
        uids, gids, groups = status_ids(pid_of(zoned, zone))
        assert uids == [zone.qemu_uid] * 4 and gids == [zone.qemu_uid] * 4, zone.name
        # No group beyond its own (libvirt lists the primary one): not kvm, not libvirt-qemu's.
        assert set(groups) <= {zone.qemu_uid}, zone.name
        assert zone.seclabel == f"dac static +{zone.qemu_uid}:+{zone.qemu_uid}, relabel no"
        assert zone.owner_uid == 0  # created by root, through the daemon's own socket


def test_one_zones_qemu_cannot_reach_another_zones_memory_socket_or_the_shared_images(
    zoned: LocalDaemon, two_zones: tuple[p.ZoneInfo, p.ZoneInfo]
) -> None:
    a, b = two_zones
    assert a.qemu_uid is not None
    a_pid, b_pid = pid_of(zoned, a), pid_of(zoned, b)
    b_dir = Path(zoned.root, "run", "zones", b.name)
    kernel = find_kernel(DEFAULT_STORE, a.profile).image
    shared = [kernel, *(Path(f) for f in _zone_images(zoned))]
    attempts = {
        "own memory": Attempt("open", f"/proc/{a_pid}/mem"),
        "other's memory": Attempt("open", f"/proc/{b_pid}/mem"),
        "other's environ": Attempt("open", f"/proc/{b_pid}/environ"),
        "other's command line": Attempt("read", f"/proc/{b_pid}/cmdline"),
        "signal other": Attempt("signal", str(b_pid)),
        "list other's runtime dir": Attempt("list", str(b_dir)),
        "plant in other's runtime dir": Attempt("create", str(b_dir)),
        "other's agent socket": Attempt("connect", str(b_dir / "agent.sock")),
        "own runtime dir": Attempt("list", str(Path(zoned.root, "run", "zones", a.name))),
        **{f"write {path}": Attempt("write", str(path)) for path in shared},
        **{f"read {path}": Attempt("read", str(path)) for path in shared},
    }
    results = probe_as(a.qemu_uid, a.qemu_uid, list(attempts.values()))
    outcomes = dict(zip(attempts, results, strict=True))
    # The check can fail: the same uid may open a QEMU's memory (ptrace rules),
    # so two zones sharing one uid (as before) would read each other's.
    assert outcomes.pop("own memory") == "ok", outcomes
    # ptrace rules, not hidepid, keep the memory and environment private; the
    # command line stays readable to all, as every process's does.
    assert outcomes.pop("other's command line") == "ok", outcomes
    for path in shared:
        assert outcomes.pop(f"read {path}") == "ok", outcomes  # QEMU boots them
    # Not even its own runtime directory: libvirtd made the socket and passed it.
    assert outcomes.pop("own runtime dir") in DENIED, outcomes
    refused = {what: outcome for what, outcome in outcomes.items() if outcome not in DENIED}
    assert refused == {}, f"reachable as {a.name}'s QEMU uid: {refused}"


def _zone_images(zoned: LocalDaemon) -> list[str]:
    host = SyncClient(zoned.socket).host_info()
    assert host.isolation is not None
    return [image.path for image in host.isolation.shared_images if image.kind != "kernel strict"]


def test_shared_images_stay_roots_and_read_only_while_zones_run(
    zoned: LocalDaemon, two_zones: tuple[p.ZoneInfo, p.ZoneInfo]
) -> None:
    host = SyncClient(zoned.socket).host_info()
    assert host.isolation is not None
    kinds = {image.kind for image in host.isolation.shared_images}
    assert {"kernel strict", "boot image", "workload root"} <= kinds
    for image in host.isolation.shared_images:
        info = Path(image.path).stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644), image
    for zone in two_zones:
        zone_dir = Path(zoned.root, "run", "zones", zone.name)
        info = zone_dir.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o700)
        assert (zone_dir / "agent.sock").stat().st_uid == 0


def test_each_qemu_is_under_its_memory_and_task_limits(
    zoned: LocalDaemon, two_zones: tuple[p.ZoneInfo, p.ZoneInfo]
) -> None:
    config = Config()
    for zone in two_zones:
        pid = pid_of(zoned, zone)
        groups = dict(
            (line.split(":")[1], line.split(":")[2])
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        )
        expected_mib = zone.memory_mib + config.qemu_memory_overhead_mib
        assert zone.memory_hard_limit_mib == expected_mib
        memory = CGROUP_ROOT / "memory" / groups["memory"].lstrip("/")
        assert int((memory / "memory.limit_in_bytes").read_text()) == expected_mib * 1024 * 1024
        assert groups["pids"] == f"/zoned/{zoned.domain_name(zone.name)}"
        tasks = CGROUP_ROOT / "pids" / groups["pids"].lstrip("/")
        assert (tasks / "pids.max").read_text().strip() == str(config.qemu_pids_limit)
        assert zone.pids_limit == config.qemu_pids_limit
        assert 1 <= cgroups.task_count(tasks) < config.qemu_pids_limit


THREADS = """
import threading, time
started = 0
try:
    for _ in range(50):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        started += 1
except RuntimeError:
    pass
print(started)
"""


def test_the_task_limit_is_the_kernels_to_enforce() -> None:
    """The same call that limits a QEMU holds a process to its limit: threads count."""
    child = subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", f"import sys; sys.stdin.read(1)\n{THREADS}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    applied = cgroups.limit_tasks(CGROUP_ROOT, domain_name(f"{PREFIX}-tasks"), child.pid, 5)
    try:
        assert applied is not None and applied.ours
        child.stdin.write("x")
        child.stdin.close()
        assert int(child.stdout.read()) == 4  # the main thread and four more
    finally:
        child.wait()
        if applied is not None:
            cgroups.remove_cgroup(applied.cgroup)


def test_destroy_leaves_no_runtime_dir_no_cgroup_and_frees_the_uid(zoned: LocalDaemon) -> None:
    client = SyncClient(zoned.socket)
    zone = client.create_zone(f"{PREFIX}gone")
    zone_dir = Path(zoned.root, "run", "zones", zone.name)
    tasks = CGROUP_ROOT / "pids" / "zoned" / zoned.domain_name(zone.name)
    assert zone_dir.is_dir() and tasks.is_dir()
    in_use = _uids_in_use(client)
    client.destroy_zone(zone.name)
    assert not zone_dir.exists() and not tasks.exists()
    assert _uids_in_use(client) == in_use - 1


def _uids_in_use(client: SyncClient) -> int:
    isolation = client.host_info().isolation
    assert isolation is not None
    return isolation.qemu_uids_in_use


async def test_a_restarted_daemon_keeps_each_zones_owner_uid_and_limits(
    zoned: LocalDaemon,
) -> None:
    async with Client(zoned.socket, client_name="test") as client:
        zone = await client.create_zone(f"{PREFIX}kept")
    try:
        await trio.to_thread.run_sync(zoned.stop)
        # Without its record the zone is rebuilt from its domain's metadata.
        zoned.record_path(zone.name).unlink()
        await trio.to_thread.run_sync(zoned.start)
        async with Client(zoned.socket, client_name="test") as client, watching(client) as events:
            # Re-adopted, it waits for its agent's hello again (booting -> ready).
            if (await client.get_zone(zone.name)).state != "ready":
                with trio.fail_after(120):
                    await events.wait_for_state(zone.name, "ready")
            again = await client.get_zone(zone.name)
            assert again.state == "ready"
            for field in ("owner_uid", "qemu_uid", "memory_hard_limit_mib", "pids_limit"):
                assert getattr(again, field) == getattr(zone, field), field
            # Its uid is still held: the next zone gets another one.
            other = await client.create_zone(f"{PREFIX}next")
            assert other.qemu_uid != zone.qemu_uid
            await client.destroy_zone(other.name)
    finally:
        async with Client(zoned.socket, client_name="test") as client:
            await client.destroy_zone(zone.name)


def test_a_second_user_cannot_see_or_touch_the_first_users_zone(zoned: LocalDaemon) -> None:
    zoned_gid = grp.getgrnam(Config().socket_group).gr_gid
    alice, bob = unused_uids(2)
    with (
        relay_as(alice, alice, [zoned_gid], zoned.socket) as as_alice,
        relay_as(bob, bob, [zoned_gid], zoned.socket) as as_bob,
    ):
        hers, his, root = SyncClient(as_alice), SyncClient(as_bob), SyncClient(zoned.socket)
        zone = hers.create_zone(f"{PREFIX}alice")
        try:
            assert zone.owner_uid == alice
            assert hers.exec(zone.name, ["echo", "mine"]).stdout == b"mine\n"
            assert zone.name not in {z.name for z in his.list_zones()}
            for attempt in (
                lambda: his.get_zone(zone.name),
                lambda: his.exec(zone.name, ["echo", "yours"]),
                lambda: his.zone_metrics(zone.name),
                lambda: his.destroy_zone(zone.name),
            ):
                with pytest.raises(NotFound):
                    attempt()
            assert hers.get_zone(zone.name).state == "ready"
            # Root sees it, and whose it is.
            assert {z.name: z.owner_uid for z in root.list_zones()}[zone.name] == alice
        finally:
            root.destroy_zone(zone.name)


@pytest.fixture
def private_images() -> Iterator[tuple[Path, Path]]:
    """A kernel store and an image cache of this test's own (copies of the host's)."""
    with short_tmp_dir("zt-images-") as root:
        root.chmod(0o755)
        shared_cache = Path(Config().image_cache)
        store, cache = root / "kernels", root / "images"
        store.mkdir()
        cache.mkdir()
        kernel = find_kernel(DEFAULT_STORE, "strict")
        shutil.copytree(kernel.directory, store / kernel.directory.name)
        (store / "strict").symlink_to(kernel.directory.name)
        for image in (build_boot_image(shared_cache), build_workload_root(shared_cache)):
            for path in (image, recorded_sha256_path(image), image.with_suffix(".json")):
                if path.exists():
                    shutil.copy2(path, cache / path.name)
        yield store, cache


def test_a_changed_shared_image_is_refused_at_the_next_start(
    private_images: tuple[Path, Path],
) -> None:
    store, cache = private_images
    daemon = LocalDaemon(
        extra_config=f'image_cache = "{cache}"\naccelerator = "tcg"',
        kernel_store=store,
    )
    prefix = domain_name(f"{PREFIX}t")
    destroy_domains(prefix)
    daemon.start()
    try:
        client = SyncClient(daemon.socket)
        first = client.create_zone(f"{PREFIX}t1")  # warms the check's cache
        client.destroy_zone(first.name)
        (boot_image,) = cache.glob("agent-*.cpio")
        before = boot_image.stat()
        original = boot_image.read_bytes()
        with boot_image.open("r+b") as image:
            image.seek(len(original) // 2)
            image.write(bytes([original[len(original) // 2] ^ 0xFF]))
        os.utime(boot_image, ns=(before.st_atime_ns, before.st_mtime_ns))
        with pytest.raises(InternalError) as refused:
            client.create_zone(f"{PREFIX}t2")
        assert str(boot_image) in refused.value.message
        assert "has changed" in refused.value.message
        assert f"{PREFIX}t2" not in {z.name for z in client.list_zones()}
        boot_image.write_bytes(original)  # restored: zones start again
        client.destroy_zone(client.create_zone(f"{PREFIX}t3").name)
    finally:
        status = daemon.stop()
        log = daemon.log_text()
        destroy_domains(prefix)
        daemon.cleanup()
        assert status == 0, log
