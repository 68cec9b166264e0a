"""Zone records: files written by earlier daemons still load, typed; the client's view."""

from __future__ import annotations

import json

import msgspec
import pytest

from zoned.protocol import ZoneInfo
from zoned.records import PlacementRecord, ZoneRecord, decode_record, encode_record, to_info
from zoned.zones import one_record_per_domain

# A record as the daemon wrote it before records were typed (state, machine,
# accelerator and placement policy were plain strings then, as they are in JSON).
OLD_RECORD = {
    "name": "web",
    "uuid": "6f1c1f0e-3c55-4c41-9d4b-0c9a8f7e5d21",
    "domain_name": "zoned-web",
    "state": "ready",
    "reason": "agent said hello",
    "vcpus": 2,
    "memory_mib": 256,
    "profile": "strict",
    "machine": "microvm",
    "accelerator": "tcg",
    "placement": {
        "policy": "exclusive",
        "vcpu_cpus": [[2], [3]],
        "emulator_cpus": [0],
        "numa_node": 0,
        "memory_mib": 256,
    },
    "labels": {"team": "a"},
    "kernel_args": [],
    "kernel_image": "/var/lib/zoned/kernels/strict-0123/bzImage",
    "kernel_sha256": "ab" * 32,
    "boot_image": "/var/lib/zoned/images/agent-0123.cpio",
    "cmdline": "console=ttyS0 zoned.zone=web",
    "console_log": "/var/log/zoned/web.console.log",
    "agent_socket": "/run/zoned/zones/web/agent.sock",
    "created_at": 1714564800.0,
    "ready_at": 1714564802.5,
    "kernel_release": "6.12.9-zoned",
    "guest_boot_s": 1.25,
    "rootfs": "/var/lib/zoned/oci/roots/" + "cd" * 32 + ".erofs",
    "owner": "/var/lib/zoned",
    "image": "default",
    "image_id": "sha256:" + "cd" * 32,
    "writable_layer": "disk",
    "writable_layer_mib": 4096,
    "scratch_disk": "/var/lib/zoned/scratch/web-6f1c1f0e-3c55-4c41-9d4b-0c9a8f7e5d21.ext4",
}


# What a record from before owners and per-zone QEMU uids gets: root's, no uid
# of its own (its QEMU runs as libvirt-qemu), nothing checked or limited.
ISOLATION_DEFAULTS = {
    "owner_uid": 0,
    "qemu_uid": None,
    "boot_image_sha256": "",
    "rootfs_sha256": "",
    "kernel_config_sha256": "",
    "memory_hard_limit_mib": None,
    "pids_limit": None,
    "pids_cgroup": "",
    "network": None,
    "net_address": "",
    "net_address6": "",
    "net_status": None,
    "pool": "",
    "from_pool": "",
}
#: Fields added after those, with their defaults.
LATER_DEFAULTS = {"failure": ""}


def test_an_old_record_file_loads_and_writes_back_the_same_json() -> None:
    text = json.dumps(OLD_RECORD)
    record = decode_record(text)
    assert (record.state, record.machine, record.accelerator) == ("ready", "microvm", "tcg")
    assert record.placement.policy == "exclusive"
    assert json.loads(encode_record(record)) == {
        **OLD_RECORD,
        **ISOLATION_DEFAULTS,
        **LATER_DEFAULTS,
    }


def test_a_zone_from_before_owners_is_roots_and_says_its_qemu_is_shared() -> None:
    info = to_info(decode_record(json.dumps(OLD_RECORD)))
    assert (info.owner_uid, info.qemu_uid, info.qemu_gid) == (0, None, None)
    assert "libvirt-qemu" in info.seclabel and "before per-zone uids" in info.seclabel
    record = decode_record(json.dumps({**OLD_RECORD, "owner_uid": 1000, "qemu_uid": 2013265925}))
    info = to_info(record)
    assert (info.owner_uid, info.qemu_uid, info.qemu_gid) == (1000, 2013265925, 2013265925)
    assert info.seclabel == "dac static +2013265925:+2013265925, relabel no"


