"""zonectl without a daemon: pure formatting, argument parsing, exit statuses."""

from __future__ import annotations

import errno
from pathlib import Path

import msgspec
import msgspec.inspect
import pytest

from zoned import protocol as p
from zoned.cli import main
from zoned.cli.args import parse_args
from zoned.cli.exits import (
    EXIT_BY_ERROR_CODE,
    EXIT_CONFLICT,
    EXIT_DAEMON_ERROR,
    EXIT_NO_CAPACITY,
    EXIT_NOT_FOUND,
    EXIT_PERMISSION_DENIED,
    EXIT_TIMED_OUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    error_line,
    exit_code_for,
    exit_note,
    process_exit_status,
)
from zoned.cli.format import (
    POOL_TABLE_HEADER,
    format_age,
    format_bytes,
    format_cpu_list,
    format_event,
    format_host,
    format_image,
    format_image_table,
    format_json,
    format_mib,
    format_pool_table,
    format_process_json,
    format_progress,
    format_removal,
    format_seconds,
    format_time,
    format_zone,
    format_zone_table,
)
from zoned.client import Client, ConnectionLost, DaemonUnavailable, ProtocolError
from zoned.errors import ERRORS_BY_CODE, NotFound, error_from_code

# 2024-05-01T12:00:00Z
T0 = 1714564800.0


def zone(name: str = "web", **overrides: object) -> p.ZoneInfo:
    values: dict[str, object] = {
        "name": name,
        "uuid": "6f1c2a9e-0000-4000-8000-000000000001",
        "state": "ready",
        "vcpus": 2,
        "memory_mib": 512,
        "profile": "strict",
        "machine": "microvm",
        "accelerator": "tcg",
        "placement": "exclusive",
        "cpus": [2, 3],
        "emulator_cpus": [0],
        "numa_node": 0,
        "labels": {"team": "a", "app": "web"},
        "created_at": T0,
        "ready_at": T0 + 1.25,
        "guest_boot_s": 0.9,
        "console_log": f"/var/log/zoned/{name}.console.log",
        "kernel_release": "6.12.117",
        "owner_uid": 1000,
        "qemu_uid": 2013265921,
        "qemu_gid": 2013265921,
        "seclabel": "dac static +2013265921:+2013265921, relabel no",
        "memory_hard_limit_mib": 1024,
        "pids_limit": 256,
        "kernel_sha256": "ab" * 32,
        "kernel_config_sha256": "cd" * 32,
        "boot_image_sha256": "ef" * 32,
        "rootfs_sha256": "01" * 32,
        "image": "default",
        "image_id": "sha256:" + "f7" * 32,
        "writable_layer": "tmpfs",
        "writable_layer_mib": 256,
    }
    values.update(overrides)
    return p.ZoneInfo(**values)  # type: ignore[arg-type]


def host() -> p.HostInfoData:
    return p.HostInfoData(
        accelerator="tcg",
        machine="microvm",
        cpus=[
            p.CpuInfo(id=0, core=0, package=0, node=0, online=True, reserved=True),
            p.CpuInfo(id=1, core=1, package=0, node=0, online=True, reserved=False),
            p.CpuInfo(
                id=2, core=2, package=0, node=0, online=True, reserved=False, allocated_to="web"
            ),
            p.CpuInfo(id=3, core=None, package=None, node=0, online=False, reserved=False),
        ],
        numa_nodes=[p.NumaNode(id=0, cpus=[0, 1, 2, 3], memory_mib=8192)],
        memory_total_mib=8192,
        memory_reserved_mib=1024,
        memory_free_mib=6656,
        cpus_free_exclusive=[1],
        shared_pool=[1],
        zone_count=1,
        kernels=[
            p.KernelInfo(profile="strict", kernel_release="6.12.117", image_sha256="ab" * 32),
        ],
    )


def isolation(**overrides: object) -> p.HostIsolation:
    values: dict[str, object] = {
        "qemu_uid_base": 2013265920,
        "qemu_uid_count": 65536,
        "qemu_uids_in_use": 2,
        "seclabel": "dac static +<zone uid>:+<zone gid>, relabel no",
        "memory_overhead_mib": 512,
        "pids_limit": 256,
        "pids_controller": "cgroup v1 pids",
        "admin_group": "",
        "caller_sees_all": False,
        "shared_images": [
            p.SharedImageInfo(kind="kernel strict", path="/k/bzImage", sha256="ab" * 32),
            p.SharedImageInfo(kind="boot image", path="/i/agent.cpio", sha256="cd" * 32),
        ],
    }
    values.update(overrides)
    return p.HostIsolation(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- small pieces


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ([], "-"),
        ([3], "3"),
        ([0, 1, 2, 3], "0-3"),
        ([6, 0, 2, 1, 3, 8, 9], "0-3,6,8-9"),
        ([5, 5, 4], "4-5"),
        ([1, 3, 5], "1,3,5"),
    ],
)
def test_format_cpu_list(cpus: list[int], text: str) -> None:
    assert format_cpu_list(cpus) == text


