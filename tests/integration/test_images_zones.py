"""Images as zones' workload roots, through a private zoned on real libvirt/QEMU.

One image made here by umoci (three layers: busybox and accounts, an app, a
whiteout; Entrypoint, Cmd, Env, WorkingDir and a User by name), imported
through the daemon, and the host's default Debian image (seeded into the
daemon's store by hard links). Two zones of the app image live for the whole
module, one writing to a tmpfs, one to a scratch disk; the checks share them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import open_libvirt, private_zoned, qemu_pid
from tests.integration.imagetools import Layout, registry, require_tools, skopeo_copy, write_tar
from tests.zonectl_run import zonectl
from zoned import protocol as p
from zoned.client import SyncClient
from zoned.errors import Conflict, InvalidRequest
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

APP = "zt/app:1"
TMPFS_ZONE = "im-tmpfs"
DISK_ZONE = "im-disk"
ZONE_MEMORY_MIB = 256
SCRATCH_MIB = 512
BUSYBOX = Path("/bin/busybox")
START_SH = """\
echo "greeting=$GREETING user=$(id -un) groups=$(id -G) cwd=$(pwd) args=$*"
"""


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    require_tools("umoci", "skopeo", "docker-registry", "mkfs.erofs")
    if shutil.which("mkfs.ext4") is None:
        pytest.fail("mkfs.ext4 is missing: apt-get install e2fsprogs")
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} is missing: apt-get install busybox-static")


def build_app(work: Path, tag: str = "1", greeting: str = "hello-from-image") -> Layout:
    """The app image: busybox and accounts, then the app, then a whiteout."""
    layout = Layout(work / "oci", tag).create()
    with layout.edit() as root:
        (root / "bin").mkdir()
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        applets = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc").mkdir()
        (root / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
        )
        (root / "etc/group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
        (root / "etc/motd").write_text("from layer one\n")
        for directory in ("tmp", "home/app", "root"):
            (root / directory).mkdir(parents=True)
        os.chmod(root / "tmp", 0o1777)
        os.chown(root / "home/app", 1000, 1000)
    with layout.edit() as root:
        (root / "app").mkdir()
        (root / "app/start.sh").write_text(START_SH)
        (root / "app/removed-later").write_text("whited out by layer three\n")
        os.chown(root / "app", 1000, 1000)
    with layout.edit() as root:
        (root / "app/removed-later").unlink()
    layout.config(
        "--config.entrypoint=/bin/sh",
        "--config.entrypoint=/app/start.sh",
        "--config.cmd=default-arg",
        f"--config.env=GREETING={greeting}",
        "--config.env=PATH=/bin",
        "--config.workingdir=/app",
        "--config.user=app",
    )
    layout.gc()
    return layout


@pytest.fixture(scope="module")
def app_layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return build_app(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def zoned(app_layout: Layout) -> Iterator[LocalDaemon]:
    """The daemon, the app image imported through it, and the two zones of it."""
    with private_zoned("im-") as daemon:
        client = SyncClient(daemon.socket, "it")
        progress: list[p.ImageProgress] = []
        image = client.import_image(app_layout.path, tags=[APP], progress=progress.append)
        phases = [event.phase for event in progress]
        assert phases[0] == "upload" and "apply" in phases, phases
        assert (image.entrypoint, image.cmd) == (["/bin/sh", "/app/start.sh"], ["default-arg"])
        assert image.layers == 3 and image.user == "app"

        # One after the other: two TCG boots at once on a busy host risk the boot timeout.
        client.create_zone(TMPFS_ZONE, image=APP, memory_mib=ZONE_MEMORY_MIB)
        client.create_zone(
            DISK_ZONE,
            image=APP,
            memory_mib=ZONE_MEMORY_MIB,
            writable_layer="disk",
            writable_layer_mib=SCRATCH_MIB,
        )
        yield daemon


def exec_in(daemon: LocalDaemon, zone: str, argv: list[str], **options: object) -> str:
    result = SyncClient(daemon.socket, "it").exec(zone, argv, **options)  # type: ignore[arg-type]
    assert result.exit.exit_code == 0, (argv, result)
    return result.stdout.decode()


def app_image(daemon: LocalDaemon) -> p.ImageInfo:
    return SyncClient(daemon.socket, "it").inspect_image(APP)


# ---------------------------------------------------------------- the default image


def test_zonectl_run_of_the_default_image_says_bookworm(zoned: LocalDaemon) -> None:
    """The README's claim: a fresh zone of the default image is Debian bookworm."""
    done = zonectl(zoned, "run", "--", "cat", "/etc/os-release")
    assert done.returncode == 0, done.stderr
    assert b"VERSION_CODENAME=bookworm" in done.stdout


