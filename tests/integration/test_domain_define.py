"""Rendered domain XML against the real libvirtd (qemu:///system) and QEMU.

Every golden spec is defined in libvirtd, read back and undefined: libvirt
accepts our XML and keeps our metadata. A microvm and a q35 zone are then
booted with the project's guest kernel and a busybox initramfs, and their
serial console logs must show the kernel and init. A missing guest kernel
fails those tests with the command that builds it.

Domains are named ``<checkout prefix>dom-*`` and removed by each test. The deadline on a
boot only guards against hangs; nothing asserts timing.
"""

from __future__ import annotations

import dataclasses
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.integration.conftest import domain_name
from tests.tmpdirs import short_tmp_dir
from tests.unit.test_domain import GOLDEN_SPECS
from zoned.config import Config
from zoned.cpio import CpioWriter
from zoned.domain import METADATA_NS, DomainSpec, read_metadata, render_domain_xml
from zoned.errors import NotFound
from zoned.hostinfo import host_tsc_khz
from zoned.kernel.cmdline import hardened_cmdline
from zoned.kernel.store import find_kernel
from zoned.protocol import Machine

pytestmark = pytest.mark.integration

URI = "qemu:///system"
BUSYBOX = Path("/bin/busybox")
HANG_GUARD_S = 180
# Printed by the initramfs' /init; the last one only after the virtio ports showed up.
INIT_MARKER = "zt-dom: init runs"
PORT_MARKER = "zt-dom: port org.zoned.agent.0"
RNG_MARKER = "zt-dom: rng virtio_rng"
TRICKY_METADATA = (
    '{"name": "x", "labels": {"a": "<&>\'\\"", "b": "zoné ☃"}}\n\t'
    "</zoned:zone>]]> &amp; -- <!-- -->"
)

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox echo "{INIT_MARKER}"
for port in /sys/class/virtio-ports/*; do
    /bin/busybox echo "zt-dom: port $(/bin/busybox cat "$port/name")"
done
/bin/busybox echo "zt-dom: rng $(/bin/busybox cat /sys/class/misc/hw_random/rng_current)"
/bin/busybox poweroff -f
"""


@pytest.fixture
def conn() -> Iterator[Any]:
    connection = libvirt.open(URI)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # QEMU runs as libvirt-qemu and must reach the initramfs: pytest's own
    # tmp_path sits below a mode 0700 directory, so use one it can traverse.
    with short_tmp_dir("zt-dom-") as path:
        path.chmod(0o755)
        yield path


def _remove(conn: Any, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefine()


@pytest.mark.parametrize("golden", sorted(GOLDEN_SPECS))
def test_define_keeps_our_xml_and_metadata(conn: Any, workdir: Path, golden: str) -> None:
    spec = dataclasses.replace(
        GOLDEN_SPECS[golden],
        domain_name=domain_name(f"dom-{golden}"),
        uuid=str(uuid.uuid4()),  # the golden's own uuid is every checkout's
        console_log=workdir / "console.log",
        agent_socket=workdir / "agent.sock",
        metadata=TRICKY_METADATA,
    )
    _remove(conn, spec.domain_name)
    dom = conn.defineXML(render_domain_xml(spec))
    try:
        described = dom.XMLDesc(0)
        assert read_metadata(described) == TRICKY_METADATA
        element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        assert read_metadata(element) == TRICKY_METADATA
        assert dom.UUIDString() == spec.uuid
        # libvirt records q35 under its versioned name (pc-q35-7.2); microvm has none.
        machine = "pc-q35-" if spec.machine == "q35" else "microvm'"
        assert f"<type arch='x86_64' machine='{machine}" in described
        assert f"<domain type='{'kvm' if spec.accelerator == 'kvm' else 'qemu'}'" in described
        for vcpu, cpus in enumerate(spec.vcpu_pins):
            assert f"<vcpupin vcpu='{vcpu}' cpuset='{','.join(map(str, cpus))}'/>" in described
        if spec.machine == "microvm":
            # libvirt must not have swapped our virtio-mmio addresses for PCI ones.
            assert "type='pci'" not in described
            devices = 2 + (spec.rootfs is not None) + (spec.scratch_disk is not None)
            devices += spec.free_page_reporting + (spec.network is not None)  # and the NIC
            assert described.count("<address type='virtio-mmio'/>") == devices
        # libvirt 9.0 keeps the balloon's free page reporting and the TCG cache bound.
        assert ("freePageReporting='on'" in described) == spec.free_page_reporting
        if spec.accelerator == "tcg" and spec.tcg_tb_cache_mib is not None:
            assert f"<tb-cache unit='KiB'>{spec.tcg_tb_cache_mib * 1024}</tb-cache>" in described
    finally:
        dom.undefine()


def _guest_kernel() -> Path:
    store = Path(Config().kernel_store)
    try:
        return find_kernel(store, "strict").image
    except NotFound as exc:
        pytest.fail(
            "this test boots the project's guest kernel, which is missing "
            f"(expected {store}/strict/bzImage): {exc}"
        )


def _busybox_initramfs(path: Path) -> None:
    assert BUSYBOX.is_file(), f"{BUSYBOX} is missing: install Debian's busybox-static"
    out = io.BytesIO()
    writer = CpioWriter(out)
    for directory in ("bin", "dev", "proc", "sys"):
        writer.directory(directory)
    writer.char_device("dev/console", 5, 1)
    writer.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    writer.file("init", INIT_SCRIPT.encode(), mode=0o755)
    writer.finish()
    path.write_bytes(out.getvalue())
    path.chmod(0o644)


def _with_boot_messages(args: list[str]) -> str:
    # The zone command line keeps the console quiet (loglevel=4); this test
    # wants to see the kernel's informational lines ("Run /init ...") too.
    return " ".join("loglevel=7" if arg.startswith("loglevel=") else arg for arg in args)


@pytest.mark.parametrize("machine", ["microvm", "q35"])
def test_zone_boots_and_logs_its_console(conn: Any, workdir: Path, machine: Machine) -> None:
    kernel = _guest_kernel()
    initrd = workdir / "initramfs.cpio"
    _busybox_initramfs(initrd)
    tsc_khz = host_tsc_khz() if machine == "microvm" else None
    spec = DomainSpec(
        domain_name=domain_name(f"dom-boot-{machine}"),
        # A fresh uuid: libvirt refuses one uuid under two names, and other
        # checkouts sharing this libvirtd run the same test.
        uuid=str(uuid.uuid4()),
        vcpus=1,
        memory_mib=256,
        machine=machine,
        accelerator="tcg",
        kernel=kernel,
        initrd=initrd,
        cmdline=_with_boot_messages(hardened_cmdline("strict", machine, tsc_khz)),
        vcpu_pins=((0,),),
        emulator_cpus=(0, 1),
        numa_node=None,
        console_log=workdir / "console.log",
        agent_socket=workdir / "agent.sock",
        metadata='{"name": "boot"}',
    )
    _remove(conn, spec.domain_name)
    dom = conn.defineXML(render_domain_xml(spec))
    try:
        dom.create()
        # The agent channel's host end exists while the domain runs.
        assert spec.agent_socket.is_socket()
        deadline = time.monotonic() + HANG_GUARD_S
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.5)
        console = spec.console_log.read_text(errors="replace")
        assert not dom.isActive(), (
            f"the guest did not power off within {HANG_GUARD_S} s; console:\n{console[-3000:]}"
        )
        assert "Run /init as init process" in console, (
            f"no kernel output on the console:\n{console[-3000:]}"
        )
        assert INIT_MARKER in console, f"init wrote nothing to the console:\n{console[-3000:]}"
        assert PORT_MARKER in console, f"no agent port in the guest:\n{console[-3000:]}"
        assert RNG_MARKER in console, f"no virtio RNG in the guest:\n{console[-3000:]}"
    finally:
        _remove(conn, spec.domain_name)