def test_a_record_from_before_the_optional_fields_loads_with_defaults() -> None:
    oldest = {
        k: v
        for k, v in OLD_RECORD.items()
        if k not in ("reason", "labels", "kernel_args", "ready_at", "kernel_release")
        and k not in ("guest_boot_s", "rootfs", "owner")
        and k not in ("image", "image_id", "writable_layer", "writable_layer_mib", "scratch_disk")
    }
    record = decode_record(json.dumps(oldest))
    assert (record.reason, record.labels, record.rootfs, record.owner) == ("", {}, "", "")
    assert record.ready_at is None and record.guest_boot_s is None
    # A zone from before images: the built-in root's settings, no scratch disk.
    assert (record.image, record.image_id, record.scratch_disk) == ("", "", "")


@pytest.mark.parametrize(
    ("field", "value"),
    [("state", "running"), ("machine", "pc"), ("accelerator", "hvf")],
)
def test_a_value_outside_the_vocabulary_is_a_corrupt_record(field: str, value: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        decode_record(json.dumps({**OLD_RECORD, field: value}))


def test_an_unknown_placement_policy_is_a_corrupt_record() -> None:
    bad = {**OLD_RECORD, "placement": {**OLD_RECORD["placement"], "policy": "dedicated"}}  # type: ignore[dict-item]
    with pytest.raises(msgspec.ValidationError, match="policy"):
        decode_record(json.dumps(bad))


def test_the_clients_view_spells_out_the_placement() -> None:
    record = decode_record(json.dumps(OLD_RECORD))
    info = to_info(record)
    assert (info.placement, info.cpus, info.emulator_cpus, info.numa_node) == (
        "exclusive",
        [2, 3],
        [0],
        0,
    )
    assert info.labels == {"team": "a"}
    # The view is a copy: changing it does not reach the record.
    info.labels["team"] = "b"
    assert record.labels == {"team": "a"}


def test_a_shared_zone_lists_no_cpus_per_vcpu() -> None:
    record = decode_record(json.dumps(OLD_RECORD))
    shared = msgspec.structs.replace(
        record,
        placement=PlacementRecord(
            policy="shared",
            vcpu_cpus=[[0, 1], [0, 1]],
            emulator_cpus=[],
            numa_node=None,
            memory_mib=256,
        ),
    )
    info = to_info(shared)
    assert (info.placement, info.cpus, info.numa_node) == ("shared", [], None)


def test_every_info_field_is_filled_from_the_record() -> None:
    """A field added to both ZoneInfo and ZoneRecord is carried without more code."""
    info = msgspec.structs.asdict(to_info(decode_record(json.dumps(OLD_RECORD))))
    record_fields = set(ZoneRecord.__struct_fields__)
    for name in ZoneInfo.__struct_fields__:
        if name in record_fields and name != "placement":
            assert info[name] == {**OLD_RECORD, **ISOLATION_DEFAULTS, **LATER_DEFAULTS}[name], name


def test_an_acquire_cut_short_leaves_one_record_per_domain_the_acquired_one() -> None:
    """A restart between an acquire's two writes finds the pool zone's record
    and the acquired one for one domain: the acquired one is kept."""
    pooled = msgspec.structs.replace(
        decode_record(json.dumps(OLD_RECORD)), name="pool-py-0a0b0c0d", pool="py"
    )
    acquired = msgspec.structs.replace(pooled, name="web", pool="", from_pool="py")
    other = msgspec.structs.replace(pooled, name="pool-py-1", domain_name="zoned-pool-py-1")
    for order in ([pooled, acquired, other], [acquired, pooled, other]):
        kept, dropped = one_record_per_domain({r.name: r for r in order})
        assert kept == {"web": acquired, "pool-py-1": other}
        assert dropped == ["pool-py-0a0b0c0d"]
