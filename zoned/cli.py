"""zonectl: the command-line tool for zoned.

Usage::

    zonectl [--socket PATH] [--json] COMMAND [ARGS]

Commands: ``host``, ``create``, ``list``, ``show``, ``destroy``, ``watch``,
``logs`` (``zonectl COMMAND --help`` for each). ``--socket`` and ``--json``
may also follow the command. The socket is ``--socket``, else
``$ZONED_SOCKET``, else ``/run/zoned/zoned.sock``.

Output: aligned tables and ``key: value`` blocks for people; with ``--json``,
one JSON document per line holding the protocol's records with every field
(``list`` and ``destroy``: an array; ``watch``: one event per line). ``logs``
always writes the console's raw bytes.

Exit status (stable; scripts may rely on it):

===  ==========================================================================
  0  success
  1  the daemon reported another error (invalid_request, hypervisor, internal,
     unsupported_version), or its reply made no sense
  2  usage error (bad arguments)
  3  daemon unavailable: no socket, nothing listening, connection lost
  4  not_found
  5  conflict
  6  no_capacity
  7  permission_denied (refused by the daemon, or by the socket's file mode)
130  interrupted (Ctrl-C)
141  stdout closed early (e.g. piped into ``head``)
===  ==========================================================================

Errors are printed on one line to stderr as ``zonectl: <code>: <message>``,
where ``<code>`` is the daemon's error code, or ``unavailable``,
``connection_lost`` or ``protocol_error`` for failures on this side.
``destroy`` with several names destroys them all (concurrently), reports each
failure, and exits with the status of the first name that failed.

The formatting functions are pure (no IO, the current time passed in) so that
they can be tested with hand-built records.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import signal
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TextIO

import msgspec
import trio

from zoned import protocol as p
from zoned.client import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    Client,
    ClientError,
    ConnectionLost,
    DaemonUnavailable,
    ExecResult,
    Process,
)
from zoned.errors import InvalidRequest, ZonedError, innermost

PROG = "zonectl"

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_NO_CAPACITY = 6
EXIT_PERMISSION_DENIED = 7
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

#: Daemon error codes with their own exit status; every other code exits 1.
EXIT_BY_ERROR_CODE: dict[str, int] = {
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
    "no_capacity": EXIT_NO_CAPACITY,
    "permission_denied": EXIT_PERMISSION_DENIED,
}

EXIT_STATUS_HELP = """\
exit status:
    0  success
    1  the daemon reported another error (invalid_request, hypervisor,
       internal, unsupported_version), or its reply made no sense
    2  usage error
    3  daemon unavailable (no socket, nothing listening, connection lost)
    4  not_found
    5  conflict
    6  no_capacity
    7  permission_denied (by the daemon or by the socket's file mode)
  130  interrupted (Ctrl-C)
  141  stdout closed early
"""


# ---------------------------------------------------------------------------
# Errors and exit status
# ---------------------------------------------------------------------------


def _is_permission_error(exc: DaemonUnavailable) -> bool:
    return exc.errno in (errno.EACCES, errno.EPERM)


def error_code_of(exc: BaseException) -> str:
    """The ``<code>`` zonectl prints for a failure."""
    if isinstance(exc, ZonedError):
        return exc.code
    if isinstance(exc, DaemonUnavailable):
        return "permission_denied" if _is_permission_error(exc) else "unavailable"
    if isinstance(exc, ConnectionLost):
        return "connection_lost"
    if isinstance(exc, ClientError):
        return "protocol_error"
    return "internal"


def exit_code_for(exc: BaseException) -> int:
    """The exit status for a failure (see the module docstring)."""
    if isinstance(exc, ZonedError):
        return EXIT_BY_ERROR_CODE.get(exc.code, EXIT_DAEMON_ERROR)
    if isinstance(exc, DaemonUnavailable):
        return EXIT_PERMISSION_DENIED if _is_permission_error(exc) else EXIT_UNAVAILABLE
    if isinstance(exc, ConnectionLost):
        return EXIT_UNAVAILABLE
    return EXIT_DAEMON_ERROR


def error_line(exc: ZonedError | ClientError) -> str:
    """``zonectl: <code>: <message>``, always one line."""
    return f"{PROG}: {error_code_of(exc)}: {_one_line(exc.message)}"


# ---------------------------------------------------------------------------
# Pure formatting
# ---------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Free text (reasons, paths) made safe for a terminal: control characters escaped."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _one_line(text: str) -> str:
    return _clean(" ".join(text.split()))


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
    return ",".join(f"{key}={_clean(labels[key])}" for key in sorted(labels))


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


def format_zone_table(zones: Sequence[p.ZoneInfo], now: float) -> str:
    """The ``list`` table, sorted by name.

    CPUS is the set of host CPUs the vCPUs are pinned to (or the placement,
    ``shared``, when unpinned); AGE counts from creation to ``now``; BOOT is
    creation to ready (``-`` until then).
    """
    rows = [
        (
            zone.name,
            zone.state,
            str(zone.vcpus),
            format_mib(zone.memory_mib),
            _zone_cpus(zone),
            _clean(zone.profile),
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


def format_zone(zone: p.ZoneInfo, now: float) -> str:
    """The ``show`` block: every field of one zone."""
    pinning = (
        " ".join(f"vcpu{index}:{cpu}" for index, cpu in enumerate(zone.cpus))
        if zone.cpus
        else "not pinned"
    )
    pairs: list[tuple[str, str]] = [
        ("name", zone.name),
        ("uuid", _clean(zone.uuid)),
        ("state", zone.state),
    ]
    if zone.reason:
        pairs.append(("reason", _one_line(zone.reason)))
    pairs += [
        ("vcpus", str(zone.vcpus)),
        ("memory", format_mib(zone.memory_mib)),
        ("placement", zone.placement),
        ("cpus", pinning),
        ("emulator cpus", format_cpu_list(zone.emulator_cpus)),
        ("numa node", "-" if zone.numa_node is None else str(zone.numa_node)),
        ("profile", _clean(zone.profile)),
        ("kernel", _clean(zone.kernel_release) or "-"),
        ("machine", f"{zone.machine} ({zone.accelerator})"),
        ("labels", format_labels(zone.labels)),
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
    pairs.append(("console log", _clean(zone.console_log)))
    return _block(pairs)


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
                f"{_clean(kernel.profile)}: {_clean(kernel.kernel_release)}"
                f" (sha256 {kernel.image_sha256[:12]})",
            )
        )
    if not host.kernels:
        pairs.append(("kernels", "none"))
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
            ]
        )
    header = ["NAME", "STATE", "CPU%", "VCPUS", "HOST RSS", "GUEST MEM", "LOAD", "PROCS", "EXECS"]
    return format_table(header, lines)


def format_event(event: p.Event) -> str:
    """One ``watch`` line (no newline): time, sequence number, what happened."""
    head = f"{format_time(event.time)} #{event.seq}"
    reason = f" ({_one_line(event.reason)})" if event.reason else ""
    if event.kind == "zone_state":
        previous = _clean(event.previous) or "-"
        return f"{head} zone {_clean(event.zone)}: {previous} -> {_clean(event.state)}{reason}"
    if event.kind in ("cpu_online", "cpu_offline"):
        cpu = "?" if event.cpu is None else str(event.cpu)
        return f"{head} cpu {cpu} {event.kind.removeprefix('cpu_')}{reason}"
    if event.kind == "daemon":
        return f"{head} daemon: {_one_line(event.reason) or '-'}"
    return f"{head} {_clean(str(event.kind))}{reason}"


def to_plain(value: Any) -> Any:
    """Records as plain JSON-able values with every field (``omit_defaults`` undone)."""
    if isinstance(value, msgspec.Struct):
        return {name: to_plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    return value


def format_json(value: Any) -> str:
    """One line of JSON (no newline) for ``--json``."""
    return msgspec.json.encode(to_plain(value)).decode()


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may be empty; the daemon checks both)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number >= 1, got 0")
    return value


def _global_options(after_command: bool) -> argparse.ArgumentParser:
    """``--socket`` and ``--json``, accepted before and after the command.

    After it they default to SUPPRESS, so as not to reset what came before
    it. Each parser gets its own instance: parents share action objects, and
    set_defaults would change them for every parser at once.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS if after_command else None,
        help=f"the daemon's socket (default: ${SOCKET_ENV}, else {DEFAULT_SOCKET})",
    )
    options.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if after_command else False,
        help="machine-readable output: one JSON document per line",
    )
    return options


