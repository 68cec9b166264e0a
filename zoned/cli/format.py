"""Pure formatting for zonectl: tables, ``key: value`` blocks, event lines, JSON.

No IO here, and the current time is passed in, so every function can be
tested with hand-built records. Free text that came from a zone or a caller
(reasons, labels, paths) goes through :func:`clean` before it reaches a
terminal. ``--json`` output is the protocol's records with every field
(:func:`to_plain`): a field the protocol gains shows up with no edit here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from zoned import protocol as p


def clean(text: str) -> str:
    """Free text (reasons, paths) made safe for a terminal: control characters escaped."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def one_line(text: str) -> str:
    return clean(" ".join(text.split()))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """CPU ids as a compact sorted list, as in /sys: ``0-3,6,8-9``; ``-`` if none."""
    ids = sorted(set(cpus))
    if not ids:
        return "-"
    ranges: list[str] = []
    start = previous = ids[0]
    for cpu in [*ids[1:], None]:
        if cpu is not None and cpu == previous + 1:
            previous = cpu
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if cpu is not None:
            start = previous = cpu
    return ",".join(ranges)


def format_mib(mib: int) -> str:
    """``256MiB``, ``2GiB`` (GiB only when exact)."""
    if mib >= 1024 and mib % 1024 == 0:
        return f"{mib // 1024}GiB"
    return f"{mib}MiB"


