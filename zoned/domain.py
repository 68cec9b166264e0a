"""libvirt domain XML of a zone, rendered from typed values (pure).

:func:`render_domain_xml` turns a :class:`DomainSpec` into the domain XML that
the shell hands to libvirt; the output is deterministic (golden-file tested).
:func:`read_metadata` reads back the zone record that the XML carries in its
``<metadata>`` under :data:`METADATA_NS`: that is how a restarted daemon
recognises and re-adopts its zones.

What a zone's domain is, and why (measured with libvirt 9.0 and QEMU 7.2):

- Direct kernel boot of the project's own kernel and initramfs; no firmware
  choice, no ``<boot dev>``, no disks, no network (unless the zone has
  one: then one virtio NIC on the tap zoned made, ``<interface type='ethernet'>``
  with ``managed='no'``, :func:`zoned.net.addressing.interface_element`), no graphics, no USB.
  Entropy comes from a virtio RNG fed by ``/dev/urandom``.
- A virtio balloon only for free page reporting (``free_page_reporting``):
  the guest tells QEMU which of its free pages it may drop, and QEMU
  discards them (the host gets the memory back; a page the guest touches
  again is a fresh zero page). The guest can only give memory back this
  way, never take more than its ``<memory>``; the daemon never inflates the
  balloon and asks for no statistics (``<stats period>``), so nothing the
  guest says through it is read. Without ``free_page_reporting`` the balloon
  is ``model='none'``, as before.
- Under TCG, ``<features><tcg><tb-cache>`` bounds QEMU's translation cache
  (QEMU 7.2's default is 1 GiB, filled as the guest runs new code: about
  100 MiB per zone after boot and a few Python starts, docs/fast-start.md).
- Every guest-initiated exit (poweroff, reboot, crash) destroys the domain:
  a zone never reboots itself; the daemon decides what happens next.
- ``<features><acpi/>`` on both machines. Without it libvirt passes
  ``-no-acpi``; on microvm the guest then still boots (QEMU lists the
  virtio-mmio devices on the kernel command line, the UART is found at its
  legacy port) but cannot power off: "Power off not available: System halted
  instead", and the domain runs on forever. With ACPI, QEMU describes the
  UART (found through PNP) and the virtio-mmio devices in ACPI tables.
- microvm has no PCI bus: every virtio device (the virtio-serial controller,
  the RNG) needs an explicit ``<address type='virtio-mmio'/>``, and USB must
  be refused with ``<controller type='usb' model='none'/>``; otherwise
  libvirt 9.0 picks a PCI address and fails with "No PCI buses available".
  On q35 libvirt picks PCI addresses (and adds its own pcie-root-ports and
  the built-in SATA controller); ``model='none'`` keeps out a qemu-xhci USB
  controller, and ``<vmport state='off'/>`` the VMware I/O port (libvirt
  refuses vmport on microvm).
- CPU model: ``host-model`` under KVM; ``maximum`` (QEMU's ``-cpu max``)
  under TCG, the most capable model TCG emulates.
- vCPU pinning (``<vcpupin>``), emulator pinning (``<emulatorpin>``) and
  ``<numatune>`` come from the placement allocator.
- QEMU runs as the zone's own uid and gid (:mod:`zoned.zoneids`):
  ``<seclabel type='static' model='dac' relabel='no'>`` with the label
  ``+UID:+GID``. ``relabel='no'``: libvirt never hands a file of the zone to
  that uid. The kernel, initramfs and workload root are shared by every zone
  and stay root-owned and read-only (QEMU opens them by path: 0644 files in
  0755/0751 directories); the console log is opened by virtlogd and the agent
  socket is made by libvirtd, both passed to QEMU as descriptors. libvirt
  still gives the domain's own directory (``/var/lib/libvirt/qemu/domain-*``,
  the master key) to the uid; its parent must be traversable by others
  (:mod:`zoned.hostsetup`), or QEMU fails on ``master-key.aes``. A static
  label carries no supplementary groups: on a KVM host ``/dev/kvm`` must be
  usable by others (0666) for zones to use KVM.
- Disks: the workload root (an image's EROFS, shared by every zone of that
  image) read-only, and optionally the zone's own scratch disk (its
  writable layer, an ext4 file the daemon makes with the zone's QEMU uid as
  owner). Each carries ``<serial>``: the guest agent finds its disks by it,
  not by probe order. libvirt must never re-own a disk (a shared image
  chowned to one zone's QEMU would be writable by it): the domain's static
  label says ``relabel='no'`` for all of them; a domain without one (no
  ``qemu_uid``) gets ``<seclabel model='dac' relabel='no'/>`` on each disk's
  source instead (libvirt 9.0 refuses that override under a domain-level
  ``relabel='no'``: "label overrides require relabeling to be enabled").
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from uuid import UUID

from zoned.agent import AGENT_PORT_NAME
from zoned.errors import HypervisorError, InternalError
from zoned.net.addressing import ZoneAddressing, interface_element
from zoned.protocol import Accelerator, Machine

# libvirt's cpuset syntax is the kernel's cpulist syntax ("0-2,5").
from zoned.topology import format_cpulist

#: Namespace of the zone record inside ``<metadata>`` (also the URI to pass to
#: libvirt's ``virDomainGetMetadata``).
METADATA_NS: Final = "https://zoned.dev/xmlns/zone/1"
#: Prefix of :data:`METADATA_NS` in rendered XML.
METADATA_PREFIX: Final = "zoned"
#: Local name of the element that holds the zone record (JSON text).
METADATA_ELEMENT: Final = "zone"

#: The QEMU binary every zone's domain runs (``<emulator>``).
EMULATOR: Final = "/usr/bin/qemu-system-x86_64"
#: Serial numbers of the zone's disks, as the guest agent looks for them in
#: ``/sys/block/vd*/serial`` (virtio-blk carries at most 20 bytes).
IMAGE_DISK_SERIAL: Final = "zoned-image"
WRITABLE_DISK_SERIAL: Final = "zoned-writable"

_VIRT_TYPES: Final[dict[Accelerator, str]] = {"kvm": "kvm", "tcg": "qemu"}


@dataclass(frozen=True)
class DomainSpec:
    """Everything that makes one zone's libvirt domain.

    ``vcpu_pins[i]`` is the host cpuset of vCPU ``i``; empty means no pinning
    (otherwise there is exactly one entry per vCPU). ``emulator_cpus`` empty
    means the emulator thread is not pinned. ``metadata`` is opaque text (the
    zone record as JSON) stored verbatim under :data:`METADATA_NS`.
    Construction checks the values that would otherwise make libvirt or the
    XML itself fail: the daemon builds specs from validated values, so a bad
    one is its own bug (``internal``).
    """

    domain_name: str
    uuid: str
    vcpus: int
    memory_mib: int
    machine: Machine
    accelerator: Accelerator
    kernel: Path
    initrd: Path
    cmdline: str
    vcpu_pins: tuple[tuple[int, ...], ...]
    emulator_cpus: tuple[int, ...]
    numa_node: int | None
    console_log: Path
    agent_socket: Path
    metadata: str
    # The workload root image, attached read-only as the first virtio disk.
    rootfs: Path | None = None
    # The uid and gid (one number) QEMU runs as; None leaves it to qemu.conf.
    qemu_uid: int | None = None
    # The zone's scratch disk (its writable layer), attached read-write after it.
    scratch_disk: Path | None = None
    # The balloon, for free page reporting only (module docstring).
    free_page_reporting: bool = False
    # TCG's translation cache in MiB; None leaves QEMU's default. Ignored under KVM.
    tcg_tb_cache_mib: int | None = None
    # The zone's network: a virtio NIC on the tap of these addresses (None: no NIC).
    network: ZoneAddressing | None = None

    def __post_init__(self) -> None:
        if not self.domain_name or "/" in self.domain_name:
            raise InternalError(f"bad libvirt domain name {self.domain_name!r}")
        try:
            canonical_uuid = str(UUID(self.uuid))
        except ValueError:
            canonical_uuid = ""
        if canonical_uuid != self.uuid:
            raise InternalError(f"uuid {self.uuid!r} is not a lower-case hyphenated UUID")
        if self.vcpus < 1:
            raise InternalError(f"a zone needs at least one vCPU, not {self.vcpus}")
        if self.memory_mib < 1:
            raise InternalError(f"a zone needs memory, not {self.memory_mib} MiB")
        if self.machine not in ("microvm", "q35"):
            raise InternalError(f"unknown machine type {self.machine!r}")
        if self.accelerator not in _VIRT_TYPES:
            raise InternalError(f"unknown accelerator {self.accelerator!r}")
        if self.vcpu_pins and len(self.vcpu_pins) != self.vcpus:
            raise InternalError(f"{len(self.vcpu_pins)} vCPU pins given for {self.vcpus} vCPUs")
        for cpus in (*self.vcpu_pins, self.emulator_cpus):
            if any(cpu < 0 for cpu in cpus):
                raise InternalError(f"negative host CPU in {cpus}")
        if any(not cpus for cpus in self.vcpu_pins):
            raise InternalError("a pinned vCPU needs at least one host CPU")
        if self.numa_node is not None and self.numa_node < 0:
            raise InternalError(f"negative NUMA node {self.numa_node}")
        if self.tcg_tb_cache_mib is not None and not 1 <= self.tcg_tb_cache_mib <= 65536:
            raise InternalError(f"TCG translation cache of {self.tcg_tb_cache_mib} MiB")
        if self.qemu_uid is not None and not 0 < self.qemu_uid < 2**31 - 1:
            raise InternalError(f"QEMU uid {self.qemu_uid} is not a uid a zone may run as")
        for label, path in self._paths():
            if not path.is_absolute():
                raise InternalError(f"{label} path {path} is not absolute")
        for label, text in (
            ("domain name", self.domain_name),
            ("uuid", self.uuid),
            ("cmdline", self.cmdline),
            ("metadata", self.metadata),
            *((f"{label} path", str(path)) for label, path in self._paths()),
        ):
            _check_xml_text(label, text)

    def _paths(self) -> tuple[tuple[str, Path], ...]:
        paths = [
            ("kernel", self.kernel),
            ("initrd", self.initrd),
            ("console log", self.console_log),
            ("agent socket", self.agent_socket),
        ]
        if self.rootfs is not None:
            paths.append(("rootfs", self.rootfs))
        if self.scratch_disk is not None:
            paths.append(("scratch disk", self.scratch_disk))
        return tuple(paths)


def _xml_char_ok(char: str) -> bool:
    # XML 1.0 Char production: no C0 controls other than TAB, LF, CR; no
    # surrogates, no U+FFFE/U+FFFF. CR is refused too: parsers turn it into LF.
    code = ord(char)
    if code < 0x20:
        return code in (0x09, 0x0A)
    return not (0xD800 <= code <= 0xDFFF or code in (0xFFFE, 0xFFFF))


def _check_xml_text(label: str, text: str) -> None:
    bad = next((c for c in text if not _xml_char_ok(c)), None)
    if bad is not None:
        raise InternalError(f"{label} contains {bad!r}, which XML cannot carry")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def render_domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML of ``spec``, pretty-printed and deterministic."""
    microvm = spec.machine == "microvm"
    domain = ET.Element("domain", type=_VIRT_TYPES[spec.accelerator])
    _sub(domain, "name", spec.domain_name)
    _sub(domain, "uuid", spec.uuid)
    metadata = _sub(domain, "metadata")
    # The prefix is declared on the element itself (rather than through
    # ET.register_namespace, which is process-global) so the output is stable.
    _sub(
        metadata,
        f"{METADATA_PREFIX}:{METADATA_ELEMENT}",
        spec.metadata,
        **{f"xmlns:{METADATA_PREFIX}": METADATA_NS},
    )
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus), placement="static")

    if spec.vcpu_pins or spec.emulator_cpus:
        cputune = _sub(domain, "cputune")
        for vcpu, cpus in enumerate(spec.vcpu_pins):
            _sub(cputune, "vcpupin", vcpu=str(vcpu), cpuset=format_cpulist(cpus))
        if spec.emulator_cpus:
            _sub(cputune, "emulatorpin", cpuset=format_cpulist(spec.emulator_cpus))
    if spec.numa_node is not None:
        numatune = _sub(domain, "numatune")
        _sub(numatune, "memory", mode="strict", nodeset=str(spec.numa_node))

    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64", machine=spec.machine)
    _sub(os_element, "kernel", str(spec.kernel))
    _sub(os_element, "initrd", str(spec.initrd))
    _sub(os_element, "cmdline", spec.cmdline)

    features = _sub(domain, "features")
    _sub(features, "acpi")
    if not microvm:
        # No VMware I/O port backdoor (microvm has none, and libvirt refuses the option there).
        _sub(features, "vmport", state="off")
    if spec.accelerator == "tcg" and spec.tcg_tb_cache_mib is not None:
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", str(spec.tcg_tb_cache_mib), unit="MiB")

    if spec.accelerator == "kvm":
        _sub(domain, "cpu", mode="host-model", check="partial")
    else:
        _sub(domain, "cpu", mode="maximum", check="none")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "destroy")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    _sub(devices, "emulator", EMULATOR)
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=str(spec.console_log), append="off")
    _sub(serial, "target", port="0")
    _sub(devices, "controller", type="usb", model="none")
    controller = _sub(devices, "controller", type="virtio-serial", index="0")
    if microvm:
        _sub(controller, "address", type="virtio-mmio")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(spec.agent_socket))
    _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    if spec.rootfs is not None:
        _disk(devices, spec.rootfs, "vda", IMAGE_DISK_SERIAL, readonly=True, spec=spec)
    if spec.scratch_disk is not None:
        _disk(devices, spec.scratch_disk, "vdb", WRITABLE_DISK_SERIAL, readonly=False, spec=spec)
    if spec.network is not None:
        devices.append(interface_element(spec.network, mmio=microvm))
    if spec.free_page_reporting:
        balloon = _sub(devices, "memballoon", model="virtio", freePageReporting="on")
        if microvm:
            _sub(balloon, "address", type="virtio-mmio")
    else:
        _sub(devices, "memballoon", model="none")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    if microvm:
        _sub(rng, "address", type="virtio-mmio")
    if spec.qemu_uid is not None:
        add_static_label(domain, spec.qemu_uid)

    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def add_static_label(domain: ET.Element, qemu_uid: int) -> None:
    """QEMU as ``qemu_uid`` (uid and gid), and libvirt relabelling nothing for it."""
    seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
    _sub(seclabel, "label", f"+{qemu_uid}:+{qemu_uid}")


