"""Images through the daemon on libvirt's test driver: requests, refusals, zones' workload roots.

No image tools run here but the import helper itself (a real child process
of the daemon, speaking its frames): uploads it refuses before anything is
converted, and what the zone manager makes of an image's settings, as the
agent receives them from a fake agent on the zone's socket.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.procfs import each_process
from tests.service.conftest import fake_zone_images, service_config
from tests.service.test_control_socket import RawClient
from tests.service.test_hostile_agent import fake_agent
from tests.unit.test_images_upload import archive
from tests.waiting import wait_until_async
from zoned import protocol as p
from zoned.client import Client
from zoned.daemon import Daemon
from zoned.errors import HypervisorError, InvalidRequest, NotFound

pytestmark = pytest.mark.trio


@pytest.fixture
async def images_daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    """A daemon whose default image is a real (missing) image, with small limits."""
    config = service_config(short_tmp, default_image="default", max_image_mib=1)
    async with trio.open_nursery() as nursery:
        started: Daemon = await nursery.start(Daemon(config, zone_images=fake_zone_images).run)
        yield started
        nursery.cancel_scope.cancel()


def scratch_entries(daemon: Daemon) -> list[str]:
    return sorted(os.listdir(Path(daemon.config.image_store) / "scratch"))


async def test_an_empty_store_answers_every_request(images_daemon: Daemon) -> None:
    async with Client(images_daemon.config.socket_path, "test") as client:
        assert await client.list_images() == []
        with pytest.raises(NotFound, match="image nope: not in the image store"):
            await client.inspect_image("nope")
        with pytest.raises(NotFound):
            await client.remove_image("nope")
        pruned = await client.prune_images()
        assert (pruned.removed, pruned.untagged, pruned.freed_bytes) == ([], [], 0)
        sizes = await client.image_sizes()
        assert (sizes.images, sizes.rootfs_bytes, sizes.blob_bytes) == ([], 0, 0)


async def test_a_zone_needs_its_image(images_daemon: Daemon) -> None:
    async with Client(images_daemon.config.socket_path, "test") as client:
        with pytest.raises(NotFound, match="image nope: not in the image store"):
            await client.create_zone("a", image="nope")
        with pytest.raises(NotFound, match=r"the default image .* run zoned-host-setup"):
            await client.create_zone("b")
        assert await client.list_zones() == []
    assert not list(Path(images_daemon.config.state_dir, "zones").glob("*.json"))


async def test_writable_layers_are_bounded(images_daemon: Daemon) -> None:
    async with Client(images_daemon.config.socket_path, "test") as client:
        with pytest.raises(InvalidRequest, match="at most half of the zone's memory"):
            await client.create_zone("a", image="builtin", memory_mib=256, writable_layer_mib=129)
        with pytest.raises(InvalidRequest, match="max_scratch_mib"):
            await client.create_zone(
                "b", image="builtin", writable_layer="disk", writable_layer_mib=10**6
            )
        assert await client.list_zones() == []
    scratch = Path(images_daemon.config.scratch_dir)
    assert not scratch.exists() or not list(scratch.iterdir())


async def test_uploads_are_checked_and_nothing_of_them_is_kept(
    images_daemon: Daemon, tmp_path: Path
) -> None:
    blob = "blobs/sha256/" + "a" * 64
    cases = [
        (tmp_path / "junk.bin", None, "not a tar"),
        (
            archive(tmp_path / "neither.tar", [("hello.txt", b"hi")]),
            None,
            "neither a docker save archive",
        ),
        (
            archive(
                tmp_path / "link.tar",
                [("oci-layout", b"{}"), ("index.json", b"{}"), (blob, "/etc/shadow")],
            ),
            None,
            "is not a regular file",
        ),
        (
            archive(tmp_path / "escape.tar", [("oci-layout", b"{}"), ("../index.json", b"{}")]),
            None,
            "leaves the layout",
        ),
    ]
    (tmp_path / "junk.bin").write_bytes(os.urandom(4096))
    async with Client(images_daemon.config.socket_path, "test") as client:
        for path, reference, problem in cases:
            progress: list[p.ImageProgress] = []
            with pytest.raises(InvalidRequest, match=problem):
                await client.import_image(path, reference=reference, progress=progress.append)
            assert progress and progress[0].phase == "upload", path
            assert scratch_entries(images_daemon) == []
        # Refused before a byte is sent: too large, a reserved tag.
        big = tmp_path / "big.tar"
        big.write_bytes(bytes(2 * 1024 * 1024))
        with pytest.raises(InvalidRequest, match="at most 1 MiB"):
            await client.import_image(big)
        for tag in ("default", "zoned/default:bookworm", "builtin:latest"):
            with pytest.raises(InvalidRequest, match="reserved"):
                await client.import_image(cases[0][0], tags=[tag])
        assert await client.list_images() == []
    assert scratch_entries(images_daemon) == []


async def test_an_upload_that_stops_short_is_refused(images_daemon: Daemon) -> None:
    client = await RawClient.open(images_daemon)
    await client.send(p.ImportImage(id=5, size=1000))
    await client.send(p.ImageData(id=5, data=b"x" * 10, eof=True))
    replies = [await client.receive()]
    while not isinstance(replies[-1], p.ErrorReply):
        replies.append(await client.receive())
    assert replies[-1].code == "invalid_request"
    assert "ended after 10 of the 1000 bytes" in replies[-1].message
    assert scratch_entries(images_daemon) == []


async def test_pulls_are_checked_before_anything_is_fetched(images_daemon: Daemon) -> None:
    async with Client(images_daemon.config.socket_path, "test") as client:
        with pytest.raises(InvalidRequest, match="only for a registry on loopback"):
            await client.pull_image("registry.example/app:1", tls_verify=False)
        with pytest.raises(InvalidRequest, match="reserved"):
            await client.pull_image("registry.example/app:1", tags=["default"])
        with pytest.raises(InvalidRequest, match="reserved"):
            await client.pull_image("docker.io/zoned/default:bookworm")


async def test_a_disk_zone_has_a_scratch_disk_until_it_is_destroyed(daemon: Daemon) -> None:
    scratch = Path(daemon.config.scratch_dir)
    async with Client(daemon.config.socket_path, "test") as client:
        # No agent answers on the test driver: the zone fails to boot, and keeps
        # its record (and its disk) until it is destroyed.
        with pytest.raises(HypervisorError, match="failed to boot"):
            await client.create_zone("d", writable_layer="disk", writable_layer_mib=64)
        zone = await client.get_zone("d")
        assert (zone.state, zone.writable_layer, zone.writable_layer_mib) == ("failed", "disk", 64)
        (disk,) = scratch.iterdir()
        assert disk.stat().st_size == 64 << 20 and disk.stat().st_mode & 0o777 == 0o600
        assert oct(scratch.stat().st_mode & 0o777) == "0o711"
        await client.destroy_zone("d")
        assert list(scratch.iterdir()) == []


async def test_scratch_disks_of_gone_zones_are_removed_at_start(short_tmp: Path) -> None:
    config = service_config(short_tmp)
    scratch = Path(config.scratch_dir)
    scratch.mkdir(parents=True)
    (scratch / "gone-0000.ext4").write_bytes(b"left by a crash")
    async with trio.open_nursery() as nursery:
        await nursery.start(Daemon(config, zone_images=fake_zone_images).run)
        assert list(scratch.iterdir()) == []
        nursery.cancel_scope.cancel()


async def test_the_agent_gets_the_images_settings_under_the_requests(daemon: Daemon) -> None:
    """The built-in root's settings (its PATH, sh, passwd), resolved by the daemon."""
    seen: list[p.AgentExecStart] = []

    async def answer(stream: trio.SocketStream, start: p.AgentExecStart) -> None:
        seen.append(start)
        for message in (
            p.AgentExecStarted(exec_id=start.exec_id, pid=2),
            p.AgentExecExit(exec_id=start.exec_id, exit_code=0),
        ):
            await stream.send_all(p.encode_frame(message, p.AGENT_MAX_FRAME))

    runtime = Path(daemon.config.runtime_dir) / "zones"
    async with trio.open_nursery() as agents:
        await agents.start(fake_agent, runtime / "s" / "agent.sock", answer)
        async with Client(daemon.config.socket_path, "test") as client:
            zone = await client.create_zone("s")
            assert (zone.image, zone.image_id, zone.writable_layer) == (
                "builtin",
                "builtin",
                "tmpfs",
            )
            assert zone.writable_layer_mib == zone.memory_mib // 2
            result = await client.exec("s", [], user="nobody", env={"A": "1"}, workdir="/tmp")
            assert result.exit.exit_code == 0
        agents.cancel_scope.cancel()
    (start,) = seen
    assert start.argv == ["/bin/sh"]
    assert (start.uid, start.gid, start.groups, start.cwd) == (65534, 65534, [], "/tmp")
    assert start.env["A"] == "1" and start.env["HOME"] == "/nonexistent"
    assert start.env["PATH"].startswith("/usr/local/sbin:")