def label_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--label",
        dest="labels",
        type=parse_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def zone_options(parser: argparse.ArgumentParser) -> None:
    """What a new zone looks like (``create`` and ``run``)."""
    parser.add_argument("--vcpus", type=_positive_int, default=1, metavar="N")
    parser.add_argument("--memory", type=_positive_int, default=256, metavar="MIB")
    parser.add_argument("--profile", default="strict", metavar="P", help="guest kernel profile")
    parser.add_argument("--placement", choices=("shared", "exclusive"), default="shared")
    parser.add_argument(
        "--machine", choices=("microvm", "q35"), default=None, help="default: the daemon's"
    )
    label_option(parser, "repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; :func:`parse_args` adds the checks argparse cannot do."""
    common = _global_options(after_command=True)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage zones: small VMs with their own hardened kernel, run by zoned.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(after_command=False)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=help,
            parents=[common],
            epilog=EXIT_STATUS_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    command("host", "show the host: accelerator, CPUs, memory, kernels")

    create = command("create", "create a zone and wait until it is ready")
    create.add_argument("name", metavar="NAME")
    zone_options(create)
    create.add_argument(
        "--kernel-arg",
        dest="kernel_args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra guest kernel argument; repeatable",
    )

    list_ = command("list", "list zones")
    label_option(list_, "only zones with this label; repeatable (all must match)")

    show = command("show", "show one zone")
    show.add_argument("name", metavar="NAME")

    destroy = command("destroy", "destroy zones")
    destroy.add_argument("names", metavar="NAME", nargs="+")

    command("watch", "print events as they happen, one per line, until Ctrl-C")

    logs = command("logs", "write a zone's serial console log (raw bytes) to stdout")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("--follow", "-f", action="store_true", help="keep writing new output")
    logs.add_argument(
        "--tail", type=_non_negative_int, default=None, metavar="BYTES", help="last BYTES only"
    )

    def process_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--interactive",
            "-i",
            action="store_true",
            help="send zonectl's stdin to the process (else its stdin is empty)",
        )
        sub.add_argument(
            "--env",
            "-e",
            dest="env",
            type=parse_label,
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="environment variable; repeatable (PATH has a default)",
        )
        sub.add_argument(
            "--tty",
            "-t",
            action="store_true",
            help="run on a pseudo-terminal (with -i: a raw, interactive session)",
        )
        sub.add_argument(
            "--memory-limit",
            type=_positive_int,
            default=None,
            metavar="MIB",
            help="memory limit of the command and its children (OOM-killed beyond it)",
        )
        sub.add_argument(
            "--pids-limit",
            type=_positive_int,
            default=None,
            metavar="N",
            help="most processes the command and its children may have at once",
        )
        sub.add_argument("--workdir", "-w", default="/", metavar="DIR", help="default: /")
        sub.add_argument("--user", "-u", default="0:0", metavar="UID[:GID]", help="default: 0:0")
        sub.add_argument(
            "argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]", help="what to run"
        )

    exec_ = command(
        "exec", "run a command in a zone, streaming its output; exits with its exit status"
    )
    exec_.add_argument("name", metavar="ZONE")
    process_options(exec_)

    run = command(
        "run",
        "boot a fresh zone, run a command in it, destroy it; exits with the command's status",
    )
    zone_options(run)
    run.add_argument("--name", default="", help="zone name (default: run-<random>)")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill the command (exit 124) when the whole run takes longer",
    )
    process_options(run)

    cp = command(
        "cp",
        "copy a file or directory between this host and a zone (ZONE:PATH on one side)",
    )
    cp.add_argument("source", metavar="SRC", help="a local path or ZONE:PATH")
    cp.add_argument("dest", metavar="DEST", help="a local path or ZONE:PATH")
    cp.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=1024**3,
        metavar="N",
        help="refuse to copy more than N bytes out of a zone (default: 1 GiB)",
    )

    top = command("top", "live CPU and memory of every zone: the host's view and the guest's")
    top.add_argument("--once", action="store_true", help="one sample, then exit")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="default: 1")
    return parser