def test_format_mib() -> None:
    assert format_mib(256) == "256MiB"
    assert format_mib(1024) == "1GiB"
    assert format_mib(1536) == "1536MiB"
    assert format_mib(65536) == "64GiB"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5.0, "0s"),
        (float("nan"), "0s"),
        (0.4, "0s"),
        (42.9, "42s"),
        (119.0, "119s"),
        (120.0, "2m"),
        (7199.0, "119m"),
        (7200.0, "2h"),
        (47 * 3600.0, "47h"),
        (48 * 3600.0, "2d"),
    ],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_format_seconds_and_time() -> None:
    assert format_seconds(None) == "-"
    assert format_seconds(1.34) == "1.3s"
    assert format_seconds(0.04) == "0.0s"
    assert format_time(T0) == "2024-05-01T12:00:00.000Z"
    assert format_time(T0 + 0.1234) == "2024-05-01T12:00:00.123Z"
    assert format_time(1e300) == "1e+300"  # out of range: shown raw, never a crash


# --------------------------------------------------------------------------- zones


def test_zone_table_is_aligned_and_sorted() -> None:
    zones = [
        zone("web"),
        zone(
            "batch-runner-7",
            state="booting",
            vcpus=1,
            memory_mib=2048,
            placement="shared",
            cpus=[],
            machine="q35",
            profile="containers",
            created_at=T0 + 50,
            ready_at=None,
            image="python:3.12",
        ),
    ]
    assert format_zone_table(zones, now=T0 + 3 * 3600, user_names={1000: "ada"}) == (
        "NAME            STATE    OWNER  IMAGE        VCPUS  MEM     CPUS    PROFILE     MACHINE"
        "  AGE  BOOT\n"
        "batch-runner-7  booting  ada    python:3.12  1      2GiB    shared  containers  q35    "
        "  2h   -\n"
        "web             ready    ada    default      2      512MiB  2-3     strict      microvm"
        "  3h   1.2s\n"
    )
    # An owner the host has no name for is shown by uid.
    assert "  1000  " in format_zone_table(zones, now=T0)


def test_empty_zone_table_has_its_header() -> None:
    assert format_zone_table([], now=T0) == (
        "NAME  STATE  OWNER  IMAGE  VCPUS  MEM  CPUS  PROFILE  MACHINE  AGE  BOOT\n"
    )


def test_no_line_has_trailing_spaces() -> None:
    text = format_zone_table([zone(), zone("a", ready_at=None)], now=T0 + 5)
    text += format_zone(zone(), now=T0 + 5) + format_host(host())
    for line in text.splitlines():
        assert line == line.rstrip()


def test_format_zone_shows_every_field() -> None:
    text = format_zone(zone(), now=T0 + 90, user_names={1000: "ada"})
    assert text == (
        "name:          web\n"
        "uuid:          6f1c2a9e-0000-4000-8000-000000000001\n"
        "state:         ready\n"
        "vcpus:         2\n"
        "memory:        512MiB\n"
        "placement:     exclusive\n"
        "cpus:          vcpu0:2 vcpu1:3\n"
        "emulator cpus: 0\n"
        "numa node:     0\n"
        "image:         default (f7f7f7f7f7f7)\n"
        "writable:      tmpfs, 256MiB (in the zone's memory)\n"
        "profile:       strict\n"
        "kernel:        6.12.117\n"
        "machine:       microvm (tcg)\n"
        "labels:        app=web,team=a\n"
        "started:       booted for it\n"
        "created:       2024-05-01T12:00:00.000Z (90s ago)\n"
        "ready:         2024-05-01T12:00:01.250Z (boot 1.2s, guest kernel to agent 0.9s)\n"
        "console log:   /var/log/zoned/web.console.log\n"
        "owner:         ada\n"
        "qemu uid:gid:  2013265921:2013265921\n"
        "seclabel:      dac static +2013265921:+2013265921, relabel no\n"
        "qemu limits:   memory 1GiB, tasks 256\n"
        f"kernel sha256: {'ab' * 32}\n"
        f"config sha256: {'cd' * 32}\n"
        f"boot image:    {'ef' * 32}\n"
        f"workload root: {'01' * 32}\n"
        "network:       none (no NIC)\n"
    )


