"""The persisted record of one zone (pure).

A record is written atomically to ``<state_dir>/zones/<name>.json`` on every
state change and is also embedded in the running domain's ``<metadata>``, so
that a restarted daemon can re-adopt a zone from either. New fields get
defaults; no field changes type (records outlive daemon versions). The
literal-typed fields (state, machine, accelerator, placement policy) are
plain strings in the JSON, so records written before they were typed load
as they are; a value outside the literal is a corrupt record.
"""

from __future__ import annotations

from typing import Final

import msgspec

from zoned.access import ROOT_UID
from zoned.net.policy import ZoneNetSpec
from zoned.protocol import Accelerator, Machine, NetStatus, ZoneInfo, ZoneState
from zoned.protocol import Placement as PlacementPolicy


class PlacementRecord(msgspec.Struct, frozen=True, kw_only=True):
    policy: PlacementPolicy
    # Host CPU set each vCPU is pinned to, by vCPU index.
    vcpu_cpus: list[list[int]]
    emulator_cpus: list[int]
    numa_node: int | None
    memory_mib: int


class ZoneRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    uuid: str
    domain_name: str
    state: ZoneState
    reason: str = ""
    vcpus: int
    memory_mib: int
    profile: str
    machine: Machine
    accelerator: Accelerator
    placement: PlacementRecord
    labels: dict[str, str] = {}
    kernel_args: list[str] = []
    kernel_image: str
    kernel_sha256: str
    boot_image: str
    cmdline: str
    console_log: str
    agent_socket: str
    created_at: float
    ready_at: float | None = None
    kernel_release: str = ""
    guest_boot_s: float | None = None
    # The workload root image attached to the zone ("" for none).
    rootfs: str = ""
    # The state directory of the daemon that owns the zone: a daemon adopts
    # only its own zones from libvirt (private daemons share one libvirtd).
    owner: str = ""
    # The uid that created the zone (SO_PEERCRED); zones recorded before
    # owners existed belong to root.
    owner_uid: int = ROOT_UID
    # The uid and gid (the same number) its QEMU runs as; None for zones
    # created before per-zone uids (they run as libvirt-qemu).
    qemu_uid: int | None = None
    # Hashes of the zone's boot image and workload root as checked at its start.
    boot_image_sha256: str = ""
    rootfs_sha256: str = ""
    kernel_config_sha256: str = ""
    # QEMU's cgroup limits as applied after the start (None: not set), and the
    # pids cgroup zoned made for it ("" for none).
    memory_hard_limit_mib: int | None = None
    pids_limit: int | None = None
    pids_cgroup: str = ""
    # The workload root (docs/images.md): the image as asked for, its id
    # ("builtin" for the built-in root; "" for zones made before images),
    # where the zone's writes go ("tmpfs" or "disk") and how many MiB they may
    # take, and the scratch disk of a "disk" zone ("" for none).
    image: str = ""
    image_id: str = ""
    writable_layer: str = ""
    writable_layer_mib: int | None = None
    scratch_disk: str = ""
    # The zone's network (None: none): slot, policy, publishes; a restarted
    # daemon re-adopts it from here. Its guest addresses, and its helper's
    # state as last seen.
    network: ZoneNetSpec | None = None
    net_address: str = ""
    net_address6: str = ""
    net_status: NetStatus | None = None
    # Why a failed zone failed (zoned.failures.CAUSES; "" otherwise).
    failure: str = ""
    # Warm pools (zoned.pools): the pool a booted, never-used zone waits in
    # ("" for a zone somebody asked for), and the pool an acquired zone came
    # from. A pool zone keeps its first name as ``domain_name`` and in its
    # host paths when it is renamed at acquire.
    pool: str = ""
    from_pool: str = ""


#: What a record and the client's view share by name and meaning: carried as they are.
_SHARED_WITH_INFO: Final = tuple(
    name
    for name in ZoneInfo.__struct_fields__
    if name in ZoneRecord.__struct_fields__ and name not in ("placement", "labels")
)


_STATIC_LABEL: Final = "dac static +{uid}:+{gid}, relabel no"
#: The label every zone gets, in words (``zonectl host``).
ZONES_SECLABEL: Final = _STATIC_LABEL.format(uid="<zone uid>", gid="<zone gid>")


def seclabel(qemu_uid: int | None) -> str:
    """libvirt's security label of a zone's domain, in words."""
    if qemu_uid is None:
        return "dac: shared user libvirt-qemu (zone created before per-zone uids)"
    return _STATIC_LABEL.format(uid=qemu_uid, gid=qemu_uid)


def to_info(record: ZoneRecord) -> ZoneInfo:
    """The client's view of a record: the shared fields, and the placement spelled out."""
    placement = record.placement
    pins = placement.vcpu_cpus
    return ZoneInfo(
        **{name: getattr(record, name) for name in _SHARED_WITH_INFO},
        labels=dict(record.labels),
        placement=placement.policy,
        # One host CPU per vCPU is listed; any wider pin set says nothing per vCPU.
        cpus=[cpus[0] for cpus in pins] if all(len(c) == 1 for c in pins) else [],
        emulator_cpus=list(placement.emulator_cpus),
        numa_node=placement.numa_node,
        qemu_gid=record.qemu_uid,
        seclabel=seclabel(record.qemu_uid),
        net=record.network.policy.describe() if record.network is not None else None,
        publishes=[str(p) for p in record.network.publishes] if record.network else [],
    )


def encode_record(record: ZoneRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_record(data: bytes | str) -> ZoneRecord:
    return msgspec.json.decode(data, type=ZoneRecord)