def parse_user(text: str) -> tuple[int, int]:
    uid_text, _, gid_text = text.partition(":")
    try:
        uid = int(uid_text)
        gid = int(gid_text) if gid_text else uid
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UID[:GID] as numbers, got {text!r}") from None
    return uid, gid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; exits (status 2) on a usage error.

    ``labels`` becomes a dict; a key given twice is a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "labels"):
        labels: dict[str, str] = {}
        for key, value in args.labels:
            if key in labels:
                parser.error(f"label {key!r} given more than once")
            labels[key] = value
        args.labels = labels
    if hasattr(args, "argv"):
        argv = list(args.argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        if not argv:
            parser.error(f"{args.command}: give the command to run after --")
        args.argv = argv
        env: dict[str, str] = {}
        for key, value in args.env:
            env[key] = value
        args.env = env
        try:
            args.uid, args.gid = parse_user(args.user)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    return args


# ---------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------


class _Output:
    def __init__(self, stdout: TextIO, stderr: TextIO, json: bool) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.json = json

    def text(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def record(self, value: Any, human: str) -> None:
        self.text(format_json(value) + "\n" if self.json else human)

    def error(self, exc: ZonedError | ClientError) -> None:
        self.stderr.write(error_line(exc) + "\n")
        self.stderr.flush()

    def binary(self) -> BinaryIO:
        return _binary(self.stdout)


async def _destroy(client: Client, names: Sequence[str], out: _Output) -> int:
    results: list[p.ZoneInfo | ZonedError | ClientError | None] = [None] * len(names)

    async def one(index: int, name: str) -> None:
        try:
            results[index] = await client.destroy_zone(name)
        except (ZonedError, ClientError) as exc:
            results[index] = exc

    async with trio.open_nursery() as nursery:
        for index, name in enumerate(names):
            nursery.start_soon(one, index, name)

    status = EXIT_OK
    destroyed: list[p.ZoneInfo] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, p.ZoneInfo):
            destroyed.append(result)
            if not out.json:
                out.text(f"destroyed {name} ({result.state})\n")
        elif result is not None:
            out.error(result)
            if status == EXIT_OK:
                status = exit_code_for(result)
    if out.json:
        out.text(format_json(destroyed) + "\n")
    return status


async def _run(args: argparse.Namespace, out: _Output) -> int:
    async with Client.connect(args.socket, PROG) as client:
        match args.command:
            case "host":
                host = await client.host_info()
                out.record(host, format_host(host))
            case "create":
                zone = await client.create_zone(
                    args.name,
                    vcpus=args.vcpus,
                    memory_mib=args.memory,
                    profile=args.profile,
                    kernel_args=args.kernel_args,
                    placement=args.placement,
                    labels=args.labels,
                    machine=args.machine,
                )
                out.record(zone, format_zone(zone, time.time()))
            case "list":
                zones = await client.list_zones(args.labels)
                out.record(zones, format_zone_table(zones, time.time()))
            case "show":
                zone = await client.get_zone(args.name)
                out.record(zone, format_zone(zone, time.time()))
            case "destroy":
                return await _destroy(client, args.names, out)
            case "watch":
                async for event in client.watch_events():
                    out.text((format_json(event) if out.json else format_event(event)) + "\n")
            case "logs":
                sink = out.binary()
                async for chunk in client.console_log(args.name, args.follow, args.tail):
                    sink.write(chunk)
                    sink.flush()
            case "exec" | "run":
                return await _process(client, args, out)
            case "top":
                await _top(client, args, out)
            case "cp":
                await _copy(client, args, out)
            case _:  # pragma: no cover - argparse only accepts the commands above
                raise AssertionError(args.command)
    return EXIT_OK


#: ``zonectl run`` when the command was killed by the run's timeout (as timeout(1)).
EXIT_TIMED_OUT = 124


def process_exit_status(result: ExecResult) -> int:
    """zonectl's exit status for a process: its own, 128+signal, or 124 (timed out)."""
    if result.timed_out:
        return EXIT_TIMED_OUT
    if result.exit_code is not None:
        return result.exit_code
    return 128 + (result.signal or 0)


async def _forward_stdin(process: Process) -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while data := await stream.receive_some(p.MAX_EXEC_CHUNK):
            await process.write(data)
    await process.close_stdin()


async def _forward_signals(process: Process, tty: bool = False) -> None:
    """Ctrl-C and SIGTERM go to the process; zonectl waits for it to end.

    With a terminal, a change of the local window size resizes the zone's.
    """
    wanted = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP] + ([signal.SIGWINCH] if tty else [])
    with trio.open_signal_receiver(*wanted) as signals:
        async for signum in signals:
            if signum == signal.SIGWINCH:
                await process.resize(*_terminal_size())
            else:
                await process.signal(signum)