def helpers_of(store: str) -> list[int]:
    """Pids of image helpers (and the tools they run) working on ``store``."""
    found = []
    for pid, raw in each_process("cmdline"):
        cmdline = raw.split(b"\0")
        ours = any(store.encode() in arg for arg in cmdline)
        helper = b"zoned.images.helper" in cmdline
        skopeo = os.path.basename(cmdline[0]) in (b"skopeo", b"setpriv")
        if ours and (helper or skopeo):
            found.append(pid)
    return found


async def test_a_pull_is_cancelled_when_its_client_goes_away(images_daemon: Daemon) -> None:
    """A registry that accepts and never answers: the client leaves, the helper and
    skopeo go, nothing is kept, and the daemon serves on."""
    store = images_daemon.config.image_store
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    connected = trio.Event()
    held: list[trio.socket.SocketType] = []

    async def registry_that_never_answers() -> None:
        while True:
            conn, _ = await listener.accept()
            held.append(conn)
            connected.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(registry_that_never_answers)
        async with Client(images_daemon.config.socket_path, "test") as client:
            progress: list[p.ImageProgress] = []

            async def pull() -> None:
                await client.pull_image(
                    f"127.0.0.1:{port}/zt/never:1", tls_verify=False, progress=progress.append
                )

            nursery.start_soon(pull)
            with trio.fail_after(60):
                await connected.wait()  # skopeo is fetching
            running = helpers_of(store)
            assert len(running) >= 2, f"the helper and skopeo should run: {running}"
            # Leaving the client closes its connection (the pull task then fails).
            nursery.cancel_scope.cancel()
    await wait_until_async(lambda: not helpers_of(store), "the helper and skopeo exit")
    assert scratch_entries(images_daemon) == []
    for conn in held:
        conn.close()
    listener.close()
    async with Client(images_daemon.config.socket_path, "test") as client:
        assert await client.list_images() == []