def test_format_zone_of_a_failed_zone_says_why_and_its_cause() -> None:
    failed = zone(
        state="failed", reason="domain stopped: the guest ran out of memory", failure="guest_oom"
    )
    lines = format_zone(failed, now=T0 + 90, user_names={}).splitlines()
    assert lines[2:5] == [
        "state:         failed",
        "reason:        domain stopped: the guest ran out of memory",
        "failure:       guest_oom",
    ]


def test_format_zone_of_a_zone_from_before_per_zone_uids() -> None:
    old = zone(
        owner_uid=0,
        qemu_uid=None,
        qemu_gid=None,
        seclabel="",
        memory_hard_limit_mib=None,
        pids_limit=None,
        kernel_config_sha256="",
    )
    lines = format_zone(old, now=T0, user_names={0: "root"}).splitlines()
    assert "owner:         root" in lines
    assert "qemu uid:gid:  libvirt-qemu (shared: created before per-zone uids)" in lines
    assert "qemu limits:   memory -, tasks -" in lines
    assert "config sha256: -" in lines


def test_format_zone_of_a_failed_unpinned_zone() -> None:
    failed = zone(
        state="failed",
        reason="no agent hello\nwithin 60 s",
        cpus=[],
        placement="shared",
        numa_node=None,
        labels={},
        ready_at=None,
        guest_boot_s=None,
        kernel_release="",
    )
    lines = format_zone(failed, now=T0).splitlines()
    assert "reason:        no agent hello within 60 s" in lines
    assert "cpus:          not pinned" in lines
    assert "numa node:     -" in lines
    assert "labels:        -" in lines
    assert "kernel:        -" in lines
    assert "ready:         -" in lines


def test_free_text_cannot_drive_the_terminal() -> None:
    hostile = zone(reason="boom \x1b[2J\x07 done", labels={"k": "v"})
    text = format_zone(hostile, now=T0)
    assert "\x1b" not in text and "\x07" not in text
    assert "boom \\x1b[2J\\x07 done" in text
    event = p.Event(seq=1, time=T0, kind="daemon", reason="\x1b]0;pwned\x07")
    assert "\x1b" not in format_event(event)


# --------------------------------------------------------------------------- host


def host_lines(**changes: object) -> list[str]:
    """format_host's lines for host() with ``changes``."""
    return format_host(msgspec.structs.replace(host(), **changes)).splitlines()


def test_format_host() -> None:
    assert format_host(host()) == (
        "accelerator:    tcg\n"
        "machine:        microvm (default for new zones)\n"
        "memory:         8192 MiB total, 1024 MiB reserved, 6656 MiB free\n"
        "cpus:           4 (3 online: 0-2; reserved: 0)\n"
        "free exclusive: 1\n"
        "shared pool:    1\n"
        "zones:          1\n"
        "numa nodes:     node 0: cpus 0-3, 8192 MiB\n"
        "kernels:        strict: 6.12.117 (sha256 abababababab)\n"
        "\n"
        "CPU  STATE   NODE  PACKAGE  CORE  RESERVED  ZONE\n"
        "0    online  0     0        0     yes       -\n"
        "1    online  0     0        1     no        -\n"
        "2    online  0     0        2     no        web\n"
        "3    -       0     -        -     no        -\n"
    )


def test_format_host_says_what_isolates_zones() -> None:
    lines = host_lines(isolation=isolation())
    assert lines[9:16] == [
        "qemu uids:      2013265920-2013331455 (2 in use; 2013265920 is the accelerator probe's)",
        "seclabel:       dac static +<zone uid>:+<zone gid>, relabel no",
        "qemu limits:    zone memory + 512MiB, 256 tasks (cgroup v1 pids)",
        "admins:         root",
        "you see:        your own zones",
        f"shared images:  kernel strict: /k/bzImage (sha256 {'ab' * 6})",
        f"                boot image: /i/agent.cpio (sha256 {'cd' * 6})",
    ]
    lines = host_lines(
        isolation=isolation(admin_group="ops", caller_sees_all=True, pids_controller=""),
        kernels=[
            p.KernelInfo(
                profile="strict",
                kernel_release="6.12.117",
                image_sha256="ab" * 32,
                config_sha256="12" * 32,
            )
        ],
    )
    assert "kernels:        strict: 6.12.117 (sha256 abababababab, config 121212121212)" in lines
    assert (
        "qemu limits:    zone memory + 512MiB, no task limit (no pids cgroup controller)" in lines
    )
    assert "admins:         root, group ops" in lines
    assert "you see:        every zone" in lines