async def _process(client: Client, args: argparse.Namespace, out: _Output) -> int:
    rows, cols = _terminal_size() if args.tty else (24, 80)
    options: dict[str, Any] = {
        "env": args.env,
        "cwd": args.workdir,
        "uid": args.uid,
        "gid": args.gid,
        "stdin": args.interactive,
        "tty": args.tty,
        "rows": rows,
        "cols": cols,
        "memory_limit_mib": args.memory_limit,
        "pids_limit": args.pids_limit,
    }
    if args.tty and "TERM" not in args.env:
        options["env"] = {**args.env, "TERM": os.environ.get("TERM", "xterm")}
    if args.command == "exec":
        manager = client.exec_process(args.name, args.argv, **options)
    else:
        manager = client.run_process(
            args.argv,
            name=args.name,
            vcpus=args.vcpus,
            memory_mib=args.memory,
            profile=args.profile,
            placement=args.placement,
            labels=args.labels,
            machine=args.machine,
            timeout_s=args.timeout,
            **options,
        )
    raw = args.tty and args.interactive and sys.stdin.isatty()
    with _raw_terminal(raw):
        async with manager as process, trio.open_nursery() as nursery:
            if args.interactive:
                nursery.start_soon(_forward_stdin, process)
            nursery.start_soon(_forward_signals, process, args.tty)
            await _copy_output(process, out, args, nursery)
    return _report(process, out, args)