def test_the_default_images_own_command_runs_python(zoned: LocalDaemon) -> None:
    """No command: the image's Cmd (bash), reading its script from stdin."""
    script = b'python3 -c "import sys; print(sys.version_info[:2], 6 * 7)"\necho "$HOME $PWD"\n'
    done = zonectl(zoned, "run", "-i", input=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [b"(3, 11) 42", b"/root /"]


# ---------------------------------------------------------------- the app image


def test_zonectl_run_image_runs_its_default_command(zoned: LocalDaemon) -> None:
    done = zonectl(zoned, "run", APP)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        b"greeting=hello-from-image user=app groups=1000 50 cwd=/app args=default-arg\n"
    )


def test_exec_takes_the_images_settings_unless_overridden(zoned: LocalDaemon) -> None:
    # No command: Entrypoint + Cmd, with the image's Env, WorkingDir, User (by name).
    assert exec_in(zoned, TMPFS_ZONE, []) == (
        "greeting=hello-from-image user=app groups=1000 50 cwd=/app args=default-arg\n"
    )
    # A command is the whole command line (docker exec); the settings still apply.
    assert exec_in(zoned, TMPFS_ZONE, ["sh", "-c", "id -u; pwd; echo $GREETING $HOME"]) == (
        "1000\n/app\nhello-from-image /home/app\n"
    )
    overridden = exec_in(
        zoned,
        TMPFS_ZONE,
        ["sh", "-c", "id -un; id -gn; pwd; echo $GREETING"],
        user="root:staff",
        workdir="/tmp",
        env={"GREETING": "overridden"},
    )
    assert overridden == "root\nstaff\n/tmp\noverridden\n"
    # --entrypoint replaces the Entrypoint and drops the Cmd; argv follows it.
    assert exec_in(zoned, TMPFS_ZONE, ["a", "b"], entrypoint=["/bin/echo"]) == "a b\n"
    # The older numeric fields still work.
    assert exec_in(zoned, TMPFS_ZONE, ["id", "-u"], uid=0, gid=0) == "1000\n"
    assert exec_in(zoned, TMPFS_ZONE, ["id", "-u"], uid=7, gid=7) == "7\n"


def test_a_user_not_in_the_image_is_refused(zoned: LocalDaemon) -> None:
    with pytest.raises(InvalidRequest, match=r"nobody-here.*not in the image's /etc/passwd"):
        SyncClient(zoned.socket, "it").exec(TMPFS_ZONE, ["true"], user="nobody-here")


def test_the_lower_layer_is_read_only_and_each_zone_writes_alone(zoned: LocalDaemon) -> None:
    # The workload sees its root, an overlay (nodev, not nosuid: images have setuid files).
    mounts = exec_in(zoned, TMPFS_ZONE, ["cat", "/proc/mounts"], user="0")
    root = next(line.split() for line in mounts.splitlines() if line.split()[1] == "/")
    assert root[2] == "overlay" and "nodev" in root[3].split(","), mounts
    assert "nosuid" not in root[3].split(","), mounts
    # The domain gives QEMU the image read-only.
    conn = open_libvirt()
    try:
        xml = conn.lookupByName(zoned.domain_name(TMPFS_ZONE)).XMLDesc(0)
    finally:
        conn.close()
    disks = {d.findtext("serial"): d for d in ET.fromstring(xml).iter("disk")}
    assert disks["zoned-image"].find("readonly") is not None, xml
    # Nor can root in the zone reach the disk: the sandbox's /dev has no block
    # device, and a node it would make is refused (no CAP_MKNOD).
    script = (
        "for d in /sys/block/vd*; do n=${d##*/}; echo disk $n;"
        " test -b /dev/$n && echo block $n;"
        ' mknod /tmp/$n b $(tr : " " < $d/dev) 2>/dev/null && echo made $n; done; true'
    )
    reach = exec_in(zoned, TMPFS_ZONE, ["sh", "-c", script], user="0")
    assert "disk vda" in reach and "block" not in reach and "made" not in reach, reach
    # Writes land in each zone's own layer.
    exec_in(zoned, TMPFS_ZONE, ["sh", "-c", "echo mine > /app/new && rm /etc/motd"], user="0")
    assert exec_in(zoned, TMPFS_ZONE, ["sh", "-c", "cat /app/new; ls /etc"], user="0") == (
        "mine\ngroup\npasswd\n"
    )
    other = exec_in(zoned, DISK_ZONE, ["sh", "-c", "ls /app; cat /etc/motd"], user="0")
    assert other == "start.sh\nfrom layer one\n"
    # The layer three whiteout holds in both; the image's file is as imported.
    image = app_image(zoned)
    rootfs = zoned.image_store / "roots" / f"{image.id.removeprefix('sha256:')}.erofs"
    st = rootfs.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644), "libvirt re-owned the image"
    assert "sha256:" + hashlib.sha256(rootfs.read_bytes()).hexdigest() == _recorded_sha256(
        zoned, image.id
    )


