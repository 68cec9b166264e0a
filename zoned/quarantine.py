"""Quarantine: freeze a zone at once, then collect its evidence (docs/incident-response.md).

Order, for one ``quarantine_zone`` request:

1. **Freeze** (:meth:`zoned.zones.ZoneManager.freeze`): the zone's vCPUs
   are paused through libvirt, its agent is no longer supervised (its
   running processes end for their clients with "the zone was
   quarantined"), it takes no new processes, and its record says
   ``quarantined`` before anything else happens. Its network would be cut
   here too; zones have no network yet (the hook is ``freeze``'s).
2. **Collect** into a bundle (:mod:`zoned.evidence`) under
   ``evidence_dir``: the zone's record, its live domain XML, the kernel's
   build manifest (and its config's hash), the console log (rotated copies
   first), the zone's audit records and events, then the guest's memory
   (libvirt's memory-only core dump, an ELF file ``crash`` and ``strings``
   read), last because it is the largest: whatever fits before it is
   kept on a disk that fills. A writable layer on a tmpfs inside the guest
   is in the memory dump; a scratch disk is copied (:func:`writable_layers`).
   Every failure is written into the bundle as partial; nothing of it fails
   the request or touches another zone.
3. **Then** the zone stays paused (inspect it live with ``virsh``, collect
   again, destroy it when done) or, with ``destroy``, is destroyed.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import trio

from zoned import protocol as p
from zoned import zonelogs
from zoned.access import Caller
from zoned.errors import ZonedError
from zoned.evidence import Bundle, kernel_identity
from zoned.monitor import Monitor, caller_info
from zoned.records import ZoneRecord, encode_record, to_info
from zoned.zones import ZoneManager


def writable_layers(record: ZoneRecord) -> list[tuple[str, Path]]:
    """The zone's writable layer where it lives on a host disk, to copy in.

    A zone that writes to a tmpfs inside its guest has it in the memory
    dump; one with a scratch disk (the record's ``scratch_disk``) has it
    copied whole, as ``scratch.img``.
    """
    scratch = record.scratch_disk
    return [("scratch.img", Path(scratch))] if scratch else []


def _identity(record: ZoneRecord, kernel_facts: dict[str, str]) -> dict[str, str]:
    facts = {
        "profile": record.profile,
        "kernel_release": record.kernel_release,
        "kernel_sha256": record.kernel_sha256,
        "cmdline": record.cmdline,
        "boot_image": record.boot_image,
        "rootfs": record.rootfs,
        "machine": record.machine,
        "accelerator": record.accelerator,
        **kernel_facts,
    }
    # Hashes and the image the record carries ("" for zones made before them).
    for name, value in (
        ("boot_image_sha256", record.boot_image_sha256),
        ("rootfs_sha256", record.rootfs_sha256),
        ("image", record.image),
        ("image_id", record.image_id),
        ("writable_layer", record.writable_layer),
    ):
        if value:
            facts[name] = value
    return facts


async def quarantine_zone(
    manager: ZoneManager, monitor: Monitor, request: p.QuarantineZone, caller: Caller
) -> p.QuarantineReply:
    """Freeze the zone ``caller`` may act on, collect, destroy if asked."""
    record = await manager.freeze(request.name, caller)
    bundle = await collect(manager, monitor, record, caller_info(caller))
    zone = to_info(manager.zones[record.name].record) if record.name in manager.zones else None
    if request.destroy:
        zone = await manager.destroy(record.name, caller)
    if zone is None:  # destroyed meanwhile by someone else
        zone = to_info(msgspec.structs.replace(record, state="stopped"))
    return p.QuarantineReply(id=request.id, zone=zone, bundle=bundle)


async def collect(
    manager: ZoneManager, monitor: Monitor, record: ZoneRecord, caller: p.CallerInfo
) -> p.EvidenceBundle:
    """Write the evidence bundle of a frozen zone (see the module's order)."""
    evidence_dir = Path(manager.config.evidence_dir)
    bundle = await trio.to_thread.run_sync(
        Bundle.create, evidence_dir, record.name, record.uuid, time.time()
    )
    run = trio.to_thread.run_sync
    await run(bundle.add_bytes, "zone.json", msgspec.json.format(encode_record(record)))
    try:
        xml = await manager.hv.xml(record.domain_name)
    except ZonedError as exc:
        bundle.fail("domain.xml", f"libvirt: {exc.message}")
    else:
        await run(bundle.add_bytes, "domain.xml", xml.encode())
    kernel_facts, kernel_manifest = await run(kernel_identity, Path(record.kernel_image))
    if kernel_manifest is not None:
        await run(bundle.add_copy, "kernel-manifest.json", kernel_manifest)
    await monitor.trail.barrier()  # the zone's records and events so far are on disk
    logs = zonelogs.zone_log_dir(Path(manager.config.log_dir), record.name, record.uuid)
    console = Path(record.console_log)
    console_files = await run(zonelogs.console_files, console.parent, console.name)
    await run(bundle.add_concatenation, "console.log", console_files)
    for name in (zonelogs.AUDIT_LOG, zonelogs.EVENTS_LOG):
        if await trio.Path(logs / name).exists():
            await run(bundle.add_copy, name, logs / name)
    for name, path in writable_layers(record):
        await run(bundle.add_copy, name, path)
    memory = bundle.path / "memory.elf"
    try:
        await manager.hv.dump_memory(record.domain_name, memory)
    except ZonedError as exc:
        bundle.fail("memory.elf", f"libvirt's memory dump failed: {exc.message}")
    else:
        await run(bundle.adopt, "memory.elf")
    notes = [
        "memory.elf: the guest's RAM (libvirt's memory-only core dump, ELF); a writable"
        " layer on tmpfs inside the guest is in there",
        "network: zones have no network yet; nothing was cut or captured",
    ]
    return await run(
        lambda: bundle.finish(
            zone=record.name,
            uuid=record.uuid,
            domain_name=record.domain_name,
            collected_by=caller,
            zone_state=record.state,
            identity=_identity(record, kernel_facts),
            notes=notes,
        )
    )
