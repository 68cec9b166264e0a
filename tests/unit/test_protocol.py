"""The wire protocol: round-trips, rejections, framing, and properties over hostile input."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.samples import minimal_zone
from zoned import protocol as p
from zoned.errors import Conflict, ErrorCode, InvalidRequest, NotFound, UnsupportedVersion

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

# ---------------------------------------------------------------------------
# Samples: one fully populated instance of every message
# ---------------------------------------------------------------------------

ZONE = p.ZoneInfo(
    name="web-1",
    uuid="0f8b6c3e-6f0a-4d59-9d57-3a2b1c0d9e8f",
    state="ready",
    reason="agent said hello",
    vcpus=2,
    memory_mib=512,
    profile="strict",
    machine="microvm",
    accelerator="tcg",
    placement="exclusive",
    cpus=[2, 3],
    emulator_cpus=[0],
    numa_node=0,
    labels={"app.example.com/tier": "web", "owner": "agent 7"},
    created_at=1_700_000_000.25,
    ready_at=1_700_000_002.5,
    kernel_release="6.12.9-zoned",
    guest_boot_s=1.2,
    console_log="/var/log/zoned/web-1.console.log",
    owner_uid=1000,
    qemu_uid=2013265921,
    qemu_gid=2013265921,
    seclabel="dac static +2013265921:+2013265921, relabel no",
    memory_hard_limit_mib=1024,
    pids_limit=256,
    kernel_sha256="ab" * 32,
    kernel_config_sha256="cd" * 32,
    boot_image_sha256="ef" * 32,
    rootfs_sha256="01" * 32,
)

HOST = p.HostInfoData(
    accelerator="tcg",
    machine="microvm",
    cpus=[
        p.CpuInfo(id=0, core=0, package=0, node=0, online=True, reserved=True),
        p.CpuInfo(id=1, core=1, package=0, node=0, online=True, reserved=False, allocated_to="a"),
    ],
    numa_nodes=[p.NumaNode(id=0, cpus=[0, 1], memory_mib=7936)],
    memory_total_mib=7936,
    memory_reserved_mib=1024,
    memory_free_mib=6400,
    cpus_free_exclusive=[],
    shared_pool=[1],
    zone_count=1,
    kernels=[
        p.KernelInfo(
            profile="strict",
            kernel_release="6.12.9-zoned",
            image_sha256="ab" * 32,
            config_sha256="cd" * 32,
        )
    ],
    isolation=p.HostIsolation(
        qemu_uid_base=2013265920,
        qemu_uid_count=65536,
        qemu_uids_in_use=1,
        seclabel="dac static +<zone uid>:+<zone gid>, relabel no",
        memory_overhead_mib=512,
        pids_limit=256,
        pids_controller="cgroup v1 pids",
        admin_group="ops",
        caller_sees_all=True,
        shared_images=[
            p.SharedImageInfo(kind="kernel strict", path="/k/bzImage", sha256="ab" * 32)
        ],
    ),
)

REQUESTS: list[p.Request] = [
    p.Hello(id=0, versions=[1, 2], client="zonectl/0.1"),
    p.HostInfo(id=1),
    p.CreateZone(
        id=2,
        name="web-1",
        vcpus=4,
        memory_mib=1024,
        profile="containers",
        kernel_args=["quiet", "loglevel=3", 'x="y"'],
        placement="exclusive",
        labels={"tier": "web"},
        machine="q35",
    ),
    p.CreateZone(id=3, name="a"),
    p.GetZone(id=4, name="web-1"),
    p.ListZones(id=5, labels={"tier": "web", "owner": ""}),
    p.ListZones(id=6),
    p.DestroyZone(id=7, name="web-1"),
    p.WatchEvents(id=8),
    p.ConsoleLog(id=9, name="web-1", follow=True, tail_bytes=4096),
    p.ConsoleLog(id=2**32 - 1, name="web-1"),
    p.Exec(
        id=10,
        zone="web-1",
        argv=["python3", "-c", "print(2+2)"],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/tmp",
        uid=1000,
        gid=1000,
        stdin=True,
    ),
    p.Exec(id=11, zone="a", argv=["true"]),
    p.RunZone(id=12, argv=["sh", "-c", "echo hi"], memory_mib=128, timeout_s=30.0),
    p.RunZone(id=13, name="run-1", argv=["true"], placement="exclusive", labels={"a": "b"}),
    p.ExecInput(id=10, data=b"\x00input\n"),
    p.ExecInput(id=10, eof=True),
    p.ExecSignal(id=10, signal=15),
    p.ExecResize(id=10, rows=50, cols=132),
    p.Exec(
        id=16,
        zone="a",
        argv=["sh"],
        tty=True,
        rows=40,
        cols=100,
        memory_limit_mib=64,
        pids_limit=100,
    ),
    p.ZoneMetrics(id=14, name="web-1"),
    p.WatchEvents(id=17, zones=["web-1"], kinds=["exec_started", "exec_ended"]),
    p.ConsoleLog(id=18, name="run-1", uuid="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
    p.AuditQuery(id=19),
    p.AuditQuery(id=20, zone="web-1", since=1.7e9),
    p.QuarantineZone(id=21, name="web-1"),
    p.QuarantineZone(id=22, name="web-1", destroy=True),
    # Images: the zone's image and writable layer, the image's process settings.
    p.CreateZone(
        id=20, name="img", image="python:3.12", writable_layer="disk", writable_layer_mib=2048
    ),
    p.RunZone(id=21, image="builtin", entrypoint=[], user="app:staff", workdir="/srv"),
    p.Exec(id=22, zone="img", argv=[], entrypoint=["python3", "-I"], user="1000"),
    p.PullImage(
        id=23,
        reference="127.0.0.1:5000/team/app:v1",
        platform="linux/amd64",
        tags=["app"],
        username="u",
        password="p",
        tls_verify=False,
    ),
    p.ImportImage(id=24, size=123_456, reference="bookworm", tags=["mine:1"]),
    p.ImageData(id=24, data=b"\x00" * 1024),
    p.ImageData(id=24, eof=True),
    p.ListImages(id=25),
    p.InspectImage(id=26, reference="sha256:" + "a" * 64),
    p.RemoveImage(id=27, reference="app"),
    p.PruneImages(id=28),
    p.ImageSizes(id=29),
    p.CreateZone(
        id=15,
        name="web",
        net=["pypi.org", "*.pythonhosted.org:443", "udp://203.0.113.5/32:123", "open"],
        publishes=["127.0.0.1:8080:80", "[::1]:8443:443"],
    ),
    p.CreateZone(id=16, name="quiet", net=[]),
    p.RunZone(id=17, argv=["true"], net=["open"], publishes=["8080:80"]),
    p.SetZoneNet(id=18, name="web", net=["pypi.org:443"]),
    p.SetZoneNet(id=19, name="web", publishes=[]),
    p.WatchEvents(id=20, zones=["web"], kinds=["net_refused", "net_status"]),
    p.SetPool(id=30, name="py", spec=p.PoolSpec(image="python:3.12", memory_mib=512, size=4)),
    p.SetPool(id=30, name="empty", spec=p.PoolSpec(size=0, machine="q35", writable_layer="disk")),
    p.ListPools(id=31),
    p.RemovePool(id=32, name="py"),
]

CALLER = p.CallerInfo(uid=1000, gid=995, pid=4242, exe="/usr/bin/python3.11")
EXEC_RECORD = p.ExecRecord(
    argv=["python3", "-c", "print(1)"],
    cwd="/",
    uid=0,
    gid=0,
    tty=False,
    stdin=True,
    env_names=["PATH", "TOKEN"],
    pid=7,
    exit_code=0,
    cpu_time_s=0.25,
    memory_peak_kib=9000,
    duration_s=0.5,
)
AUDIT_RECORD = p.AuditRecord(
    time=1.7e9,
    op="exec",
    outcome="ok",
    caller=CALLER,
    zone="web-1",
    zone_uuid="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    exec=EXEC_RECORD,
)

IMAGE = p.ImageInfo(
    id="sha256:" + "b" * 64,
    tags=["default", "zoned/default:bookworm"],
    repo_digests=[],
    platform="linux/amd64",
    created=None,
    imported_at=1.5,
    layers=1,
    rootfs_bytes=250_000_000,
    cmd=["/bin/bash"],
    env=["PATH=/usr/bin:/bin"],
    zones=2,
    default=True,
)

REPLIES: list[p.Reply] = [
    p.HelloReply(id=0, version=1, server="zoned/0.1"),
    p.HostInfoReply(id=1, host=HOST),
    p.ZoneReply(id=2, zone=ZONE),
    p.ZoneReply(
        id=3,
        zone=msgspec.structs.replace(
            minimal_zone("b", state="creating"), machine="q35", accelerator="kvm"
        ),
    ),
    p.ZoneListReply(id=4, zones=[ZONE, ZONE]),
    p.ZoneListReply(id=5, zones=[]),
    p.EventReply(
        id=6,
        event=p.Event(
            seq=17,
            time=1.5,
            kind="zone_state",
            zone="web-1",
            state="ready",
            previous="booting",
            reason="agent said hello",
        ),
    ),
    p.EventReply(id=6, event=p.Event(seq=18, time=2.0, kind="cpu_offline", cpu=3)),
    p.LogChunk(id=7, data=b"\x00\xffLinux version 6.12\r\n"),
    p.StreamEnd(id=7),
    p.ErrorReply(id=8, code="not_found", message="no zone named 'x'"),
    p.ZoneMetricsReply(
        id=14,
        metrics=p.ZoneMetricsData(
            name="web-1",
            state="ready",
            sampled_at=2.5,
            vcpus=2,
            memory_mib=256,
            cpu_time_s=1.25,
            host_rss_kib=340_000,
            execs_running=3,
            guest=p.GuestMetrics(
                uptime_s=9.5,
                load1=0.5,
                mem_total_kib=250_000,
                mem_available_kib=200_000,
                processes=12,
                reported_at=2.0,
            ),
        ),
    ),
    p.ZoneMetricsReply(
        id=15,
        metrics=p.ZoneMetricsData(name="a", state="failed", sampled_at=0.0, vcpus=1, memory_mib=64),
    ),
    p.ZoneMetricsReply(
        id=16,
        metrics=p.ZoneMetricsData(
            name="web",
            state="ready",
            sampled_at=1.0,
            vcpus=1,
            memory_mib=256,
            net=p.NetMetrics(
                status="up",
                bytes_out=1200,
                bytes_in=64_000,
                connections_allowed=3,
                connections_refused=1,
                dns_answered=4,
                dns_refused=2,
            ),
        ),
    ),
    p.ZoneNetReply(id=17, zone=ZONE, connections_closed=2),
    p.EventReply(
        id=18,
        event=p.Event(
            seq=40,
            time=3.0,
            kind="net_refused",
            zone="web",
            refused=p.NetRefusal(
                kind="sni",
                destination="198.51.100.10",
                port=443,
                protocol="tcp",
                name="other.test",
                rule="sni-mismatch",
                suppressed_before=3,
            ),
        ),
    ),
    p.EventReply(
        id=19,
        event=p.Event(
            seq=41, time=3.5, kind="net_status", zone="web", state="restarting", reason="exited"
        ),
    ),
    p.ExecStarted(id=10, pid=42),
    p.ExecOutput(id=10, stream="stdout", data=b"4\n"),
    p.ExecOutput(id=10, stream="stderr", data=b"\xff"),
    p.ExecExit(id=10, exit_code=0),
    p.ExecExit(id=12, signal=9, timed_out=True),
    p.ExecExit(id=16, signal=9, oom_killed=True, cpu_time_s=0.5, memory_peak_kib=65536),
    p.EventReply(
        id=6,
        event=p.Event(
            seq=19, time=3.0, kind="exec_ended", zone="web-1", exec=EXEC_RECORD, caller=CALLER
        ),
    ),
    p.AuditReply(
        id=19,
        records=[
            AUDIT_RECORD,
            p.AuditRecord(
                time=1.0,
                op="hello",
                outcome="denied",
                caller=CALLER,
                error_code="permission_denied",
                error="no",
            ),
        ],
    ),
    p.AuditReply(id=19, records=[]),
    p.QuarantineReply(
        id=21,
        zone=ZONE,
        bundle=p.EvidenceBundle(
            path="/var/lib/zoned/evidence/web-1-x",
            size_bytes=268_435_456,
            partial=True,
            files=[p.EvidenceFile(name="memory.elf", size_bytes=268_435_456, sha256="0" * 64)],
            errors=["console.log: [Errno 28] No space left on device"],
        ),
    ),
    p.ImageProgress(id=23, image="app", phase="apply", layers_done=1, layers_total=3),
    p.ImageProgress(id=24, image="the uploaded archive", phase="upload", bytes_done=9),
    p.ImageReply(id=23, image=IMAGE, converted=True),
    p.ImageListReply(id=25, images=[IMAGE]),
    p.ImageListReply(id=25, images=[]),
    p.ImageRemoveReply(id=27, untagged=["app:latest"], removed=[IMAGE.id], freed_bytes=9),
    p.ImageSizesReply(
        id=29,
        sizes=p.ImageStoreSizes(
            images=[
                p.ImageSizeInfo(
                    id=IMAGE.id, tags=[], rootfs_bytes=1, blob_bytes=2, shared_blob_bytes=0
                )
            ],
            rootfs_bytes=1,
            blob_bytes=2,
            scratch_bytes=0,
            total_bytes=3,
        ),
    ),
    p.PoolReply(id=30, pool=p.PoolInfo(name="py", spec=p.PoolSpec())),
    p.PoolListReply(
        id=31,
        pools=[
            p.PoolInfo(
                name="py",
                spec=p.PoolSpec(size=2),
                ready=1,
                booting=1,
                hits=3,
                misses=1,
                refill_failures=2,
                last_failure="zone 'pool-py-0a' failed to boot: boot timeout",
                backoff_until=1e9,
                acquire_last_s=0.004,
                acquire_mean_s=0.005,
            )
        ],
    ),
]

FROM_AGENT: list[p.AgentToHost] = [
    p.AgentHello(
        version=1, agent="zoned-agent/0.1.0", kernel_release="6.12.9-zoned", boot_s=1.25, pid=1
    ),
    p.HeartbeatReply(
        seq=2**63 - 1, uptime_s=12.5, load1=0.07, mem_total_kib=250_000, mem_available_kib=200_000
    ),
]

FROM_AGENT += [
    p.AgentExecStarted(exec_id=1, pid=7),
    p.AgentExecOutput(exec_id=1, stream="stdout", data=b"x" * p.MAX_EXEC_CHUNK),
    p.AgentExecInputCredit(exec_id=1, bytes=4096),
    p.AgentExecExit(exec_id=1, exit_code=3),
    p.AgentExecExit(exec_id=2, signal=9, oom_killed=True, cpu_time_s=1.5, memory_peak_kib=1),
    p.AgentExecExit(exec_id=3, error="cannot run 'nosuch': No such file or directory"),
]

TO_AGENT: list[p.HostToAgent] = [
    p.Heartbeat(seq=0),
    p.Heartbeat(seq=42),
    p.AgentExecStart(exec_id=1, argv=["sh"], env={"A": "1"}, cwd="/", stdin=True),
    p.AgentExecInput(exec_id=1, data=b"echo\n", eof=True),
    p.AgentExecCredit(exec_id=1, bytes=65536),
    p.AgentExecSignal(exec_id=1, signal=2),
    p.AgentExecResize(exec_id=1, rows=24, cols=80),
    p.AgentExecStart(exec_id=2, argv=["sh"], tty=True, memory_limit_mib=16, pids_limit=8),
    p.AgentSetHostname(hostname="web-1"),
]

ALL_MESSAGES: list[p.Message] = [*REQUESTS, *REPLIES, *FROM_AGENT, *TO_AGENT]


def _decoder_for(msg: p.Message) -> Callable[[bytes], p.Message]:
    if isinstance(msg, get_args(p.Request)):
        return p.decode_request
    if isinstance(msg, get_args(p.Reply)):
        return p.decode_reply
    if isinstance(msg, get_args(p.AgentToHost)):
        return p.decode_from_agent
    return p.decode_to_agent


# ---------------------------------------------------------------------------
# Round-trips and conventions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: p.Message) -> None:
    decode = _decoder_for(msg)
    assert decode(p.encode(msg)) == msg
    frame = p.encode_frame(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    decoder = p.FrameDecoder(p.DEFAULT_MAX_FRAME)
    decoder.feed(frame)
    payload = decoder.next_frame()
    assert payload is not None
    assert decode(payload) == msg
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_every_message_type_has_a_sample() -> None:
    sampled = {type(m) for m in ALL_MESSAGES}
    for union in (p.Request, p.Reply, p.AgentToHost, p.HostToAgent):
        assert set(get_args(union)) <= sampled


def _snake_case(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def test_tags_are_snake_case_class_names_and_unique_across_channels() -> None:
    classes = [
        *get_args(p.Request),
        *get_args(p.Reply),
        *get_args(p.AgentToHost),
        p.Heartbeat,
    ]
    tags = [cls.__struct_config__.tag for cls in classes]
    assert tags == [_snake_case(cls.__name__) for cls in classes]
    assert len(set(tags)) == len(tags)
    assert all(cls.__struct_config__.tag_field == "type" for cls in classes)


def test_messages_are_frozen() -> None:
    msg = p.GetZone(id=1, name="a")
    with pytest.raises(AttributeError):
        msg.name = "b"  # type: ignore[misc]


def test_defaults_are_left_off_the_wire() -> None:
    # What lets new defaulted fields reach old peers unnoticed (see module header).
    assert msgspec.msgpack.decode(p.encode(p.CreateZone(id=3, name="a"))) == {
        "type": "create_zone",
        "id": 3,
        "name": "a",
    }


def test_create_zone_defaults() -> None:
    msg = p.decode_request(msgspec.msgpack.encode({"type": "create_zone", "id": 1, "name": "z"}))
    assert msg == p.CreateZone(
        id=1,
        name="z",
        vcpus=1,
        memory_mib=256,
        profile="strict",
        kernel_args=[],
        placement="shared",
        labels={},
        machine=None,
    )


def test_boundary_values_are_accepted() -> None:
    for fields in (
        {"vcpus": 1, "memory_mib": p.MIN_MEMORY_MIB},
        {"vcpus": 256, "memory_mib": 1024 * 1024},
        {"name": "a" + "-" * 62},
        {"kernel_args": ["x" * 256] * 3},
        {"labels": {f"k{i}": "v" * 256 for i in range(32)}},
    ):
        raw = {"type": "create_zone", "id": 2**32 - 1, "name": "z", **fields}
        assert isinstance(p.decode_request(msgspec.msgpack.encode(raw)), p.CreateZone)


# ---------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------


def _create(**fields: Any) -> dict[str, Any]:
    return {"type": "create_zone", "id": 1, "name": "web", **fields}


REQUEST_REJECTIONS: list[tuple[str, object, str]] = [
    ("unknown tag", {"type": "reboot_zone", "id": 1}, "known types: hello, host_info"),
    ("agent tag on control socket", {"type": "heartbeat", "seq": 1}, "Invalid value 'heartbeat'"),
    ("missing tag", {"id": 1, "name": "web"}, "missing required field `type`"),
    ("unknown field", _create(extra=1), "unknown field `extra`"),
    ("missing field", {"type": "get_zone", "id": 1}, "missing required field `name`"),
    ("missing id", {"type": "host_info"}, "missing required field `id`"),
    ("uppercase name", _create(name="Web"), "$.name"),
    ("digit first", _create(name="1web"), "$.name"),
    ("underscore", _create(name="a_b"), "$.name"),
    ("empty name", _create(name=""), "$.name"),
    ("64-char name", _create(name="a" * 64), "$.name"),
    ("trailing newline", _create(name="web\n"), "$.name"),
    ("path in name", {"type": "get_zone", "id": 1, "name": "../etc"}, "$.name"),
    ("path in profile", _create(profile="../../tmp"), "$.profile"),
    ("zero vcpus", _create(vcpus=0), "`int` >= 1 - at `$.vcpus`"),
    ("too many vcpus", _create(vcpus=257), "`int` <= 256 - at `$.vcpus`"),
    (
        "too little memory",
        _create(memory_mib=p.MIN_MEMORY_MIB - 1),
        f"`int` >= {p.MIN_MEMORY_MIB} - at `$.memory_mib`",
    ),
    ("too much memory", _create(memory_mib=2**20 + 1), "- at `$.memory_mib`"),
    ("float vcpus", _create(vcpus=1.5), "Expected `int`, got `float` - at `$.vcpus`"),
    ("string id", {"type": "host_info", "id": "1"}, "Expected `int`, got `str` - at `$.id`"),
    ("negative id", {"type": "host_info", "id": -1}, "$.id"),
    ("id above uint32", {"type": "host_info", "id": 2**32}, "$.id"),
    ("bool as int", _create(vcpus=True), "$.vcpus"),
    ("labels as list", _create(labels=["a"]), "Expected `object`, got `array`"),
    ("null name", _create(name=None), "Expected `str`, got `None` - at `$.name`"),
    ("bad placement", _create(placement="dedicated"), "$.placement"),
    ("bad machine", _create(machine="pc"), "$.machine"),
    ("space in kernel arg", _create(kernel_args=["a b"]), "$.kernel_args[0]"),
    ("tab in kernel arg", _create(kernel_args=["ok", "a\tb"]), "$.kernel_args[1]"),
    ("NUL in kernel arg", _create(kernel_args=["a\x00b"]), "$.kernel_args[0]"),
    ("newline kernel arg", _create(kernel_args=["init=/x\n"]), "$.kernel_args[0]"),
    ("non-ASCII space", _create(kernel_args=["a\u00a0b"]), "$.kernel_args[0]"),
    ("empty kernel arg", _create(kernel_args=[""]), "$.kernel_args[0]"),
    ("long kernel arg", _create(kernel_args=["x" * 257]), "$.kernel_args[0]"),
    ("too many kernel args", _create(kernel_args=["q"] * 33), "$.kernel_args"),
    ("kernel args total", _create(kernel_args=["x" * 256] * 4), "kernel_args too long"),
    ("too many labels", _create(labels={f"k{i}": "" for i in range(33)}), "$.labels"),
    ("bad label key", _create(labels={"-x": "y"}), "$.labels"),
    ("label key space", _create(labels={"a b": "y"}), "$.labels"),
    ("long label key", _create(labels={"k" * 129: "y"}), "$.labels"),
    ("control in label", _create(labels={"k": "\x1b[31m"}), "$.labels[...]"),
    ("long label value", _create(labels={"k": "v" * 257}), "$.labels[...]"),
    ("no versions", {"type": "hello", "id": 0, "versions": []}, "$.versions"),
    ("version zero", {"type": "hello", "id": 0, "versions": [0]}, "$.versions[0]"),
    ("negative tail", {"type": "console_log", "id": 1, "name": "a", "tail_bytes": -1}, "tail"),
    ("not a map", [1, "get_zone"], "Expected `object`, got `array`"),
    ("scalar", 7, "Expected `object`, got `int`"),
    ("exec argv not a list", {"type": "exec", "id": 1, "zone": "a", "argv": "ls"}, "$.argv"),
    ("bad writable layer", _create(writable_layer="nfs"), "$.writable_layer"),
    ("zero writable size", _create(writable_layer_mib=0), "$.writable_layer_mib"),
    ("image with space", _create(image="a b"), "$.image"),
    (
        "user with newline",
        {"type": "exec", "id": 1, "zone": "a", "user": "root\nx"},
        "$.user",
    ),
    ("user with two groups", {"type": "exec", "id": 1, "zone": "a", "user": "a:b:c"}, "$.user"),
    ("empty image ref", {"type": "inspect_image", "id": 1, "reference": ""}, "$.reference"),
    ("zero size import", {"type": "import_image", "id": 1, "size": 0}, "$.size"),
    (
        "oversized image data",
        {"type": "image_data", "id": 1, "data": b"x" * (p.MAX_IMAGE_CHUNK + 1)},
        "$.data",
    ),
    (
        "bad platform",
        {"type": "pull_image", "id": 1, "reference": "a", "platform": "linux"},
        "$.platform",
    ),
    (
        "too many tags",
        {"type": "pull_image", "id": 1, "reference": "a", "tags": ["t"] * 17},
        "$.tags",
    ),
    ("exec empty argv0", {"type": "exec", "id": 1, "zone": "a", "argv": [""]}, "argv[0]"),
    ("exec NUL arg", {"type": "exec", "id": 1, "zone": "a", "argv": ["a\x00b"]}, "$.argv[0]"),
    (
        "exec env with =",
        {"type": "exec", "id": 1, "zone": "a", "argv": ["x"], "env": {"A=B": "1"}},
        "$.env",
    ),
    (
        "exec relative cwd",
        {"type": "exec", "id": 1, "zone": "a", "argv": ["x"], "cwd": "tmp"},
        "$.cwd",
    ),
    ("exec negative uid", {"type": "exec", "id": 1, "zone": "a", "argv": ["x"], "uid": -1}, "uid"),
    (
        "exec argv too long",
        {"type": "exec", "id": 1, "zone": "a", "argv": ["x" * 100_000] * 6},
        "too long",
    ),
    ("run zero timeout", {"type": "run_zone", "id": 1, "argv": ["x"], "timeout_s": 0}, "timeout"),
    ("run bad name", {"type": "run_zone", "id": 1, "argv": ["x"], "name": "A"}, "$.name"),
    ("signal zero", {"type": "exec_signal", "id": 1, "signal": 0}, "$.signal"),
    ("signal 65", {"type": "exec_signal", "id": 1, "signal": 65}, "$.signal"),
    (
        "input too big",
        {"type": "exec_input", "id": 1, "data": b"x" * (p.MAX_EXEC_CHUNK + 1)},
        "$.data",
    ),
    ("audit negative since", {"type": "audit_query", "id": 1, "since": -1.0}, "$.since"),
    ("audit NaN since", {"type": "audit_query", "id": 1, "since": float("nan")}, "$.since"),
    ("audit since as text", {"type": "audit_query", "id": 1, "since": "yesterday"}, "$.since"),
    ("audit bad zone", {"type": "audit_query", "id": 1, "zone": "../x"}, "$.zone"),
    ("quarantine no name", {"type": "quarantine_zone", "id": 1}, "`name`"),
    ("log bad uuid", {"type": "console_log", "id": 1, "name": "a", "uuid": "../x"}, "$.uuid"),
    ("watch unknown kind", {"type": "watch_events", "id": 1, "kinds": ["exec"]}, "$.kinds[0]"),
    ("watch bad zone", {"type": "watch_events", "id": 1, "zones": ["A"]}, "$.zones[0]"),
    (
        "watch too many zones",
        {"type": "watch_events", "id": 1, "zones": ["a"] * (p.MAX_WATCH_FILTER + 1)},
        "$.zones",
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [(raw, exp) for _, raw, exp in REQUEST_REJECTIONS],
    ids=[name for name, _, _ in REQUEST_REJECTIONS],
)  # fmt: skip
def test_invalid_requests_are_rejected_with_a_useful_message(raw: object, expected: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        p.decode_request(msgspec.msgpack.encode(raw))
    assert info.value.message.startswith("invalid request: ")
    assert expected in info.value.message
    assert info.value.code == "invalid_request"


GARBAGE: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("reserved opcode", b"\xc1"),
    ("truncated map", b"\x81\xa4type"),
    ("truncated string", b"\xdb\xff\xff\xff\xff"),
    ("trailing bytes", p.encode(p.HostInfo(id=1)) + b"\x00"),
    ("two messages", p.encode(p.HostInfo(id=1)) * 2),
    ("invalid utf-8 tag", b"\x81\xa4type\xa2\xff\xfe"),
    ("invalid utf-8 key", b"\x81\xa2\xff\xfe\x01"),
    ("huge array header", b"\xdd\xff\xff\xff\xff"),
    ("huge map header", b"\xdf\xff\xff\xff\xff"),
    ("timestamp ext", b"\xd6\xff\x00\x00\x00\x00"),
    ("deep nesting", b"\x91" * 100_000 + b"\x01"),
    ("deep nesting before the tag", b"\x82\xa1x" + b"\x91" * 100_000 + b"\x01\xa4type\xa5hello"),
    (
        "deep nesting after the tag",
        b"\x82\xa4type\xa5hello\xa1x" + b"\x81\xa1x" * 100_000 + b"\x01",
    ),
]


@pytest.mark.parametrize("payload", [g for _, g in GARBAGE], ids=[n for n, _ in GARBAGE])
def test_garbage_bytes_are_rejected(payload: bytes) -> None:
    for decode in (p.decode_request, p.decode_reply, p.decode_from_agent, p.decode_to_agent):
        with pytest.raises(InvalidRequest, match=r"^(malformed|invalid) "):
            decode(payload)
    assert p.peek_request_id(payload) is None


def test_invalid_utf8_says_so() -> None:
    with pytest.raises(InvalidRequest, match="malformed request: a string is not valid UTF-8"):
        p.decode_request(b"\x81\xa4type\xa2\xff\xfe")


def test_deep_nesting_says_so() -> None:
    payload = b"\x82\xa1x" + b"\x91" * 100_000 + b"\x01\xa4type\xa5hello"
    with pytest.raises(InvalidRequest, match=r"malformed agent message: .* nested too deeply"):
        p.decode_from_agent(payload)


def test_malformed_msgpack_says_so() -> None:
    with pytest.raises(InvalidRequest, match="malformed request: not one msgpack message"):
        p.decode_request(b"\xc1")


def test_replies_are_validated_too() -> None:
    def reject(raw: object, expected: str) -> None:
        with pytest.raises(InvalidRequest) as info:
            p.decode_reply(msgspec.msgpack.encode(raw))
        assert info.value.message.startswith("invalid reply: ")
        assert expected in info.value.message

    reject({"type": "get_zone", "id": 1, "name": "a"}, "known types: hello_reply")
    reject({"type": "error_reply", "id": 1, "code": "oops", "message": ""}, "$.code")
    reject({"type": "stream_end", "id": 1, "more": True}, "unknown field `more`")
    reject({"type": "log_chunk", "id": 1, "data": "text"}, "$.data")
    reject({"type": "log_chunk", "id": 1, "data": b"x" * (p.MAX_LOG_CHUNK + 1)}, "$.data")
    zone = msgspec.to_builtins(ZONE)
    reject({"type": "zone_reply", "id": 1, "zone": {**zone, "state": "odd"}}, "$.zone.state")
    reject({"type": "zone_reply", "id": 1, "zone": {**zone, "x": 1}}, "unknown field `x`")


# ---------------------------------------------------------------------------
# Errors and version negotiation
# ---------------------------------------------------------------------------


def test_error_reply_carries_the_exception_code() -> None:
    assert p.error_reply(5, NotFound("no zone named 'x'")) == p.ErrorReply(
        id=5, code="not_found", message="no zone named 'x'"
    )
    assert p.error_reply(6, Conflict("exists")).code == "conflict"


def test_error_reply_truncates_huge_messages() -> None:
    reply = p.error_reply(1, InvalidRequest("x" * 100_000))
    assert len(reply.message) == p.MAX_ERROR_MESSAGE_CHARS
    assert reply.message.endswith("...")


def test_negotiate_version_picks_the_highest_common_version() -> None:
    assert p.negotiate_version([1]) == p.PROTOCOL_VERSION == 1
    assert p.negotiate_version([7, 1, 3]) == 1


def test_negotiate_version_without_common_version() -> None:
    with pytest.raises(UnsupportedVersion, match=r"client offers \[2, 3\].*speaks \[1\]") as info:
        p.negotiate_version([3, 2])
    assert info.value.code == "unsupported_version"


def test_peek_request_id_recovers_the_id_of_an_invalid_request() -> None:
    assert p.peek_request_id(msgspec.msgpack.encode(_create(vcpus=0, id=77))) == 77
    assert p.peek_request_id(msgspec.msgpack.encode({"type": "nope", "id": 9})) == 9
    assert p.peek_request_id(msgspec.msgpack.encode({"type": "nope"})) is None
    assert p.peek_request_id(msgspec.msgpack.encode({"id": -1})) is None
    assert p.peek_request_id(b"\xc1") is None


# ---------------------------------------------------------------------------
# Agent channel
# ---------------------------------------------------------------------------


def _hello(**fields: Any) -> dict[str, Any]:
    base = {
        "type": "agent_hello",
        "version": 1,
        "agent": "zoned-agent/0.1",
        "kernel_release": "6.12.9",
        "boot_s": 1.0,
        "pid": 1,
    }
    return {**base, **fields}


def _beat(**fields: Any) -> dict[str, Any]:
    base = {
        "type": "heartbeat_reply",
        "seq": 1,
        "uptime_s": 1.0,
        "load1": 0.0,
        "mem_total_kib": 1,
        "mem_available_kib": 1,
    }
    return {**base, **fields}


AGENT_REJECTIONS: list[tuple[str, object, str]] = [
    ("host message from agent", {"type": "heartbeat", "seq": 1}, "known types: agent_hello"),
    ("control message", {"type": "host_info", "id": 1}, "$.type"),
    ("unknown field", _hello(shell="/bin/sh"), "unknown field `shell`"),
    ("NaN boot", _hello(boot_s=float("nan")), "$.boot_s"),
    ("infinite boot", _hello(boot_s=float("inf")), "$.boot_s"),
    ("negative boot", _hello(boot_s=-1.0), "$.boot_s"),
    ("escape in release", _hello(kernel_release="6.1\x1b[2J"), "$.kernel_release"),
    ("long release", _hello(kernel_release="6" * 65), "$.kernel_release"),
    ("empty agent", _hello(agent=""), "$.agent"),
    ("pid zero", _hello(pid=0), "$.pid"),
    ("version zero", _hello(version=0), "$.version"),
    ("NaN load", _beat(load1=float("nan")), "$.load1"),
    ("negative memory", _beat(mem_total_kib=-1), "$.mem_total_kib"),
    ("string seq", _beat(seq="1"), "$.seq"),
    ("negative seq", _beat(seq=-1), "$.seq"),
    ("huge uptime", _beat(uptime_s=1e300), "$.uptime_s"),
    ("exec id zero", {"type": "agent_exec_started", "exec_id": 0, "pid": 1}, "$.exec_id"),
    (
        "empty output",
        {"type": "agent_exec_output", "exec_id": 1, "stream": "stdout", "data": b""},
        "$.data",
    ),
    (
        "oversize output",
        {"type": "agent_exec_output", "exec_id": 1, "stream": "stdout", "data": b"x" * 65537},
        "$.data",
    ),
    (
        "bad stream",
        {"type": "agent_exec_output", "exec_id": 1, "stream": "stdin", "data": b"x"},
        "$.stream",
    ),
    ("exit 256", {"type": "agent_exec_exit", "exec_id": 1, "exit_code": 256}, "$.exit_code"),
    (
        "escape in error",
        {"type": "agent_exec_exit", "exec_id": 1, "error": "\x1b[2J"},
        "$.error",
    ),
    ("huge credit", {"type": "agent_exec_input_credit", "exec_id": 1, "bytes": 2**40}, "bytes"),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [(raw, exp) for _, raw, exp in AGENT_REJECTIONS],
    ids=[name for name, _, _ in AGENT_REJECTIONS],
)  # fmt: skip
def test_hostile_agent_messages_are_rejected(raw: object, expected: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        p.decode_from_agent(msgspec.msgpack.encode(raw))
    assert info.value.message.startswith("invalid agent message: ")
    assert expected in info.value.message


def test_the_agent_never_takes_an_empty_command() -> None:
    """Only the daemon's requests may leave argv empty (the image's command)."""
    with pytest.raises(InvalidRequest, match="argv must not be empty"):
        p.decode_to_agent(msgspec.msgpack.encode({"type": "agent_exec_start", "exec_id": 1}))
    start = p.AgentExecStart(exec_id=1, argv=["id"], groups=[4, 27])
    assert p.decode_to_agent(p.encode(start)) == start


def test_agent_side_rejects_unknown_host_messages() -> None:
    with pytest.raises(InvalidRequest, match=r"invalid host message: .*known types: heartbeat"):
        p.decode_to_agent(msgspec.msgpack.encode({"type": "exec_start", "seq": 1}))


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def _drain(decoder: p.FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_frame_decoder_reassembles_a_frame_fed_byte_by_byte() -> None:
    frame = p.encode_frame(REQUESTS[2])
    decoder = p.FrameDecoder(1024)
    for i in range(len(frame) - 1):
        decoder.feed(frame[i : i + 1])
        assert decoder.next_frame() is None
    decoder.feed(frame[-1:])
    assert _drain(decoder) == [p.encode(REQUESTS[2])]


def test_frame_decoder_splits_merged_frames() -> None:
    payloads = [p.encode(m) for m in REQUESTS]
    stream = b"".join(_frame(x) for x in payloads)
    decoder = p.FrameDecoder()
    # Chunks that straddle frame boundaries and headers.
    got: list[bytes] = []
    for start in range(0, len(stream), 7):
        decoder.feed(stream[start : start + 7])
        got.extend(_drain(decoder))
    assert got == payloads
    assert decoder.buffered == 0


def test_frame_decoder_accepts_memoryview_and_bytearray() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(bytearray(b"\x00\x00\x00\x02"))
    decoder.feed(memoryview(b"hi"))
    assert decoder.next_frame() == b"hi"


def test_frame_decoder_reports_a_truncated_frame_as_buffered() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(_frame(b"abc")[:5])
    assert decoder.next_frame() is None
    assert decoder.buffered == 5


def test_frame_of_exactly_the_maximum_is_accepted() -> None:
    decoder = p.FrameDecoder(16)
    decoder.feed(_frame(b"x" * 16))
    assert decoder.next_frame() == b"x" * 16


def test_oversize_header_is_rejected_before_the_body_arrives() -> None:
    decoder = p.FrameDecoder(4096)
    with pytest.raises(p.FrameError) as info:
        decoder.feed((5000).to_bytes(4, "big"))
    assert "5000" in info.value.message
    assert "4096" in info.value.message
    assert isinstance(info.value, InvalidRequest)
    assert info.value.code == "invalid_request"
    # The decoder stays broken and holds nothing.
    assert decoder.buffered == 0
    with pytest.raises(p.FrameError, match="5000"):
        decoder.feed(b"more")
    with pytest.raises(p.FrameError, match="5000"):
        decoder.next_frame()


def test_oversize_header_behind_a_good_frame_is_rejected_on_feed() -> None:
    decoder = p.FrameDecoder(8)
    with pytest.raises(p.FrameError, match="header announces 9 bytes, the maximum is 8"):
        decoder.feed(_frame(b"ok") + (9).to_bytes(4, "big"))


def test_default_maximum_is_four_mebibytes() -> None:
    assert p.DEFAULT_MAX_FRAME == 4 * 1024 * 1024
    assert p.AGENT_MAX_FRAME == 1024 * 1024
    decoder = p.FrameDecoder()
    decoder.feed((p.DEFAULT_MAX_FRAME).to_bytes(4, "big"))
    decoder = p.FrameDecoder()
    with pytest.raises(p.FrameError, match=f"maximum is {p.DEFAULT_MAX_FRAME} bytes"):
        decoder.feed((p.DEFAULT_MAX_FRAME + 1).to_bytes(4, "big"))


def test_zero_length_frame_is_rejected() -> None:
    decoder = p.FrameDecoder()
    with pytest.raises(p.FrameError, match="length 0"):
        decoder.feed(b"\x00\x00\x00\x00")


def test_frame_decoder_rejects_a_nonsense_maximum() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        p.FrameDecoder(0)
    with pytest.raises(ValueError, match="max_frame"):
        p.FrameDecoder(2**32)


def test_encode_frame_refuses_to_build_an_oversize_frame() -> None:
    chunk = p.LogChunk(id=1, data=b"x" * 1000)
    with pytest.raises(p.FrameError, match=r"LogChunk encodes to .* the maximum is 100 bytes"):
        p.encode_frame(chunk, max_frame=100)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

ids = st.integers(0, 2**32 - 1)
names = st.from_regex(r"[a-z][a-z0-9-]{0,62}", fullmatch=True)
kernel_args = st.lists(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    max_size=8,
)
label_values = st.text(
    st.characters(
        blacklist_categories=["Cs"],
        blacklist_characters=[chr(c) for c in range(0x20)] + ["\x7f", "\ufffe", "\uffff"],
    ),
    max_size=20,
)
labels = st.dictionaries(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,20}", fullmatch=True), label_values, max_size=4
)
floats = st.floats(allow_nan=False, allow_infinity=False)
small = st.integers(0, 2**32 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
cpu_lists = st.lists(small, max_size=8)
text = st.text(max_size=20)


def _one_of_literal(alias: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(get_args(alias))


zone_infos = st.builds(
    p.ZoneInfo,
    name=names,
    uuid=text,
    state=_one_of_literal(p.ZoneState),
    reason=text,
    vcpus=st.integers(1, 256),
    memory_mib=st.integers(p.MIN_MEMORY_MIB, 2**20),
    profile=text,
    machine=_one_of_literal(p.Machine),
    accelerator=_one_of_literal(p.Accelerator),
    placement=_one_of_literal(p.Placement),
    cpus=cpu_lists,
    emulator_cpus=cpu_lists,
    numa_node=st.none() | small,
    labels=labels,
    created_at=floats,
    ready_at=st.none() | floats,
    kernel_release=text,
    guest_boot_s=st.none() | floats,
    console_log=text,
)

host_infos = st.builds(
    p.HostInfoData,
    accelerator=_one_of_literal(p.Accelerator),
    machine=_one_of_literal(p.Machine),
    cpus=st.lists(
        st.builds(
            p.CpuInfo,
            id=small,
            core=int64,
            package=int64,
            node=int64,
            online=st.booleans(),
            reserved=st.booleans(),
            allocated_to=st.none() | text,
        ),
        max_size=4,
    ),
    numa_nodes=st.lists(
        st.builds(p.NumaNode, id=int64, cpus=cpu_lists, memory_mib=small), max_size=2
    ),
    memory_total_mib=small,
    memory_reserved_mib=small,
    memory_free_mib=small,
    cpus_free_exclusive=cpu_lists,
    shared_pool=cpu_lists,
    zone_count=small,
    kernels=st.lists(
        st.builds(
            p.KernelInfo,
            profile=text,
            kernel_release=text,
            image_sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
        ),
        max_size=2,
    ),
)

events = st.builds(
    p.Event,
    seq=small,
    time=floats,
    kind=_one_of_literal(p.EventKind),
    zone=text,
    state=text,
    previous=text,
    reason=text,
    cpu=st.none() | int64,
)

requests: st.SearchStrategy[p.Request] = st.one_of(
    st.builds(
        p.Hello,
        id=ids,
        versions=st.lists(st.integers(1, 2**32 - 1), min_size=1, max_size=16),
        client=text,
    ),
    st.builds(p.HostInfo, id=ids),
    st.builds(
        p.CreateZone,
        id=ids,
        name=names,
        vcpus=st.integers(1, 256),
        memory_mib=st.integers(p.MIN_MEMORY_MIB, 2**20),
        profile=names,
        kernel_args=kernel_args,
        placement=_one_of_literal(p.Placement),
        labels=labels,
        machine=st.none() | _one_of_literal(p.Machine),
    ),
    st.builds(p.GetZone, id=ids, name=names),
    st.builds(p.ListZones, id=ids, labels=labels),
    st.builds(p.DestroyZone, id=ids, name=names),
    st.builds(p.WatchEvents, id=ids),
    st.builds(
        p.ConsoleLog,
        id=ids,
        name=names,
        follow=st.booleans(),
        tail_bytes=st.none() | st.integers(0, 2**32 - 1),
    ),
)

replies: st.SearchStrategy[p.Reply] = st.one_of(
    st.builds(p.HelloReply, id=ids, version=int64, server=text),
    st.builds(p.HostInfoReply, id=ids, host=host_infos),
    st.builds(p.ZoneReply, id=ids, zone=zone_infos),
    st.builds(p.ZoneListReply, id=ids, zones=st.lists(zone_infos, max_size=3)),
    st.builds(p.EventReply, id=ids, event=events),
    st.builds(p.LogChunk, id=ids, data=st.binary(max_size=200)),
    st.builds(p.StreamEnd, id=ids),
    st.builds(p.ErrorReply, id=ids, code=st.sampled_from(get_args(ErrorCode)), message=text),
)

agent_tokens = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)
seconds = st.floats(0.0, 1e10)
uint63 = st.integers(0, 2**63 - 1)

from_agent: st.SearchStrategy[p.AgentToHost] = st.one_of(
    st.builds(
        p.AgentHello,
        version=st.integers(1, 2**32 - 1),
        agent=agent_tokens,
        kernel_release=agent_tokens,
        boot_s=seconds,
        pid=st.integers(1, 2**31 - 1),
    ),
    st.builds(
        p.HeartbeatReply,
        seq=uint63,
        uptime_s=seconds,
        load1=st.floats(0.0, 1e6),
        mem_total_kib=uint63,
        mem_available_kib=uint63,
    ),
)

to_agent: st.SearchStrategy[p.HostToAgent] = st.builds(p.Heartbeat, seq=uint63)

# (strategy, decoder, max_frame) for each direction of each channel.
CHANNELS: list[tuple[st.SearchStrategy[Any], Callable[[bytes], Any], int]] = [
    (requests, p.decode_request, p.DEFAULT_MAX_FRAME),
    (replies, p.decode_reply, p.DEFAULT_MAX_FRAME),
    (from_agent, p.decode_from_agent, p.AGENT_MAX_FRAME),
    (to_agent, p.decode_to_agent, p.AGENT_MAX_FRAME),
]


@PROPERTY_SETTINGS
@given(data=st.data())
def test_valid_messages_survive_encode_chunked_feed_decode(data: st.DataObject) -> None:
    strategy, decode, max_frame = data.draw(st.sampled_from(CHANNELS))
    messages = data.draw(st.lists(strategy, min_size=1, max_size=4))
    stream = b"".join(p.encode_frame(m, max_frame) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = p.FrameDecoder(max_frame)
    got: list[Any] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        got.extend(decode(frame) for frame in _drain(decoder))
    assert got == messages
    assert decoder.buffered == 0


@PROPERTY_SETTINGS
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_only_ever_raise_invalid_request(chunks: list[bytes]) -> None:
    decoder = p.FrameDecoder(256)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for frame in _drain(decoder):
                with contextlib.suppress(InvalidRequest):
                    p.decode_request(frame)
    except p.FrameError:
        pass
    for chunk in chunks:
        for decode in (p.decode_request, p.decode_reply, p.decode_from_agent):
            with contextlib.suppress(InvalidRequest):
                decode(chunk)


@PROPERTY_SETTINGS
@given(chunks=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4))
def test_arbitrary_payloads_in_valid_frames_only_raise_invalid_request(
    chunks: list[bytes],
) -> None:
    # Arbitrary bytes rarely form a plausible header; a real one lets them
    # reach the message decoder.
    decoder = p.FrameDecoder(64)
    decoder.feed(b"".join(_frame(c) for c in chunks))
    for frame in _drain(decoder):
        try:
            p.decode_request(frame)
        except InvalidRequest as exc:
            assert exc.message


ALL_TAGS = [
    cls.__struct_config__.tag
    for cls in [*get_args(p.Request), *get_args(p.Reply), *get_args(p.AgentToHost), p.Heartbeat]
]
FIELD_NAMES = sorted(
    {
        field
        for cls in [
            *get_args(p.Request),
            *get_args(p.Reply),
            *get_args(p.AgentToHost),
            p.Heartbeat,
        ]
        for field in cls.__struct_fields__
    }
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=8,
)
# Maps that look like messages: a real tag and real field names with random values.
message_like = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    st.sampled_from(ALL_TAGS) | text,
    st.dictionaries(st.sampled_from(FIELD_NAMES) | text, msgpack_values, max_size=6),
)


@PROPERTY_SETTINGS
@given(raw=message_like | msgpack_values)
def test_structured_garbage_only_raises_invalid_request(raw: object) -> None:
    payload = msgspec.msgpack.encode(raw)
    for decode in (p.decode_request, p.decode_reply, p.decode_from_agent, p.decode_to_agent):
        try:
            decode(payload)
        except InvalidRequest as exc:
            assert exc.message
    request_id = p.peek_request_id(payload)
    assert request_id is None or 0 <= request_id <= 2**32 - 1


# ---------------------------------------------------------------------------
# Lean imports (the guest agent imports this module on its boot path)
# ---------------------------------------------------------------------------


def test_protocol_imports_stay_lean() -> None:
    script = "import sys, zoned.protocol; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    forbidden = {"trio", "libvirt", "json", "subprocess", "asyncio", "psutil", "pyudev"}
    assert loaded & forbidden == set()