def _recorded_sha256(daemon: LocalDaemon, image_id: str) -> str:
    from zoned.images.store import ImageStore

    return ImageStore(daemon.image_store).inspect(image_id).record.rootfs.sha256


def test_the_converted_image_exists_once_however_many_zones_use_it(zoned: LocalDaemon) -> None:
    image = app_image(zoned)
    assert image.zones == 2
    sources = set()
    conn = open_libvirt()
    try:
        for zone in (TMPFS_ZONE, DISK_ZONE):
            xml = conn.lookupByName(zoned.domain_name(zone)).XMLDesc(0)
            for disk in ET.fromstring(xml).iter("disk"):
                if disk.findtext("serial") == "zoned-image":
                    source = disk.find("source")
                    assert source is not None
                    sources.add(source.get("file"))
    finally:
        conn.close()
    expected = zoned.image_store / "roots" / f"{image.id.removeprefix('sha256:')}.erofs"
    assert sources == {str(expected)}
    roots = sorted(path.name for path in (zoned.image_store / "roots").iterdir())
    assert roots.count(expected.name) == 1
    for zone in (TMPFS_ZONE, DISK_ZONE):
        shown = SyncClient(zoned.socket, "it").get_zone(zone)
        assert (shown.image, shown.image_id) == (APP, image.id)