def format_age(seconds: float) -> str:
    """A coarse age, as ``ps`` and ``kubectl`` show it: ``42s``, ``5m``, ``3h``, ``2d``."""
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 0
    whole = int(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 120 * 60:
        return f"{whole // 60}m"
    if whole < 48 * 3600:
        return f"{whole // 3600}h"
    return f"{whole // 86400}d"


def format_seconds(seconds: float | None) -> str:
    """A short duration with a decimal: ``1.3s``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds:.1f}s"


def format_time(unix: float) -> str:
    """A Unix time as UTC ISO 8601 with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    try:
        moment = datetime.fromtimestamp(unix, UTC)
    except (OverflowError, OSError, ValueError):
        return str(unix)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_labels(labels: dict[str, str]) -> str:
    """``k=v,k2=v2`` in key order; ``-`` if none."""
    if not labels:
        return "-"
    return ",".join(f"{key}={clean(labels[key])}" for key in sorted(labels))


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing spaces; ends with a newline."""
    all_rows = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(header))]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


ZONE_TABLE_HEADER = (
    "NAME",
    "STATE",
    "OWNER",
    "IMAGE",
    "VCPUS",
    "MEM",
    "CPUS",
    "PROFILE",
    "MACHINE",
    "AGE",
    "BOOT",
)


def _zone_cpus(zone: p.ZoneInfo) -> str:
    return format_cpu_list(zone.cpus) if zone.cpus else zone.placement


def _boot_time(zone: p.ZoneInfo) -> float | None:
    return None if zone.ready_at is None else zone.ready_at - zone.created_at


def format_owner(uid: int | None, user_names: Mapping[int, str]) -> str:
    """A zone's owner: the user's name where ``user_names`` knows it, else the uid."""
    if uid is None:
        return "-"
    name = user_names.get(uid)
    return clean(name) if name else str(uid)


def format_zone_table(
    zones: Sequence[p.ZoneInfo], now: float, user_names: Mapping[int, str] | None = None
) -> str:
    """The ``list`` table, sorted by name.

    CPUS is the set of host CPUs the vCPUs are pinned to (or the placement,
    ``shared``, when unpinned); AGE counts from creation to ``now``; BOOT is
    creation to ready (``-`` until then).
    """
    rows = [
        (
            zone.name,
            zone.state,
            format_owner(zone.owner_uid, user_names or {}),
            clean(zone.image) or "-",
            str(zone.vcpus),
            format_mib(zone.memory_mib),
            _zone_cpus(zone),
            clean(zone.profile),
            zone.machine,
            format_age(now - zone.created_at),
            format_seconds(_boot_time(zone)),
        )
        for zone in sorted(zones, key=lambda zone: zone.name)
    ]
    return format_table(ZONE_TABLE_HEADER, rows)


def _block(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in pairs) + 2
    return "".join(f"{(key + ':').ljust(width)}{value}".rstrip() + "\n" for key, value in pairs)


def _qemu_identity(zone: p.ZoneInfo) -> str:
    if zone.qemu_uid is None:
        return "libvirt-qemu (shared: created before per-zone uids)"
    return f"{zone.qemu_uid}:{zone.qemu_gid if zone.qemu_gid is not None else zone.qemu_uid}"


def _qemu_limits(zone: p.ZoneInfo) -> str:
    memory = "-" if zone.memory_hard_limit_mib is None else format_mib(zone.memory_hard_limit_mib)
    tasks = "-" if zone.pids_limit is None else str(zone.pids_limit)
    return f"memory {memory}, tasks {tasks}"


def format_zone(zone: p.ZoneInfo, now: float, user_names: Mapping[int, str] | None = None) -> str:
    """The ``show`` block: every field of one zone, then what isolates it on the host."""
    pinning = (
        " ".join(f"vcpu{index}:{cpu}" for index, cpu in enumerate(zone.cpus))
        if zone.cpus
        else "not pinned"
    )
    pairs: list[tuple[str, str]] = [
        ("name", zone.name),
        ("uuid", clean(zone.uuid)),
        ("state", zone.state),
    ]
    if zone.reason:
        pairs.append(("reason", one_line(zone.reason)))
    if zone.failure:
        pairs.append(("failure", clean(zone.failure)))
    pairs += [
        ("vcpus", str(zone.vcpus)),
        ("memory", format_mib(zone.memory_mib)),
        ("placement", zone.placement),
        ("cpus", pinning),
        ("emulator cpus", format_cpu_list(zone.emulator_cpus)),
        ("numa node", "-" if zone.numa_node is None else str(zone.numa_node)),
        ("image", _zone_image(zone)),
        ("writable", _writable_layer(zone)),
        ("profile", clean(zone.profile)),
        ("kernel", clean(zone.kernel_release) or "-"),
        ("machine", f"{zone.machine} ({zone.accelerator})"),
        ("labels", format_labels(zone.labels)),
        ("started", f"from pool {zone.from_pool}" if zone.from_pool else "booted for it"),
        ("created", f"{format_time(zone.created_at)} ({format_age(now - zone.created_at)} ago)"),
    ]
    if zone.ready_at is None:
        pairs.append(("ready", "-"))
    else:
        pairs.append(
            (
                "ready",
                f"{format_time(zone.ready_at)} (boot {format_seconds(_boot_time(zone))},"
                f" guest kernel to agent {format_seconds(zone.guest_boot_s)})",
            )
        )
    pairs += [
        ("console log", clean(zone.console_log)),
        ("owner", format_owner(zone.owner_uid, user_names or {})),
        ("qemu uid:gid", _qemu_identity(zone)),
        ("seclabel", clean(zone.seclabel) or "-"),
        ("qemu limits", _qemu_limits(zone)),
        ("kernel sha256", clean(zone.kernel_sha256) or "-"),
        ("config sha256", clean(zone.kernel_config_sha256) or "-"),
        ("boot image", clean(zone.boot_image_sha256) or "-"),
        ("workload root", clean(zone.rootfs_sha256) or "-"),
        *_net_pairs(zone),
    ]
    return _block(pairs)


def _zone_image(zone: p.ZoneInfo) -> str:
    if not zone.image_id:
        return "-"
    if zone.image_id == p.BUILTIN_IMAGE:
        return p.BUILTIN_IMAGE
    return f"{clean(zone.image)} ({short_id(zone.image_id)})"


def _writable_layer(zone: p.ZoneInfo) -> str:
    if not zone.writable_layer:
        return "-"
    size = format_mib(zone.writable_layer_mib) if zone.writable_layer_mib else "unbounded"
    where = "in the zone's memory" if zone.writable_layer == "tmpfs" else "scratch disk"
    return f"{zone.writable_layer}, {size} ({where})"


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

IMAGE_TABLE_HEADER = ("IMAGE ID", "TAGS", "PLATFORM", "SIZE", "LAYERS", "ZONES", "IMPORTED")


def short_id(image_id: str) -> str:
    """The 12 hex digits Docker shows of an image id."""
    return image_id.removeprefix("sha256:")[:12]


def format_bytes(count: int) -> str:
    """``512B``, ``1.5kB``, ``216.3MB``, ``4.1GB`` (decimal units, as Docker prints sizes)."""
    return _scaled(count, 1000, ("B", "kB", "MB", "GB"), "")


def _scaled(count: int, step: int, units: tuple[str, ...], space: str) -> str:
    """``count`` bytes in the largest of ``units`` (each ``step`` times the last) below ``step``."""
    value, index = float(count), 0
    while value >= step and index < len(units) - 1:
        value /= step
        index += 1
    return f"{count}{space}B" if index == 0 else f"{value:.1f}{space}{units[index]}"


def _tags(image: p.ImageInfo) -> str:
    tags = ", ".join(clean(t) for t in image.tags) or "<none>"
    return f"{tags} (default)" if image.default else tags


def format_image_table(images: Sequence[p.ImageInfo]) -> str:
    """The ``image list`` table, newest first."""
    rows = [
        (
            short_id(image.id),
            _tags(image),
            clean(image.platform),
            format_bytes(image.rootfs_bytes),
            str(image.layers),
            str(image.zones),
            format_time(image.imported_at),
        )
        for image in sorted(images, key=lambda image: -image.imported_at)
    ]
    return format_table(IMAGE_TABLE_HEADER, rows)


def _argv_text(argv: Sequence[str]) -> str:
    return clean(" ".join(argv)) if argv else "-"


def format_image(image: p.ImageInfo) -> str:
    """The ``image inspect`` block (and what pull and import print)."""
    pairs: list[tuple[str, str]] = [
        ("id", image.id),
        ("tags", _tags(image)),
        ("repo digests", ", ".join(clean(d) for d in image.repo_digests) or "-"),
        ("platform", clean(image.platform)),
        ("created", clean(image.created or "-")),
        ("imported", format_time(image.imported_at)),
        ("layers", str(image.layers)),
        ("root file system", format_bytes(image.rootfs_bytes)),
        ("entrypoint", _argv_text(image.entrypoint)),
        ("cmd", _argv_text(image.cmd)),
        ("env", "; ".join(clean(e) for e in image.env) or "-"),
        ("working dir", clean(image.working_dir) or "/"),
        ("user", clean(image.user) or "root"),
        ("labels", format_labels(image.labels)),
        ("zones using it", str(image.zones)),
    ]
    return _block(pairs)


def format_removal(removal: p.ImageRemoveReply) -> str:
    """What ``image rm`` and ``image prune`` did, one line each."""
    lines = [f"untagged {clean(tag)}" for tag in removal.untagged]
    lines += [f"removed {image_id}" for image_id in removal.removed]
    if removal.removed:
        lines.append(f"freed {format_bytes(removal.freed_bytes)}")
    return "\n".join(lines or ["nothing to remove"]) + "\n"


def format_image_sizes(sizes: p.ImageStoreSizes) -> str:
    """The ``image sizes`` table and totals."""
    rows = [
        (
            short_id(image.id),
            ", ".join(clean(t) for t in image.tags) or "<none>",
            format_bytes(image.rootfs_bytes),
            format_bytes(image.blob_bytes),
            format_bytes(image.shared_blob_bytes),
        )
        for image in sizes.images
    ]
    table = format_table(("IMAGE ID", "TAGS", "ROOT FS", "BLOBS", "SHARED BLOBS"), rows)
    return table + _block(
        [
            ("root file systems", format_bytes(sizes.rootfs_bytes)),
            ("blobs", format_bytes(sizes.blob_bytes)),
            ("scratch", format_bytes(sizes.scratch_bytes)),
            ("total", format_bytes(sizes.total_bytes)),
        ]
    )


def format_net(zone: p.ZoneInfo) -> str:
    """The zone's network: policy, publishes, addresses, status."""
    return _block(_net_pairs(zone))


def _net_pairs(zone: p.ZoneInfo) -> list[tuple[str, str]]:
    if zone.net is None:
        return [("network", "none (no NIC)")]
    return [
        ("network", clean(zone.net_status or "-")),
        ("allowed", ", ".join(clean(rule) for rule in zone.net) or "nothing"),
        ("published", ", ".join(clean(p) for p in zone.publishes) or "-"),
        ("address", " ".join(clean(a) for a in (zone.net_address, zone.net_address6) if a)),
    ]


def format_net_counters(net: p.NetMetrics | None) -> str:
    """A networked zone's counters, as the host counted them."""
    if net is None:
        return ""
    return _block(
        [
            ("net bytes", f"{format_bytes(net.bytes_out)} out, {format_bytes(net.bytes_in)} in"),
            (
                "connections",
                f"{net.connections_allowed} allowed, {net.connections_refused} refused,"
                f" {net.connections_active} open",
            ),
            (
                "dns",
                f"{net.dns_answered} answered, {net.dns_refused} refused,"
                f" {net.dns_dropped} dropped",
            ),
            ("events suppressed", str(net.events_suppressed)),
        ]
    )


def format_progress(event: p.ImageProgress) -> str:
    """One progress line of a pull or import: phase, layers and bytes done."""
    parts = [f"{clean(event.image)}: {event.phase}"]
    if event.layers_total:
        layer = min(event.layers_done + (event.phase == "apply"), event.layers_total)
        parts.append(f"layer {layer}/{event.layers_total}")
    if event.bytes_total:
        parts.append(f"{format_bytes(event.bytes_done)}/{format_bytes(event.bytes_total)}")
    elif event.bytes_done:
        parts.append(format_bytes(event.bytes_done))
    return "  ".join(parts)


def format_host(host: p.HostInfoData) -> str:
    """The ``host`` report: a summary block, then one row per host CPU."""
    online = [cpu.id for cpu in host.cpus if cpu.online]
    reserved = [cpu.id for cpu in host.cpus if cpu.reserved]
    pairs: list[tuple[str, str]] = [
        ("accelerator", host.accelerator),
        ("machine", f"{host.machine} (default for new zones)"),
        (
            "memory",
            f"{host.memory_total_mib} MiB total, {host.memory_reserved_mib} MiB reserved,"
            f" {host.memory_free_mib} MiB free",
        ),
        (
            "cpus",
            f"{len(host.cpus)} ({len(online)} online: {format_cpu_list(online)};"
            f" reserved: {format_cpu_list(reserved)})",
        ),
        ("free exclusive", format_cpu_list(host.cpus_free_exclusive)),
        ("shared pool", format_cpu_list(host.shared_pool)),
        ("zones", str(host.zone_count)),
    ]
    for index, node in enumerate(sorted(host.numa_nodes, key=lambda node: node.id)):
        pairs.append(
            (
                "numa nodes" if index == 0 else "",
                f"node {node.id}: cpus {format_cpu_list(node.cpus)}, {node.memory_mib} MiB",
            )
        )
    if not host.numa_nodes:
        pairs.append(("numa nodes", "-"))
    for index, kernel in enumerate(sorted(host.kernels, key=lambda kernel: kernel.profile)):
        pairs.append(
            (
                "kernels" if index == 0 else "",
                f"{clean(kernel.profile)}: {clean(kernel.kernel_release)}"
                f" (sha256 {kernel.image_sha256[:12]}"
                + (
                    f", config {clean(kernel.config_sha256[:12])})" if kernel.config_sha256 else ")"
                ),
            )
        )
    if not host.kernels:
        pairs.append(("kernels", "none"))
    if host.isolation is not None:
        pairs += _isolation_pairs(host.isolation)
    # Continuation lines have an empty key: print them without the colon.
    width = max(len(key) for key, _ in pairs) + 2
    summary = "".join(
        (f"{(key + ':').ljust(width)}" if key else " " * width) + value + "\n"
        for key, value in pairs
    )
    rows = [
        (
            str(cpu.id),
            "-" if not cpu.online else "online",
            str(cpu.node),
            "-" if cpu.package is None else str(cpu.package),
            "-" if cpu.core is None else str(cpu.core),
            "yes" if cpu.reserved else "no",
            cpu.allocated_to or "-",
        )
        for cpu in sorted(host.cpus, key=lambda cpu: cpu.id)
    ]
    table = format_table(("CPU", "STATE", "NODE", "PACKAGE", "CORE", "RESERVED", "ZONE"), rows)
    return summary + "\n" + table


def _isolation_pairs(isolation: p.HostIsolation) -> list[tuple[str, str]]:
    last = isolation.qemu_uid_base + isolation.qemu_uid_count - 1
    controller = clean(isolation.pids_controller)
    tasks = (
        f"{isolation.pids_limit} tasks ({controller})"
        if controller
        else "no task limit (no pids cgroup controller)"
    )
    pairs = [
        (
            "qemu uids",
            f"{isolation.qemu_uid_base}-{last} ({isolation.qemu_uids_in_use} in use;"
            f" {isolation.qemu_uid_base} is the accelerator probe's)",
        ),
        ("seclabel", clean(isolation.seclabel)),
        ("qemu limits", f"zone memory + {format_mib(isolation.memory_overhead_mib)}, {tasks}"),
        (
            "admins",
            f"root, group {clean(isolation.admin_group)}" if isolation.admin_group else "root",
        ),
        ("you see", "every zone" if isolation.caller_sees_all else "your own zones"),
    ]
    for index, image in enumerate(isolation.shared_images):
        pairs.append(
            (
                "shared images" if index == 0 else "",
                f"{clean(image.kind)}: {clean(image.path)} (sha256 {image.sha256[:12]})",
            )
        )
    return pairs


def cpu_percent(before: p.ZoneMetricsData | None, after: p.ZoneMetricsData) -> float | None:
    """CPU use between two samples, in percent of one host CPU."""
    if before is None or before.cpu_time_s is None or after.cpu_time_s is None:
        return None
    wall = after.sampled_at - before.sampled_at
    if wall <= 0:
        return None
    return max(0.0, (after.cpu_time_s - before.cpu_time_s) / wall * 100.0)


def format_top(rows: Sequence[tuple[p.ZoneMetricsData, float | None]]) -> str:
    """The ``zonectl top`` table: one zone per line."""

    def kib(value: int | None) -> str:
        return "-" if value is None else format_mib(value // 1024)

    lines = []
    for metrics, cpu in rows:
        guest = metrics.guest
        used = (
            f"{kib(guest.mem_total_kib - guest.mem_available_kib)}/{kib(guest.mem_total_kib)}"
            if guest is not None
            else "-"
        )
        lines.append(
            [
                metrics.name,
                metrics.state,
                "-" if cpu is None else f"{cpu:.1f}",
                str(metrics.vcpus),
                kib(metrics.host_rss_kib),
                used,
                "-" if guest is None else f"{guest.load1:.2f}",
                "-" if guest is None else str(guest.processes),
                str(metrics.execs_running),
                *_net_columns(metrics.net),
            ]
        )
    header = ["NAME", "STATE", "CPU%", "VCPUS", "HOST RSS", "GUEST MEM", "LOAD", "PROCS", "EXECS"]
    header += ["NET OUT", "NET IN", "CONN OK/NO", "DNS OK/NO"]
    return format_table(header, lines)


def _net_columns(net: p.NetMetrics | None) -> list[str]:
    if net is None:
        return ["-", "-", "-", "-"]
    return [
        format_bytes(net.bytes_out),
        format_bytes(net.bytes_in),
        f"{net.connections_allowed}/{net.connections_refused}",
        f"{net.dns_answered}/{net.dns_refused}",
    ]


def format_event(event: p.Event) -> str:
    """One ``watch`` line (no newline): time, sequence number, what happened."""
    head = f"{format_time(event.time)} #{event.seq}"
    reason = f" ({one_line(event.reason)})" if event.reason else ""
    if event.kind == "zone_state":
        previous = clean(event.previous) or "-"
        return f"{head} zone {clean(event.zone)}: {previous} -> {clean(event.state)}{reason}"
    if event.kind in ("cpu_online", "cpu_offline"):
        cpu = "?" if event.cpu is None else str(event.cpu)
        return f"{head} cpu {cpu} {event.kind.removeprefix('cpu_')}{reason}"
    if event.kind == "daemon":
        return f"{head} daemon: {one_line(event.reason) or '-'}"
    if event.kind in ("exec_started", "exec_ended") and event.exec is not None:
        who = f" (uid {event.caller.uid})" if event.caller is not None else ""
        verb = "started" if event.kind == "exec_started" else "ended"
        return f"{head} zone {clean(event.zone)}: process {verb}: {describe_exec(event.exec)}{who}"
    if event.kind == "net_refused" and event.refused is not None:
        r = event.refused
        where = clean(r.destination) + (f":{r.port}" if r.port else "")
        name = f" as {clean(r.name)}" if r.name and r.name != r.destination else ""
        gone = f" ({r.suppressed_before} more suppressed before)" if r.suppressed_before else ""
        return (
            f"{head} zone {clean(event.zone)}: refused {clean(r.kind)} {where}{name}"
            f" ({clean(r.protocol) or 'tcp'}): {clean(r.rule)}{gone}"
        )
    if event.kind == "net_status":
        return f"{head} zone {clean(event.zone)}: network {clean(event.state)}{reason}"
    return f"{head} {clean(str(event.kind))}{reason}"


def describe_exec(exec_: p.ExecRecord) -> str:
    """A process in a few words: pid, argv, user, how it ended."""
    command = [*(exec_.entrypoint or []), *exec_.argv]
    argv = " ".join(command) if command else "(the image's command)"
    if len(argv) > 80 or exec_.argv_truncated:
        argv = argv[:77] + "..."
    parts = [f"pid {exec_.pid}" if exec_.pid is not None else "not started", one_line(argv)]
    if exec_.user is not None:
        parts.append(f"as {exec_.user}")
    elif exec_.uid or exec_.gid:
        parts.append(f"as {exec_.uid}:{exec_.gid}")
    cpu, peak = exec_.cpu_time_s, exec_.memory_peak_kib
    # What is known of how it ran and ended, each fact only when it is.
    facts = (
        "tty" if exec_.tty else "",
        f"exit {exec_.exit_code}" if exec_.exit_code is not None else "",
        f"signal {exec_.signal}" if exec_.signal is not None else "",
        "OOM-killed" if exec_.oom_killed else "",
        "timed out" if exec_.timed_out else "",
        f"cpu {cpu:.2f}s" if cpu is not None else "",
        f"peak {format_mib(peak // 1024)}" if peak is not None else "",
        f"error: {one_line(exec_.error)}" if exec_.error else "",
    )
    return ", ".join([*parts, *filter(None, facts)])


AUDIT_TABLE_HEADER = ("TIME", "UID", "PID", "EXE", "OP", "ZONE", "OUTCOME", "DETAIL")


def format_audit_table(records: Sequence[p.AuditRecord]) -> str:
    """``zonectl audit``: one record per line, oldest first."""
    rows = []
    for record in records:
        if record.outcome != "ok":
            detail = f"{record.error_code}: {one_line(record.error)}"
        elif record.exec is not None:
            detail = describe_exec(record.exec)
        elif record.bundle:
            detail = f"evidence: {clean(record.bundle)}"
        else:
            detail = "-"
        exe = record.caller.exe.rsplit("/", 1)[-1] if record.caller.exe else "-"
        rows.append(
            (
                format_time(record.time),
                str(record.caller.uid),
                str(record.caller.pid),
                clean(exe),
                record.op,
                clean(record.zone) or "-",
                record.outcome,
                detail,
            )
        )
    return format_table(AUDIT_TABLE_HEADER, rows)


def format_size(size: int) -> str:
    """``512 B``, ``3.2 KiB``, ``256.0 MiB``, ``1.5 GiB``."""
    return _scaled(size, 1024, ("B", "KiB", "MiB", "GiB"), " ")


def format_quarantine(reply: p.QuarantineReply) -> str:
    """``zonectl quarantine``: the zone's state now and where its evidence is."""
    bundle = reply.bundle
    kept = "destroyed" if reply.zone.state == "stopped" else f"{reply.zone.state} (paused)"
    lines = [
        f"zone {clean(reply.zone.name)}: {kept}",
        f"evidence: {clean(bundle.path)} ({format_size(bundle.size_bytes)},"
        f" {len(bundle.files)} files{', PARTIAL' if bundle.partial else ''})",
    ]
    lines += [f"  {clean(f.name)}  {format_size(f.size_bytes)}" for f in bundle.files]
    lines += [f"missing: {one_line(error)}" for error in bundle.errors]
    return "\n".join(lines) + "\n"


def to_plain(value: Any) -> Any:
    """Records as plain JSON-able values with every field.

    msgspec's own :func:`msgspec.structs.asdict`, applied all the way down:
    :func:`msgspec.to_builtins` would leave out every field that holds its
    default (the protocol's records are ``omit_defaults``), and ``--json``
    promises every field.
    """
    if isinstance(value, msgspec.Struct):
        return {name: to_plain(item) for name, item in msgspec.structs.asdict(value).items()}
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    return value


def format_json(value: Any) -> str:
    """One line of JSON (no newline) for ``--json``."""
    return msgspec.json.encode(to_plain(value)).decode()


def format_process_json(
    zone: str, pid: int | None, exit: p.ExecExit, stdout: bytes, stderr: bytes
) -> str:
    """``exec``/``run --json``: the zone, the pid, every field of the exit, the output.

    The exit's fields are the wire message's (its request ``id`` aside), so
    whatever :class:`~zoned.protocol.ExecExit` carries shows up here.
    """
    fields = {name: value for name, value in to_plain(exit).items() if name != "id"}
    return format_json(
        {
            "zone": zone,
            "pid": pid,
            **fields,
            "stdout": stdout.decode(errors="replace"),
            "stderr": stderr.decode(errors="replace"),
        }
    )


def format_top_json(rows: Sequence[tuple[p.ZoneMetricsData, float | None]]) -> str:
    """``top --json``: every field of each zone's metrics, and its CPU use."""
    return format_json([{**to_plain(metrics), "cpu_percent": cpu} for metrics, cpu in rows])


POOL_TABLE_HEADER = (
    "POOL",
    "IMAGE",
    "PROFILE",
    "VCPUS",
    "MEMORY",
    "WRITABLE",
    "SIZE",
    "READY",
    "BOOTING",
    "HITS",
    "MISSES",
    "FAILURES",
    "ACQUIRE",
    "STATUS",
)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _pool_status(pool: p.PoolInfo, now: float) -> str:
    if pool.backoff_until is not None and pool.backoff_until > now:
        wait = format_age(pool.backoff_until - now)
        return f"waiting {wait} after: {one_line(pool.last_failure)}"
    if pool.last_failure:
        return f"ok (last failure: {one_line(pool.last_failure)})"
    return "ok"


def format_pool_table(pools: Sequence[p.PoolInfo], now: float) -> str:
    """The ``pool list`` table; ACQUIRE is the mean time to take a ready zone."""
    rows = [
        (
            pool.name,
            clean(pool.spec.image or "(default)"),
            clean(pool.spec.profile),
            str(pool.spec.vcpus),
            format_mib(pool.spec.memory_mib),
            pool.spec.writable_layer
            + (f":{pool.spec.writable_layer_mib}" if pool.spec.writable_layer_mib else ""),
            str(pool.spec.size),
            str(pool.ready),
            str(pool.booting),
            str(pool.hits),
            str(pool.misses),
            str(pool.refill_failures),
            _seconds(pool.acquire_mean_s),
            _pool_status(pool, now),
        )
        for pool in pools
    ]
    return format_table(POOL_TABLE_HEADER, rows)