def test_format_host_lists_each_numa_node_and_kernel() -> None:
    lines = host_lines(
        numa_nodes=[
            p.NumaNode(id=1, cpus=[2, 3], memory_mib=4096),
            p.NumaNode(id=0, cpus=[0, 1], memory_mib=4096),
        ],
        kernels=[
            p.KernelInfo(profile="strict", kernel_release="6.12.117", image_sha256="cd" * 32),
            p.KernelInfo(profile="containers", kernel_release="6.12.117", image_sha256="ef" * 32),
        ],
    )
    assert lines[7:11] == [
        "numa nodes:     node 0: cpus 0-1, 4096 MiB",
        "                node 1: cpus 2-3, 4096 MiB",
        "kernels:        containers: 6.12.117 (sha256 efefefefefef)",
        "                strict: 6.12.117 (sha256 cdcdcdcdcdcd)",
    ]
    assert "kernels:        none" in host_lines(kernels=[], numa_nodes=[])


# --------------------------------------------------------------------------- events


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (
            p.Event(
                seq=7,
                time=T0,
                kind="zone_state",
                zone="web",
                state="ready",
                previous="booting",
                reason="agent said hello",
            ),
            "2024-05-01T12:00:00.000Z #7 zone web: booting -> ready (agent said hello)",
        ),
        (
            p.Event(seq=1, time=T0, kind="zone_state", zone="web", state="creating"),
            "2024-05-01T12:00:00.000Z #1 zone web: - -> creating",
        ),
        (
            p.Event(seq=8, time=T0, kind="cpu_offline", cpu=3, reason="zones affected: web"),
            "2024-05-01T12:00:00.000Z #8 cpu 3 offline (zones affected: web)",
        ),
        (
            p.Event(seq=9, time=T0, kind="cpu_online", cpu=3),
            "2024-05-01T12:00:00.000Z #9 cpu 3 online",
        ),
        (
            p.Event(seq=10, time=T0, kind="daemon", reason="libvirt connection lost"),
            "2024-05-01T12:00:00.000Z #10 daemon: libvirt connection lost",
        ),
    ],
)
def test_format_event(event: p.Event, line: str) -> None:
    assert format_event(event) == line


# --------------------------------------------------------------------------- JSON


def test_json_has_every_field_and_round_trips() -> None:
    record = zone(reason="", kernel_release="")
    text = format_json(record)
    assert "\n" not in text
    fields = msgspec.json.decode(text)
    assert fields["reason"] == "" and fields["kernel_release"] == ""
    assert set(fields) == set(p.ZoneInfo.__struct_fields__)
    assert msgspec.json.decode(text, type=p.ZoneInfo) == record
    assert msgspec.json.decode(format_json([record]), type=list[p.ZoneInfo]) == [record]
    assert msgspec.json.decode(format_json(host()), type=p.HostInfoData) == host()
    cpu = msgspec.json.decode(format_json(host()))["cpus"][0]
    assert cpu["allocated_to"] is None


# --------------------------------------------------------------------------- arguments


def test_parse_create_with_every_option() -> None:
    args = parse_args(
        [
            "create",
            "web",
            "--vcpus",
            "4",
            "--memory",
            "1024",
            "--profile",
            "containers",
            "--placement",
            "exclusive",
            "--machine",
            "q35",
            "--label",
            "team=a",
            "--label",
            "note=",
            "--kernel-arg",
            "quiet",
            "--kernel-arg",
            "loglevel=3",
        ]
    )
    assert args.command == "create"
    assert args.name == "web"
    assert (args.vcpus, args.memory, args.profile) == (4, 1024, "containers")
    assert (args.placement, args.machine) == ("exclusive", "q35")
    assert args.labels == {"team": "a", "note": ""}
    assert args.kernel_args == ["quiet", "loglevel=3"]
    assert (args.socket, args.json) == (None, False)


def test_parse_create_defaults_match_the_protocol() -> None:
    args = parse_args(["create", "web"])
    request = p.CreateZone(id=1, name="web")
    assert (args.vcpus, args.memory, args.profile) == (
        request.vcpus,
        request.memory_mib,
        request.profile,
    )
    assert (args.placement, args.machine, args.labels, args.kernel_args) == (
        request.placement,
        request.machine,
        {},
        [],
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--socket", "/tmp/s.sock", "--json", "list"],
        ["list", "--socket", "/tmp/s.sock", "--json"],
        ["--json", "list", "--socket", "/tmp/s.sock"],
    ],
)
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.command, args.socket, args.json, args.labels) == (
        "list",
        "/tmp/s.sock",
        True,
        {},
    )


