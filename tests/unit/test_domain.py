"""Domain XML rendering (pure): golden files, metadata round trips, rejections.

Set ``UPDATE_GOLDEN=1`` to rewrite ``tests/golden/<name>.xml`` from the
current renderer; review the diff before committing it.
"""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.goldenfiles import assert_matches_golden
from zoned.agent import AGENT_PORT_NAME
from zoned.domain import (
    METADATA_NS,
    DomainSpec,
    metadata_element,
    read_metadata,
    render_domain_xml,
)
from zoned.errors import HypervisorError, InternalError
from zoned.net.addressing import NetPools, kernel_ip_argument, zone_addressing
from zoned.topology import format_cpulist

_RECORD = {
    "name": "alpha",
    "labels": {"team": "a&b <c>", "quote": 'it\'s "fine"'},
    "cpus": [2, 3],
}


def _spec(name: str, **changes: object) -> DomainSpec:
    zone_dir = Path("/run/zoned/zones") / name
    base = DomainSpec(
        domain_name=f"zoned-{name}",
        uuid="6f1c1f0e-3c55-4c41-9d4b-0c9a8f7e5d21",
        vcpus=2,
        memory_mib=256,
        machine="microvm",
        accelerator="tcg",
        kernel=Path("/var/lib/zoned/kernels/strict/bzImage"),
        initrd=zone_dir / "boot.cpio",
        cmdline="console=ttyS0 panic=-1 tsc_early_khz=2445430",
        vcpu_pins=(),
        emulator_cpus=(),
        numa_node=None,
        console_log=Path("/var/log/zoned") / f"{name}.console.log",
        agent_socket=zone_dir / "agent.sock",
        metadata=json.dumps({**_RECORD, "name": name}, sort_keys=True),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# The golden specs; the integration test defines each of them in libvirtd.
GOLDEN_SPECS: dict[str, DomainSpec] = {
    "microvm-tcg-pinned-numa": _spec(
        "alpha",
        vcpu_pins=((0,), (1,)),
        emulator_cpus=(0, 1),
        numa_node=0,
    ),
    "q35-tcg-unpinned": _spec(
        "beta",
        uuid="0b7e4a57-8f0e-4d8c-a1d6-2d4f3f1f7c90",
        vcpus=1,
        memory_mib=512,
        machine="q35",
        cmdline="console=ttyS0 panic=-1",
        free_page_reporting=True,
    ),
    "microvm-tcg-rootfs": _spec(
        "delta",
        uuid="5e0c7d1a-9b2f-4e3a-8c6d-7f1a2b3c4d5e",
        vcpus=1,
        rootfs=Path("/var/lib/zoned/images/workload-0123456789abcdef.erofs"),
        qemu_uid=2013265921,
        free_page_reporting=True,
        tcg_tb_cache_mib=64,
    ),
    "q35-tcg-image-scratch": _spec(
        "epsilon",
        uuid="7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        vcpus=1,
        machine="q35",
        rootfs=Path("/var/lib/zoned/oci/roots/" + "ab" * 32 + ".erofs"),
        scratch_disk=Path("/var/lib/zoned/scratch/epsilon-7a1b2c3d.ext4"),
        qemu_uid=2013265930,
    ),
    "microvm-tcg-net": _spec(
        "epsilon",
        uuid="7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        vcpus=1,
        cmdline="console=ttyS0 panic=-1 " + kernel_ip_argument(zone_addressing(NetPools(), 1)),
        rootfs=Path("/var/lib/zoned/images/workload-0123456789abcdef.erofs"),
        qemu_uid=2013265922,
        network=zone_addressing(NetPools(), 1),
    ),
    "microvm-kvm-exclusive": _spec(
        "gamma",
        uuid="c3d2e1f0-1a2b-4c3d-8e4f-5a6b7c8d9e0f",
        vcpus=4,
        memory_mib=1024,
        accelerator="kvm",
        cmdline="console=ttyS0 panic=-1",
        vcpu_pins=((4,), (5,), (6,), (7,)),
        emulator_cpus=(1,),
        numa_node=0,
        qemu_uid=2013265999,
        free_page_reporting=True,
        tcg_tb_cache_mib=64,
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden(name: str) -> None:
    rendered = render_domain_xml(GOLDEN_SPECS[name])
    assert_matches_golden(rendered, f"{name}.xml")


def test_rendering_is_deterministic() -> None:
    spec = GOLDEN_SPECS["microvm-tcg-pinned-numa"]
    assert render_domain_xml(spec) == render_domain_xml(dataclasses.replace(spec))


def _parse(spec: DomainSpec) -> ET.Element:
    return ET.fromstring(render_domain_xml(spec))


def test_a_zone_with_its_own_uid_gets_a_static_label_that_relabels_nothing() -> None:
    seclabels = _parse(_spec("a", qemu_uid=2013265921)).findall("seclabel")
    assert [(e.attrib, e.findtext("label")) for e in seclabels] == [
        ({"type": "static", "model": "dac", "relabel": "no"}, "+2013265921:+2013265921")
    ]
    # No per-device labels: nothing of the zone is relabelled at all.
    assert _parse(_spec("a", qemu_uid=2013265921)).findall("devices//seclabel") == []
    assert _parse(_spec("a")).findall("seclabel") == []


@pytest.mark.parametrize("uid", [0, -1, 2**31 - 1, 2**32])
def test_root_and_out_of_range_qemu_uids_are_refused(uid: int) -> None:
    with pytest.raises(InternalError, match="not a uid a zone may run as"):
        _spec("a", qemu_uid=uid)


def test_accelerator_picks_domain_type_and_cpu_model() -> None:
    tcg = _parse(_spec("a"))
    assert tcg.get("type") == "qemu"
    assert tcg.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    kvm = _parse(_spec("a", accelerator="kvm"))
    assert kvm.get("type") == "kvm"
    assert kvm.find("cpu").get("mode") == "host-model"  # type: ignore[union-attr]


def test_microvm_devices_have_virtio_mmio_addresses_q35_lets_libvirt_choose() -> None:
    microvm = _parse(_spec("a"))
    for path in ("devices/controller[@type='virtio-serial']", "devices/rng"):
        assert microvm.find(f"{path}/address").get("type") == "virtio-mmio"  # type: ignore[union-attr]
    q35 = _parse(_spec("a", machine="q35"))
    assert q35.findall(".//address") == []
    assert q35.find("features/vmport").get("state") == "off"  # type: ignore[union-attr]
    assert microvm.find("features/vmport") is None


def test_no_disks_network_graphics_or_balloon() -> None:
    for machine in ("microvm", "q35"):
        root = _parse(_spec("a", machine=machine))
        devices = root.find("devices")
        assert devices is not None
        tags = sorted(child.tag for child in devices)
        assert tags == [
            "channel",
            "controller",
            "controller",
            "emulator",
            "memballoon",
            "rng",
            "serial",
        ]
        assert devices.find("memballoon").get("model") == "none"  # type: ignore[union-attr]
        assert root.find("features/tcg") is None
        assert root.find("os/boot") is None
        assert root.find("os/loader") is None
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            assert root.findtext(event) == "destroy"


def test_the_balloon_is_for_free_page_reporting_only() -> None:
    for machine in ("microvm", "q35"):
        root = _parse(_spec("a", machine=machine, free_page_reporting=True))
        balloons = root.findall("devices/memballoon")
        assert len(balloons) == 1
        balloon = balloons[0]
        assert balloon.attrib == {"model": "virtio", "freePageReporting": "on"}
        # No statistics period: nothing the guest says through it is read.
        assert balloon.find("stats") is None
        address = balloon.find("address")
        assert (address is not None and address.get("type") == "virtio-mmio") == (
            machine == "microvm"
        )


def test_the_translation_cache_is_bounded_under_tcg_only() -> None:
    root = _parse(_spec("a", tcg_tb_cache_mib=64))
    cache = root.find("features/tcg/tb-cache")
    assert cache is not None and cache.text == "64" and cache.get("unit") == "MiB"
    assert _parse(_spec("a", accelerator="kvm", tcg_tb_cache_mib=64)).find("features/tcg") is None
    with pytest.raises(InternalError, match="translation cache"):
        _spec("a", tcg_tb_cache_mib=0)


def test_a_networked_zone_has_one_virtio_nic_on_its_own_unmanaged_tap() -> None:
    addr = zone_addressing(NetPools(), 3)
    for machine, mmio in (("microvm", True), ("q35", False)):
        root = _parse(_spec("a", machine=machine, network=addr))
        (nic,) = root.findall("devices/interface")
        assert nic.get("type") == "ethernet"
        assert nic.find("target").attrib == {"dev": addr.ifname, "managed": "no"}  # type: ignore[union-attr]
        assert nic.find("mac").get("address") == addr.mac  # type: ignore[union-attr]
        assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]
        assert (nic.find("address") is not None) == mmio


def test_workload_root_is_one_read_only_virtio_disk() -> None:
    for machine in ("microvm", "q35"):
        image = Path("/var/lib/zoned/images/workload.erofs")
        root = _parse(_spec("a", machine=machine, rootfs=image))
        disks = root.findall("devices/disk")
        assert len(disks) == 1
        disk = disks[0]
        assert disk.find("source").get("file") == str(image)  # type: ignore[union-attr]
        assert disk.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
        assert disk.find("readonly") is not None
        address = disk.find("address")
        assert (address is not None) == (machine == "microvm")
    with pytest.raises(InternalError, match="rootfs path"):
        _spec("a", rootfs=Path("relative.erofs"))


def test_disks_carry_serials_and_are_never_relabelled() -> None:
    """The agent finds its disks by serial; libvirt must not chown the shared image:
    the domain's static label says so for every disk, else each disk does."""
    for machine in ("microvm", "q35"):
        spec = _spec(
            "a",
            machine=machine,
            rootfs=Path("/var/lib/zoned/oci/roots/x.erofs"),
            scratch_disk=Path("/var/lib/zoned/scratch/a.ext4"),
            qemu_uid=2013265921,
        )
        (domain_label,) = _parse(spec).findall("seclabel")
        assert domain_label.get("relabel") == "no"
        assert _parse(spec).findall("devices/disk/source/seclabel") == []
        root = _parse(dataclasses.replace(spec, qemu_uid=None))
        image, scratch = root.findall("devices/disk")
        assert [d.findtext("serial") for d in (image, scratch)] == [
            "zoned-image",
            "zoned-writable",
        ]
        assert [d.find("target").get("dev") for d in (image, scratch)] == ["vda", "vdb"]  # type: ignore[union-attr]
        assert image.find("readonly") is not None
        assert scratch.find("readonly") is None
        for disk in (image, scratch):
            label = disk.find("source/seclabel")
            assert label is not None
            assert (label.get("model"), label.get("relabel")) == ("dac", "no")
    with pytest.raises(InternalError, match="scratch disk path"):
        _spec("a", scratch_disk=Path("relative.ext4"))


def test_agent_channel_and_console_log() -> None:
    spec = _spec("a")
    root = _parse(spec)
    channel = root.find("devices/channel[@type='unix']")
    assert channel is not None
    assert channel.find("source").attrib == {  # type: ignore[union-attr]
        "mode": "bind",
        "path": str(spec.agent_socket),
    }
    assert channel.find("target").get("name") == AGENT_PORT_NAME  # type: ignore[union-attr]
    log = root.find("devices/serial[@type='pty']/log")
    assert log is not None
    assert log.attrib == {"file": str(spec.console_log), "append": "off"}


def test_pinning_and_numa() -> None:
    root = _parse(
        _spec("a", vcpus=3, vcpu_pins=((4, 5, 6, 9), (7,), (0, 2)), emulator_cpus=(1,), numa_node=1)
    )
    pins = [(p.get("vcpu"), p.get("cpuset")) for p in root.findall("cputune/vcpupin")]
    assert pins == [("0", "4-6,9"), ("1", "7"), ("2", "0,2")]
    assert root.find("cputune/emulatorpin").get("cpuset") == "1"  # type: ignore[union-attr]
    numa = root.find("numatune/memory")
    assert numa is not None
    assert numa.attrib == {"mode": "strict", "nodeset": "1"}
    unpinned = _parse(_spec("a"))
    assert unpinned.find("cputune") is None
    assert unpinned.find("numatune") is None
    emulator_only = _parse(_spec("a", emulator_cpus=(0,)))
    assert emulator_only.findall("cputune/vcpupin") == []
    assert emulator_only.find("cputune/emulatorpin") is not None


def test_cpusets_use_the_cpulist_syntax() -> None:
    assert format_cpulist([]) == ""
    assert format_cpulist([3]) == "3"
    assert format_cpulist([5, 0, 1, 2, 2, 7, 8]) == "0-2,5,7-8"


_METADATA_CASES = [
    "",
    "{}",
    json.dumps(_RECORD),
    '{"x": "<zoned:zone>&amp;</metadata>]]>"}',
    "text with 'quotes' \"double\" & ampersands < > and \t tab\nnewline",
    json.dumps({"unicode": "zoné ☃ \U0001f600"}, ensure_ascii=False),
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("metadata", _METADATA_CASES)
def test_metadata_round_trips(metadata: str) -> None:
    xml = render_domain_xml(_spec("a", metadata=metadata))
    assert read_metadata(xml) == metadata


@pytest.mark.parametrize("metadata", _METADATA_CASES)
def test_metadata_element_for_live_updates_round_trips(metadata: str) -> None:
    assert read_metadata(metadata_element(metadata)) == metadata


def test_metadata_element_alone_is_accepted() -> None:
    # virDomainGetMetadata returns just our element, without its namespace.
    assert read_metadata('<zone>{"a": "&lt;"}</zone>') == '{"a": "<"}'
    element = f'<zoned:zone xmlns:zoned="{METADATA_NS}">{{"a": "&lt;"}}</zoned:zone>'
    assert read_metadata(element) == '{"a": "<"}'


def test_metadata_absent_or_foreign() -> None:
    assert read_metadata("<domain type='qemu'><name>x</name></domain>") is None
    foreign = (
        "<domain><metadata><other:zone xmlns:other='https://example.org/x'>{}</other:zone>"
        "</metadata></domain>"
    )
    assert read_metadata(foreign) is None
    with pytest.raises(HypervisorError, match="does not parse"):
        read_metadata("<domain>")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"vcpus": 0}, "vCPU"),
        ({"memory_mib": 0}, "memory"),
        ({"machine": "pc"}, "machine"),
        ({"accelerator": "hvf"}, "accelerator"),
        ({"vcpu_pins": ((0,),)}, "pins"),
        ({"vcpu_pins": ((0,), ())}, "at least one host CPU"),
        ({"vcpu_pins": ((0,), (-1,))}, "negative"),
        ({"emulator_cpus": (-2,)}, "negative"),
        ({"numa_node": -1}, "NUMA"),
        ({"kernel": Path("bzImage")}, "not absolute"),
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"uuid": "6F1C1F0E-3C55-4C41-9D4B-0C9A8F7E5D21"}, "uuid"),
        ({"domain_name": ""}, "domain name"),
        ({"domain_name": "a/b"}, "domain name"),
        ({"metadata": "nul \x00"}, "metadata"),
        ({"metadata": "cr \r"}, "metadata"),
        ({"metadata": "escape \x1b"}, "metadata"),
        ({"metadata": "surrogate \ud800"}, "metadata"),
        ({"cmdline": "console=ttyS0\x07"}, "cmdline"),
    ],
)
def test_bad_specs_are_refused(changes: dict[str, object], match: str) -> None:
    with pytest.raises(InternalError, match=match):
        _spec("a", **changes)