async def _copy_output(
    process: Process, out: _Output, args: argparse.Namespace, nursery: trio.Nursery
) -> None:
    if out.json:
        stdout, stderr = bytearray(), bytearray()
        async for chunk in process:
            (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
        process.collected = (bytes(stdout), bytes(stderr))
    else:
        sinks = {"stdout": out.binary(), "stderr": _binary(out.stderr)}
        async for chunk in process:
            sink = sinks[chunk.stream]
            sink.write(chunk.data)
            sink.flush()
    nursery.cancel_scope.cancel()


def _report(process: Process, out: _Output, args: argparse.Namespace) -> int:
    result = process.result
    assert result is not None
    if out.json:
        stdout, stderr = process.collected
        out.text(
            format_json(
                {
                    "zone": process.zone.name if process.zone else args.name,
                    "pid": process.pid,
                    "exit_code": result.exit_code,
                    "signal": result.signal,
                    "timed_out": result.timed_out,
                    "oom_killed": result.oom_killed,
                    "cpu_time_s": result.cpu_time_s,
                    "memory_peak_kib": result.memory_peak_kib,
                    "stdout": stdout.decode(errors="replace"),
                    "stderr": stderr.decode(errors="replace"),
                }
            )
            + "\n"
        )
    elif result.timed_out:
        out.stderr.write(f"{PROG}: the run timed out after {args.timeout:g} s; killed\n")
        out.stderr.flush()
    elif result.oom_killed:
        out.stderr.write(f"{PROG}: killed: out of memory (limit {args.memory_limit} MiB)\n")
        out.stderr.flush()
    return process_exit_status(result)


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return 24, 80
    return max(1, min(size.lines, 4096)), max(1, min(size.columns, 4096))


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """The local terminal in raw mode (so Ctrl-C etc. reach the zone), restored after."""
    if not enabled:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def split_zone_path(text: str) -> tuple[str, str] | None:
    """``ZONE:PATH`` as (zone, path); None for a local path."""
    zone, sep, path = text.partition(":")
    if not sep or not re.fullmatch(p.ZONE_NAME_PATTERN, zone):
        return None
    if not path.startswith("/"):
        raise InvalidRequest(f"{text!r}: the path in a zone must be absolute")
    return zone, path


async def _local_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as source:
        while chunk := await source.read(p.MAX_EXEC_CHUNK):
            yield chunk


def _pack(directory: Path, into: Path) -> None:
    with tarfile.open(into, "w") as archive:
        for entry in sorted(directory.iterdir()):
            archive.add(entry, arcname=entry.name)


def _unpack(archive_path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path, "r") as archive:
        archive.extractall(directory, filter="data")


async def _copy(client: Client, args: argparse.Namespace, out: _Output) -> None:
    source, dest = split_zone_path(args.source), split_zone_path(args.dest)
    if (source is None) == (dest is None):
        raise InvalidRequest("give exactly one side as ZONE:PATH (the other is a local path)")
    with tempfile.TemporaryDirectory(prefix="zonectl-") as tmp:
        scratch = Path(tmp) / "tree.tar"
        if dest is not None:
            zone, path = dest
            local = Path(args.source)
            if local.is_dir():
                await trio.to_thread.run_sync(_pack, local, scratch)
                await client.put_tree(zone, path, _local_chunks(scratch))
                what = "directory"
            else:
                if path.endswith("/"):
                    path += local.name
                mode = local.stat().st_mode & 0o777
                size = await client.put_file(zone, path, _local_chunks(local), mode=mode)
                what = f"{size} bytes"
            if not out.json:
                out.text(f"copied {args.source} to {zone}:{path} ({what})\n")
            return
        assert source is not None
        zone, path = source
        local = Path(args.dest)
        if await client.is_directory(zone, path):
            async with await trio.open_file(scratch, "wb") as sink:
                async for chunk in client.stream_tree(zone, path, max_bytes=args.max_bytes):
                    await sink.write(chunk)
            await trio.to_thread.run_sync(_unpack, scratch, local)
            what = "directory"
        else:
            if local.is_dir():
                local = local / PurePosixPath(path).name
            partial = local.with_name(f".{local.name}.zonectl-partial")
            size = 0
            try:
                async with await trio.open_file(partial, "wb") as sink:
                    async for chunk in client.stream_file(zone, path, max_bytes=args.max_bytes):
                        await sink.write(chunk)
                        size += len(chunk)
                partial.replace(local)
            finally:
                partial.unlink(missing_ok=True)
            what = f"{size} bytes"
        if not out.json:
            out.text(f"copied {zone}:{path} to {local} ({what})\n")


async def _sample(client: Client) -> dict[str, p.ZoneMetricsData]:
    samples: dict[str, p.ZoneMetricsData] = {}
    for zone in await client.list_zones():
        try:
            samples[zone.name] = await client.zone_metrics(zone.name)
        except ZonedError:
            continue  # destroyed meanwhile
    return samples


async def _top(client: Client, args: argparse.Namespace, out: _Output) -> None:
    interval = max(0.1, args.interval)
    previous = await _sample(client)
    live = not args.once and out.stdout.isatty() and not out.json
    while True:
        await trio.sleep(interval)
        current = await _sample(client)
        rows = [(m, cpu_percent(previous.get(name), m)) for name, m in sorted(current.items())]
        if out.json:
            out.text(format_json([{**to_plain(m), "cpu_percent": cpu} for m, cpu in rows]) + "\n")
        else:
            clear = "\x1b[H\x1b[2J" if live else ""
            out.text(clear + format_top(rows))
        if args.once:
            return
        previous = current


def _binary(stream: TextIO) -> BinaryIO:
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        raise TypeError("stream has no binary buffer")
    return buffer  # type: ignore[no-any-return]


def _silence_stdout() -> None:
    # Python would complain again flushing the dead pipe at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run zonectl; returns the exit status (see the module docstring)."""
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
        out = _Output(sys.stdout, sys.stderr, args.json)
        try:
            return trio.run(_run, args, out)
        except BaseException as raised:
            if isinstance(raised, BaseExceptionGroup) and raised.subgroup(KeyboardInterrupt):
                return EXIT_INTERRUPTED
            failure = innermost(raised)
            if isinstance(failure, ZonedError | ClientError):
                out.error(failure)
                return exit_code_for(failure)
            if isinstance(failure, BrokenPipeError):
                _silence_stdout()
                return EXIT_BROKEN_PIPE
            raise
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