def _disk(
    devices: ET.Element, path: Path, target: str, serial: str, *, readonly: bool, spec: DomainSpec
) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw")
    source = _sub(disk, "source", file=str(path))
    if spec.qemu_uid is None:
        # libvirt never re-owns the file (see the module docstring).
        _sub(source, "seclabel", model="dac", relabel="no")
    _sub(disk, "target", dev=target, bus="virtio")
    _sub(disk, "serial", serial)
    if readonly:
        _sub(disk, "readonly")
    if spec.machine == "microvm":
        _sub(disk, "address", type="virtio-mmio")


def metadata_element(metadata: str) -> str:
    """The element :meth:`Hypervisor.set_metadata` takes for ``metadata`` (opaque text)."""
    _check_xml_text("metadata", metadata)
    element = ET.Element(METADATA_ELEMENT)
    element.text = metadata
    return ET.tostring(element, encoding="unicode")


def read_metadata(domain_xml: str) -> str | None:
    """The zone record stored in ``domain_xml``, or ``None`` if it has none.

    Accepts a whole domain XML (as from ``virDomainGetXMLDesc``) or the
    metadata element alone as ``virDomainGetMetadata`` returns it for
    :data:`METADATA_NS`: libvirt 9.0 strips the namespace there and answers
    ``<zone>...</zone>``. Raises ``hypervisor`` if the text is not XML.
    """
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise HypervisorError(f"domain XML does not parse: {exc}") from exc
    tag = f"{{{METADATA_NS}}}{METADATA_ELEMENT}"
    if root.tag in (tag, METADATA_ELEMENT):
        element: ET.Element | None = root
    else:
        element = root.find(f"./metadata/{tag}")
    if element is None:
        return None
    return element.text or ""