def test_a_full_tmpfs_layer_is_enospc_and_the_zone_still_answers(zoned: LocalDaemon) -> None:
    zone = SyncClient(zoned.socket, "it").get_zone(TMPFS_ZONE)
    assert (zone.writable_layer, zone.writable_layer_mib) == ("tmpfs", ZONE_MEMORY_MIB // 2)
    fill = SyncClient(zoned.socket, "it").exec(
        TMPFS_ZONE,
        ["dd", "if=/dev/zero", "of=/tmp/fill", "bs=1M", f"count={ZONE_MEMORY_MIB}"],
        user="0",
    )
    assert fill.exit.exit_code != 0, fill
    assert b"No space left on device" in fill.stderr, fill
    assert exec_in(zoned, TMPFS_ZONE, ["echo", "still here"]) == "still here\n"
    exec_in(zoned, TMPFS_ZONE, ["rm", "/tmp/fill"], user="0")
    exec_in(zoned, TMPFS_ZONE, ["dd", "if=/dev/zero", "of=/tmp/ok", "bs=1M", "count=8"], user="0")


def _capacity_mib(daemon: LocalDaemon, zone: str) -> int:
    """The size of the zone's root file system in MiB, as statfs reports it (df)."""
    line = exec_in(daemon, zone, ["df", "-k", "/"]).splitlines()[-1]
    return int(line.split()[1]) // 1024


def test_the_scratch_disk_takes_more_than_the_zones_memory(zoned: LocalDaemon) -> None:
    zone = SyncClient(zoned.socket, "it").get_zone(DISK_ZONE)
    assert (zone.writable_layer, zone.writable_layer_mib) == ("disk", SCRATCH_MIB)
    # The overlay reports its upper layer's capacity: the disk's, not the memory's.
    assert _capacity_mib(zoned, DISK_ZONE) > SCRATCH_MIB * 0.9
    assert _capacity_mib(zoned, TMPFS_ZONE) == ZONE_MEMORY_MIB // 2
    size = ZONE_MEMORY_MIB + 64
    exec_in(zoned, DISK_ZONE, ["dd", "if=/dev/zero", "of=/app/big", "bs=1M", f"count={size}"])
    assert exec_in(zoned, DISK_ZONE, ["stat", "-c", "%s", "/app/big"]) == f"{size << 20}\n"
    (disk,) = zoned.scratch_dir.iterdir()
    st = disk.stat()
    pid = qemu_pid(zoned.domain_name(DISK_ZONE))
    assert pid is not None
    qemu_uid = os.stat(f"/proc/{pid}").st_uid
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (qemu_uid, 0o600)
    # That QEMU's alone: the zone's own uid, no other zone's.
    other = SyncClient(zoned.socket, "it").get_zone(TMPFS_ZONE)
    assert qemu_uid == zone.qemu_uid and qemu_uid not in (0, other.qemu_uid)
    assert st.st_size == SCRATCH_MIB << 20 and st.st_blocks * 512 < st.st_size  # sparse


def test_rm_is_refused_while_in_use_and_prune_keeps_what_zones_use(
    zoned: LocalDaemon, tmp_path: Path
) -> None:
    client = SyncClient(zoned.socket, "it")
    with pytest.raises(Conflict, match="a zone uses it"):
        client.remove_image(app_image(zoned).id)
    with pytest.raises(Conflict, match="default image"):
        client.remove_image("default")
    spare = client.import_image(
        build_app(tmp_path, tag="spare", greeting="spare").path, tags=["zt/spare:1"]
    )
    pruned = client.prune_images()
    assert pruned.removed == [spare.id] and pruned.untagged == ["zt/spare:1"]
    left = {image.id for image in client.list_images()}
    assert app_image(zoned).id in left and len(left) == 2  # the app and the default


def test_pull_from_a_loopback_registry(
    zoned: LocalDaemon, app_layout: Layout, tmp_path: Path
) -> None:
    with registry(tmp_path / "registry") as running:
        reference = f"{running.address}/zt/app:v1"
        skopeo_copy(f"oci:{app_layout.image}", f"docker://{reference}", "--dest-tls-verify=false")
        progress: list[p.ImageProgress] = []
        client = SyncClient(zoned.socket, "it")
        with pytest.raises(InvalidRequest, match="loopback"):
            client.pull_image("registry.example/zt/app:v1", tls_verify=False)
        pulled = client.pull_image(reference, tls_verify=False, progress=progress.append)
    # The same image as the imported one (one config): converted once, tagged twice.
    assert pulled.id == app_image(zoned).id
    assert reference in pulled.tags and APP in pulled.tags
    assert pulled.repo_digests and pulled.repo_digests[0].startswith(f"{running.address}/zt/app@")
    assert "fetch" in {event.phase for event in progress}


def test_a_hostile_image_is_refused_and_changes_nothing(zoned: LocalDaemon, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "oci", "evil").create()
    escape = tarfile.TarInfo("../../escaped-by-zt")
    layout.add_raw_layer(write_tar(tmp_path / "evil.tar", [(escape, b"out\n")]))
    client = SyncClient(zoned.socket, "it")
    before = (client.list_images(), sorted(os.listdir(zoned.image_store / "roots")))
    with pytest.raises(InvalidRequest, match=r"\.\."):
        client.import_image(layout.path, tags=["zt/evil:1"])
    assert (client.list_images(), sorted(os.listdir(zoned.image_store / "roots"))) == before
    assert not os.listdir(zoned.image_store / "scratch")
    for where in (zoned.image_store, zoned.image_store.parent, Path("/")):
        assert not (where / "escaped-by-zt").exists()


def test_destroying_the_zones_frees_their_disk_and_their_image(zoned: LocalDaemon) -> None:
    client = SyncClient(zoned.socket, "it")
    client.destroy_zone(DISK_ZONE)
    assert list(zoned.scratch_dir.iterdir()) == []
    client.destroy_zone(TMPFS_ZONE)
    removed = client.remove_image(app_image(zoned).id)
    assert removed.removed and removed.freed_bytes > 0