def test_run_takes_an_image_then_the_command_after_the_dashes() -> None:
    def parsed(*argv: str) -> tuple[str | None, list[str], list[str] | None]:
        args = parse_args(["run", *argv])
        return args.image, args.argv, args.entrypoint

    assert parsed("--", "cat", "/etc/os-release") == (None, ["cat", "/etc/os-release"], None)
    assert parsed("python:3.12") == ("python:3.12", [], None)
    assert parsed("python:3.12", "--", "python3", "-V") == ("python:3.12", ["python3", "-V"], None)
    assert parsed("--image", "a", "a", "--", "x") == ("a", ["x"], None)
    assert parsed("--entrypoint", "/bin/echo", "img", "--", "hi") == ("img", ["hi"], ["/bin/echo"])
    assert parsed("--entrypoint", "", "img") == ("img", [], [])


def test_exec_takes_the_whole_command_with_or_without_dashes() -> None:
    assert parse_args(["exec", "web", "--", "ls", "-l"]).argv == ["ls", "-l"]
    assert parse_args(["exec", "web", "ls", "-l"]).argv == ["ls", "-l"]
    assert parse_args(["exec", "web"]).argv == []  # the image's command
    args = parse_args(["exec", "-u", "app:staff", "-w", "/srv", "web", "--", "id"])
    assert (args.user, args.workdir) == ("app:staff", "/srv")
    defaults = parse_args(["exec", "web", "--", "id"])
    assert (defaults.user, defaults.workdir, defaults.entrypoint) == (None, None, None)


def test_zone_options_name_the_image_and_its_writable_layer() -> None:
    args = parse_args(
        ["create", "web", "--image", "app:1", "--writable-layer", "disk", "--writable-size", "8192"]
    )
    assert (args.image, args.writable_layer, args.writable_size) == ("app:1", "disk", 8192)
    request = p.CreateZone(id=1, name="web")
    plain = parse_args(["create", "web"])
    assert (plain.image, plain.writable_layer, plain.writable_size) == (
        None,
        request.writable_layer,
        request.writable_layer_mib,
    )


def test_parse_image_commands() -> None:
    pull = parse_args(
        ["image", "pull", "--platform", "linux/amd64", "--tag", "a", "--insecure", "r:5000/x:1"]
    )
    assert (pull.image_command, pull.reference, pull.platform, pull.tags, pull.insecure) == (
        "pull",
        "r:5000/x:1",
        "linux/amd64",
        ["a"],
        True,
    )
    imported = parse_args(["image", "import", "/tmp/layout", "--name", "v1", "--tag", "t"])
    assert (imported.path, imported.reference, imported.tags) == ("/tmp/layout", "v1", ["t"])
    assert parse_args(["image", "rm", "a", "b"]).references == ["a", "b"]
    for action in ("list", "prune", "sizes"):
        assert parse_args(["image", action, "--json"]).json is True
    assert parse_args(["image", "inspect", "a"]).reference == "a"


IMAGE = p.ImageInfo(
    id="sha256:" + "f7" * 32,
    tags=["default:latest", "zoned/default:bookworm"],
    repo_digests=[],
    platform="linux/amd64",
    created="2026-12-02T04:56:00Z",
    imported_at=T0,
    layers=1,
    rootfs_bytes=198_094_848,
    cmd=["/bin/bash"],
    env=["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
    zones=2,
    default=True,
)


def test_image_table_and_block() -> None:
    assert format_image_table([IMAGE]) == (
        "IMAGE ID      TAGS                                              PLATFORM     SIZE"
        "     LAYERS  ZONES  IMPORTED\n"
        "f7f7f7f7f7f7  default:latest, zoned/default:bookworm (default)  linux/amd64  198.1MB"
        "  1       2      2024-05-01T12:00:00.000Z\n"
    )
    block = format_image(IMAGE)
    assert "cmd:              /bin/bash\n" in block
    assert "user:             root\n" in block and "entrypoint:       -\n" in block
    hostile = msgspec.structs.replace(IMAGE, tags=["\x1b[2Jx"], cmd=["a\x07"])
    assert "\x1b" not in format_image(hostile) and "\x07" not in format_image(hostile)


def test_sizes_progress_and_removals_read_as_sentences() -> None:
    assert [format_bytes(n) for n in (512, 1500, 216_300_000, 4_100_000_000)] == [
        "512B",
        "1.5kB",
        "216.3MB",
        "4.1GB",
    ]
    event = p.ImageProgress(
        id=1,
        image="app",
        phase="apply",
        layers_done=1,
        layers_total=3,
        bytes_done=10**6,
        bytes_total=3 * 10**6,
    )
    assert format_progress(event) == "app: apply  layer 2/3  1.0MB/3.0MB"
    fetch = p.ImageProgress(id=1, image="app", phase="fetch", bytes_done=2048)
    assert format_progress(fetch) == "app: fetch  2.0kB"
    removal = p.ImageRemoveReply(
        id=1, untagged=["app:1"], removed=[IMAGE.id], freed_bytes=198_094_848
    )
    assert format_removal(removal) == f"untagged app:1\nremoved {IMAGE.id}\nfreed 198.1MB\n"
    assert format_removal(p.ImageRemoveReply(id=1, untagged=[], removed=[], freed_bytes=0)) == (
        "nothing to remove\n"
    )


def test_parse_other_commands() -> None:
    assert parse_args(["host"]).command == "host"
    assert parse_args(["show", "web"]).name == "web"
    assert parse_args(["destroy", "a", "b"]).names == ["a", "b"]
    assert parse_args(["watch", "--json"]).json is True
    logs = parse_args(["logs", "web", "-f", "--tail", "4096"])
    assert (logs.name, logs.follow, logs.tail) == ("web", True, 4096)
    logs = parse_args(["logs", "web"])
    assert (logs.follow, logs.tail) == (False, None)
    assert parse_args(["list", "--label", "a=b", "--label", "c=d=e"]).labels == {
        "a": "b",
        "c": "d=e",
    }


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["create"],
        ["create", "web", "--vcpus", "0"],
        ["create", "web", "--vcpus", "two"],
        ["create", "web", "--placement", "dedicated"],
        ["create", "web", "--machine", "pc"],
        ["create", "web", "--label", "novalue"],
        ["create", "web", "--label", "=v"],
        ["list", "--label", "a=1", "--label", "a=2"],
        ["destroy"],
        ["logs", "web", "--tail", "-1"],
        ["show"],
        ["run", "img", "extra", "--", "true"],
        ["run", "--image", "a", "b", "--", "true"],
        ["run", "--writable-layer", "nfs", "--", "true"],
        ["run", "--writable-size", "0", "--", "true"],
        ["exec", "--user", "a:b:c", "web", "--", "id"],
        ["exec", "--user", ":g", "web", "--", "id"],
        ["exec", "web", "--user", "app", "--", "id"],
        ["image"],
        ["image", "pull"],
        ["image", "pull", "x", "--password-stdin"],
        ["image", "pull", "x", "--username", "u", "--password-stdin", "--token-stdin"],
        ["image", "rm"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv)
    assert raised.value.code == EXIT_USAGE
    assert main(argv) == EXIT_USAGE
    assert "usage: zonectl" in capsys.readouterr().err


def test_help_exits_0_and_documents_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for code in ("not_found", "conflict", "no_capacity", "permission_denied"):
        assert code in out
    assert main(["destroy", "--help"]) == 0
    assert "exit status:" in capsys.readouterr().out


# --------------------------------------------------------------------------- exit statuses


def test_exit_status_of_every_daemon_error_code() -> None:
    expected = {
        "not_found": EXIT_NOT_FOUND,
        "conflict": EXIT_CONFLICT,
        "no_capacity": EXIT_NO_CAPACITY,
        "permission_denied": EXIT_PERMISSION_DENIED,
        "invalid_request": EXIT_DAEMON_ERROR,
        "hypervisor": EXIT_DAEMON_ERROR,
        "unsupported_version": EXIT_DAEMON_ERROR,
        "internal": EXIT_DAEMON_ERROR,
    }
    assert set(expected) == set(ERRORS_BY_CODE)
    for code, status in expected.items():
        assert exit_code_for(error_from_code(code, "x")) == status
    # An unknown code (a newer daemon) becomes internal: exit 1.
    assert exit_code_for(error_from_code("brand_new", "x")) == EXIT_DAEMON_ERROR
    assert set(EXIT_BY_ERROR_CODE.values()) == {4, 5, 6, 7}


def test_exit_status_of_client_side_failures() -> None:
    path = Path("/run/zoned/zoned.sock")
    missing = DaemonUnavailable(path, FileNotFoundError(errno.ENOENT, "No such file"))
    refused = DaemonUnavailable(path, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    denied = DaemonUnavailable(path, PermissionError(errno.EACCES, "Permission denied"))
    assert exit_code_for(missing) == EXIT_UNAVAILABLE
    assert exit_code_for(refused) == EXIT_UNAVAILABLE
    assert exit_code_for(denied) == EXIT_PERMISSION_DENIED
    assert exit_code_for(ConnectionLost("gone")) == EXIT_UNAVAILABLE
    assert exit_code_for(ProtocolError("nonsense")) == EXIT_DAEMON_ERROR
    assert isinstance(denied, OSError) and denied.errno == errno.EACCES
    assert error_line(denied).startswith(
        "zonectl: permission_denied: cannot connect to zoned at /run/zoned/zoned.sock:"
    )
    assert "zoned group" in denied.message
    assert "is zoned running?" in missing.message
    assert error_line(missing).startswith("zonectl: unavailable: ")
    assert error_line(ConnectionLost("gone")) == "zonectl: connection_lost: gone"


def test_error_line_is_one_line() -> None:
    line = error_line(NotFound("no zone named 'web'\nreally\r\n none"))
    assert line == "zonectl: not_found: no zone named 'web' really none"


# --------------------------------------------------------------------------- no daemon


async def test_client_reports_a_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "zoned.sock"
    with pytest.raises(DaemonUnavailable) as raised:
        async with Client(path):
            pass
    assert raised.value.path == path
    assert raised.value.errno == errno.ENOENT
    assert str(path) in str(raised.value)


def test_socket_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from_env = tmp_path / "env.sock"
    monkeypatch.setenv("ZONED_SOCKET", str(from_env))
    assert Client().path == from_env
    assert Client(tmp_path / "explicit.sock").path == tmp_path / "explicit.sock"
    assert main(["list"]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert err == (
        f"zonectl: unavailable: cannot connect to zoned at {from_env}:"
        " no such socket (is zoned running? is this its socket path?)\n"
    )
    assert main(["--socket", str(tmp_path / "other.sock"), "list"]) == EXIT_UNAVAILABLE
    assert str(tmp_path / "other.sock") in capsys.readouterr().err


# --------------------------------------------------------------------------- bounds


# Every numeric option that becomes a wire field: (the command, the option,
# the rest of the command line, the request and field whose bounds the
# daemon applies).
WIRE_NUMBERS = [
    ("create", "--vcpus", ["web"], p.CreateZone, "vcpus"),
    ("create", "--memory", ["web"], p.CreateZone, "memory_mib"),
    ("run", "--vcpus", ["--", "true"], p.RunZone, "vcpus"),
    ("run", "--memory", ["--", "true"], p.RunZone, "memory_mib"),
    ("exec", "--memory-limit", ["web", "--", "true"], p.Exec, "memory_limit_mib"),
    ("run", "--pids-limit", ["--", "true"], p.RunZone, "pids_limit"),
    ("logs", "--tail", ["web"], p.ConsoleLog, "tail_bytes"),
]


def wire_bounds(kind: type[msgspec.Struct], name: str) -> tuple[int, int]:
    field = next(f for f in msgspec.inspect.type_info(kind).fields if f.name == name)  # type: ignore[attr-defined]
    types = getattr(field.type, "types", (field.type,))
    number = next(t for t in types if isinstance(t, msgspec.inspect.IntType))
    assert number.ge is not None and number.le is not None
    return number.ge, number.le


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == EXIT_USAGE
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(("command", "option", "rest", "kind", "name"), WIRE_NUMBERS)
def test_numeric_options_take_the_protocols_bounds(
    command: str,
    option: str,
    rest: list[str],
    kind: type[msgspec.Struct],
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    low, high = wire_bounds(kind, name)
    dest = option.removeprefix("--").replace("-", "_")
    for good in (low, high):
        args = parse_args([command, option, str(good), *rest])
        assert vars(args)[dest] == good
    expected = f"expected a whole number from {low} to {high}"
    for bad in (str(low - 1), str(high + 1), "-1", "many"):
        assert expected in usage_error([command, option, bad, *rest], capsys)


def test_vcpus_minus_one_and_zero_get_the_same_answer(capsys: pytest.CaptureFixture[str]) -> None:
    minus_one = usage_error(["create", "web", "--vcpus", "-1"], capsys)
    zero = usage_error(["create", "web", "--vcpus", "0"], capsys)
    assert minus_one.removesuffix("-1") == zero.removesuffix("0")
    assert f"from {p.MIN_VCPUS} to {p.MAX_VCPUS}" in zero


def test_run_timeout_takes_the_protocols_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["run", "--timeout", "0.5", "--", "true"]).timeout == 0.5
    limit = p.MAX_RUN_TIMEOUT_S
    assert parse_args(["run", "--timeout", f"{limit:g}", "--", "true"]).timeout == limit
    for bad in ("0", "-3", f"{limit + 1:g}", "nan", "soon"):
        line = usage_error(["run", "--timeout", bad, "--", "true"], capsys)
        assert f"expected a number > 0 and <= {limit:g}" in line, line


def test_run_defaults_match_the_protocol() -> None:
    args = parse_args(["run", "--", "true"])
    request = p.RunZone(id=1, argv=["true"])
    assert (args.vcpus, args.memory, args.profile, args.placement, args.machine) == (
        request.vcpus,
        request.memory_mib,
        request.profile,
        request.placement,
        request.machine,
    )
    assert (args.name, args.timeout, args.memory_limit, args.pids_limit) == (
        request.name,
        request.timeout_s,
        request.memory_limit_mib,
        request.pids_limit,
    )


# --------------------------------------------------------------------------- exec/run reports


def test_out_of_memory_note_without_a_limit_names_none() -> None:
    oom = p.ExecExit(id=1, signal=9, oom_killed=True)
    unlimited = exit_note(oom, timeout_s=None, memory_limit_mib=None)
    assert unlimited is not None and "None" not in unlimited
    assert unlimited.startswith("zonectl: killed: out of memory")
    assert exit_note(oom, timeout_s=None, memory_limit_mib=64) == (
        "zonectl: killed: out of memory (limit 64 MiB)"
    )
    timed_out = p.ExecExit(id=1, signal=9, timed_out=True)
    assert exit_note(timed_out, timeout_s=20.0, memory_limit_mib=None) == (
        "zonectl: the command timed out after 20 s of running; killed"
    )
    assert exit_note(p.ExecExit(id=1, exit_code=3), timeout_s=20.0, memory_limit_mib=64) is None


def test_process_exit_status() -> None:
    assert process_exit_status(p.ExecExit(id=1, exit_code=3)) == 3
    assert process_exit_status(p.ExecExit(id=1, signal=9)) == 128 + 9
    assert process_exit_status(p.ExecExit(id=1, signal=9, timed_out=True)) == EXIT_TIMED_OUT


def test_process_json_has_every_field_of_the_exit() -> None:
    exit = p.ExecExit(id=7, exit_code=0, cpu_time_s=0.25)
    fields = msgspec.json.decode(format_process_json("web", 42, exit, b"out\xff", b""))
    assert fields == {
        "zone": "web",
        "pid": 42,
        **{name: getattr(exit, name) for name in p.ExecExit.__struct_fields__ if name != "id"},
        "stdout": "out\ufffd",
        "stderr": "",
    }


class ExecExitOfTomorrow(p.ExecExit, tag="exec_exit", frozen=True):
    """ExecExit as a later protocol revision might have it: one field more."""

    io_wait_s: float | None = None


def test_a_field_added_to_exec_exit_reaches_the_json_with_no_edit() -> None:
    exit = ExecExitOfTomorrow(id=7, exit_code=0, io_wait_s=1.5)
    fields = msgspec.json.decode(format_process_json("web", 42, exit, b"", b""))
    assert fields["io_wait_s"] == 1.5 and fields["exit_code"] == 0


def test_pool_table_says_how_each_pool_is_doing() -> None:
    pools = [
        p.PoolInfo(
            name="py",
            spec=p.PoolSpec(image="python:3.12", memory_mib=512, size=4),
            ready=3,
            booting=1,
            hits=7,
            misses=2,
            acquire_mean_s=0.0105,
        ),
        p.PoolInfo(
            name="broken",
            spec=p.PoolSpec(writable_layer="disk", writable_layer_mib=64, size=1),
            refill_failures=3,
            last_failure="zone 'pool-broken-1' failed to boot: no hello\nin 60 s",
            backoff_until=T0 + 8,
        ),
    ]
    lines = format_pool_table(pools, now=T0).splitlines()
    assert lines[0].split() == list(POOL_TABLE_HEADER)
    assert lines[1].split()[:13] == (
        [
            "py",
            "python:3.12",
            "strict",
            "1",
            "512MiB",
            "tmpfs",
            "4",
            "3",
            "1",
            "7",
            "2",
            "0",
            "10.5",
        ]
    )
    assert lines[2].endswith(
        "waiting 8s after: zone 'pool-broken-1' failed to boot: no hello in 60 s"
    )
    assert "disk:64" in lines[2] and "(default)" in lines[2]
