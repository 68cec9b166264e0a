"""zonectl's commands, run: one client, one request (or stream), its output.

:func:`run_command` dispatches on the parsed command line; each runner
prints through :class:`Output` (human text or ``--json``) and returns the
exit status. Formatting is :mod:`zoned.cli.format`'s, signals and the
terminal :mod:`zoned.cli.terminal`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO, get_args

import trio

from zoned import protocol as p
from zoned.cli.cp import copy
from zoned.cli.exits import (
    EXIT_OK,
    PROG,
    error_line,
    exit_code_for,
    exit_note,
    process_exit_status,
)
from zoned.cli.format import (
    cpu_percent,
    format_audit_table,
    format_event,
    format_host,
    format_image,
    format_image_sizes,
    format_image_table,
    format_json,
    format_net,
    format_net_counters,
    format_pool_table,
    format_process_json,
    format_progress,
    format_quarantine,
    format_removal,
    format_top,
    format_top_json,
    format_zone,
    format_zone_table,
)
from zoned.cli.terminal import SignalRelay, forward_stdin, raw_terminal, terminal_size
from zoned.client import Client, ClientError, Process
from zoned.errors import ZonedError

if TYPE_CHECKING:
    from zoned.client import ProcessOptions, ZoneOptions


class Output:
    """Where a command's results go: stdout (text or ``--json``), errors to stderr."""

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

    def note(self, line: str) -> None:
        self.stderr.write(line + "\n")
        self.stderr.flush()

    def binary(self) -> BinaryIO:
        return binary(self.stdout)


class ImageProgressLine:
    """A pull's or import's progress, rewritten in place on a terminal (nothing elsewhere)."""

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self._shown = False

    def update(self, event: p.ImageProgress) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + format_progress(event)[:200] + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


def binary(stream: TextIO) -> BinaryIO:
    """The byte stream under a text stream (flushed first)."""
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        raise TypeError("stream has no binary buffer")
    return buffer  # type: ignore[no-any-return]


async def run_command(args: argparse.Namespace, out: Output) -> int:
    """Connect, run the command, return its exit status."""
    async with Client(args.socket, PROG) as client:
        match args.command:
            case "host":
                host = await client.host_info()
                out.record(host, format_host(host))
            case "create":
                zone = await client.create_zone(
                    args.name, kernel_args=args.kernel_args, **zone_options(args)
                )
                out.record(zone, format_zone(zone, time.time(), user_names([zone])))
            case "list":
                zones = await client.list_zones(args.labels)
                out.record(zones, format_zone_table(zones, time.time(), user_names(zones)))
            case "show":
                zone = await client.get_zone(args.name)
                text = format_zone(zone, time.time(), user_names([zone]))
                if zone.net is not None and not out.json:
                    with contextlib.suppress(ZonedError):
                        text += format_net_counters((await client.zone_metrics(zone.name)).net)
                out.record(zone, text)
            case "net":
                await net_command(client, args, out)
            case "destroy":
                return await destroy(client, args.names, out)
            case "watch":
                kinds = args.kinds or list(get_args(p.EventKind))
                async for event in client.watch_events(args.zones, kinds):
                    out.text((format_json(event) if out.json else format_event(event)) + "\n")
            case "logs":
                sink = out.binary()
                chunks = client.console_log(args.name, args.follow, args.tail, uuid=args.uuid)
                async for chunk in chunks:
                    sink.write(chunk)
                    sink.flush()
            case "audit":
                await audit(client, args, out)
            case "quarantine":
                reply = await client.quarantine_zone(args.name, destroy=args.destroy)
                out.record(reply, format_quarantine(reply))
                if reply.bundle.partial:
                    out.note(f"{PROG}: the evidence bundle is partial: see 'missing' above")
            case "exec" | "run":
                return await run_process(client, args, out)
            case "top":
                await top(client, args, out)
            case "cp":
                copied = await copy(
                    client, args.source, args.dest, args.max_bytes, outward_links=args.outward_links
                )
                if not out.json:
                    out.text(copied + "\n")
            case "image":
                return await image_command(client, args, out)
            case "pool":
                return await pool_command(client, args, out)
            case _:  # pragma: no cover - argparse only accepts the commands above
                raise AssertionError(args.command)
    return EXIT_OK


def user_names(zones: Sequence[p.ZoneInfo]) -> dict[int, str]:
    """The names of the zones' owners on this host (the daemon's), where it has them."""
    names: dict[int, str] = {}
    for uid in {zone.owner_uid for zone in zones if zone.owner_uid is not None}:
        with contextlib.suppress(KeyError):
            names[uid] = pwd.getpwuid(uid).pw_name
    return names


def zone_options(args: argparse.Namespace) -> ZoneOptions:
    """The new zone's options from ``create``/``run``'s command line."""
    options: ZoneOptions = {
        "vcpus": args.vcpus,
        "memory_mib": args.memory,
        "profile": args.profile,
        "placement": args.placement,
        "labels": args.labels,
        "machine": args.machine,
        "writable_layer": args.writable_layer,
        "writable_layer_mib": args.writable_size,
        "net": ",".join(args.net) if args.net else None,
        "publishes": args.publishes,
    }
    if args.image is not None:
        options["image"] = args.image
    return options


async def net_command(client: Client, args: argparse.Namespace, out: Output) -> None:
    """``net show ZONE`` and ``net set ZONE [RULES] [--publish ...]``."""
    if args.net_command == "show":
        zone = await client.get_zone(args.name)
        metrics = await client.zone_metrics(args.name)
        if out.json:
            out.text(format_json({"zone": zone, "net": metrics.net}) + "\n")
        else:
            out.text(format_net(zone) + format_net_counters(metrics.net))
        return
    zone, closed = await client.set_zone_net(args.name, args.rules, args.publishes)
    if out.json:
        out.text(format_json({"zone": zone, "connections_closed": closed}) + "\n")
    else:
        out.text(format_net(zone))
        out.note(f"open connections closed by the new policy: {closed}")


def process_options(args: argparse.Namespace) -> ProcessOptions:
    """The process's options from ``exec``/``run``'s command line."""
    rows, cols = terminal_size() if args.tty else (24, 80)
    env = args.env
    if args.tty and "TERM" not in env:
        env = {**env, "TERM": os.environ.get("TERM", "xterm")}
    return {
        "env": env,
        "workdir": args.workdir,
        "user": args.user,
        "entrypoint": args.entrypoint,
        "stdin": args.interactive,
        "tty": args.tty,
        "rows": rows,
        "cols": cols,
        "memory_limit_mib": args.memory_limit,
        "pids_limit": args.pids_limit,
        "no_new_privs": args.no_new_privs,
    }


async def destroy(client: Client, names: Sequence[str], out: Output) -> int:
    """Destroy every name concurrently; report each failure; the first failure's status."""
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


async def run_process(client: Client, args: argparse.Namespace, out: Output) -> int:
    """``exec`` and ``run``: stream the process, relay signals, exit with its status."""
    options = process_options(args)
    if args.command == "exec":
        manager = client.exec_process(args.name, args.argv, **options)
    else:
        manager = client.run_process(
            args.argv, name=args.name, timeout_s=args.timeout, **zone_options(args), **options
        )
    relay = SignalRelay(client, out.stderr, tty=args.tty)
    raw = args.tty and args.interactive and sys.stdin.isatty()
    # Signals are taken before the request goes out: none finds zonectl unprepared.
    with raw_terminal(raw), trio.open_signal_receiver(*relay.signals) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay.serve, signals, nursery.cancel_scope)
                async with manager as process:
                    relay.process = process
                    collected = await _stream(process, out, args.interactive)
                nursery.cancel_scope.cancel()
        except BaseException:
            if relay.left is not None:
                raise relay.left from None  # what breaking the connection caused
            raise
        if relay.left is not None and process.result is None:
            raise relay.left
    result = process.result
    assert result is not None
    if out.json:
        zone = process.zone.name if process.zone else args.name
        out.text(format_process_json(zone, process.pid, result.exit, *collected) + "\n")
    else:
        timeout_s = args.timeout if args.command == "run" else None
        note = exit_note(result.exit, timeout_s=timeout_s, memory_limit_mib=args.memory_limit)
        if note is not None:
            out.note(note)
    return process_exit_status(result.exit)


async def _stream(process: Process, out: Output, interactive: bool) -> tuple[bytes, bytes]:
    """Copy the process's output out (collected with ``--json``) until it ends; stdin in."""
    stdout, stderr = bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        if interactive:
            nursery.start_soon(forward_stdin, process)
        if out.json:
            async for chunk in process:
                (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
        else:
            sinks = {"stdout": out.binary(), "stderr": binary(out.stderr)}
            async for chunk in process:
                sink = sinks[chunk.stream]
                sink.write(chunk.data)
                sink.flush()
        nursery.cancel_scope.cancel()
    return bytes(stdout), bytes(stderr)


async def audit(client: Client, args: argparse.Namespace, out: Output) -> None:
    """``audit``: every record as JSON lines as they come, or one table at the end."""
    records: list[p.AuditRecord] = []
    async for record in client.audit(args.zone, args.since):
        if out.json:
            out.text(format_json(record) + "\n")
        else:
            records.append(record)
    if not out.json:
        out.text(format_audit_table(records))


async def image_command(client: Client, args: argparse.Namespace, out: Output) -> int:
    """``image pull|import|list|inspect|rm|prune|sizes``."""
    match args.image_command:
        case "pull" | "import":
            progress = ImageProgressLine(out.stderr, enabled=not out.json and out.stderr.isatty())
            try:
                if args.image_command == "pull":
                    secret = (
                        sys.stdin.readline().rstrip("\n")
                        if (args.password_stdin or args.token_stdin)
                        else None
                    )
                    image = await client.pull_image(
                        args.reference,
                        platform=args.platform,
                        tags=args.tags,
                        username=args.username,
                        password=secret if args.password_stdin else None,
                        registry_token=secret if args.token_stdin else None,
                        tls_verify=not args.insecure,
                        progress=progress.update,
                    )
                else:
                    image = await client.import_image(
                        args.path,
                        reference=args.reference,
                        platform=args.platform,
                        tags=args.tags,
                        progress=progress.update,
                    )
            finally:
                progress.close()
            out.record(image, format_image(image))
        case "list":
            images = await client.list_images()
            out.record(images, format_image_table(images))
        case "inspect":
            image = await client.inspect_image(args.reference)
            out.record(image, format_image(image))
        case "rm":
            return await remove_images(client, args.references, out)
        case "prune":
            removal = await client.prune_images()
            out.record(removal, format_removal(removal))
        case "sizes":
            sizes = await client.image_sizes()
            out.record(sizes, format_image_sizes(sizes))
        case _:  # pragma: no cover - argparse only accepts the actions above
            raise AssertionError(args.image_command)
    return EXIT_OK


async def pool_command(client: Client, args: argparse.Namespace, out: Output) -> int:
    """``pool set|list|rm``."""
    match args.pool_command:
        case "set":
            spec = p.PoolSpec(
                image=args.image or "",
                profile=args.profile,
                vcpus=args.vcpus,
                memory_mib=args.memory,
                machine=args.machine,
                writable_layer=args.writable_layer,
                writable_layer_mib=args.writable_size,
                size=args.size,
            )
            pool = await client.set_pool(args.name, spec)
            out.record(pool, format_pool_table([pool], time.time()))
        case "list":
            pools = await client.list_pools()
            out.record(pools, format_pool_table(pools, time.time()))
        case "rm":
            removed = [await client.remove_pool(name) for name in args.names]
            out.record(removed, format_pool_table(removed, time.time()))
        case _:  # pragma: no cover - argparse only accepts the actions above
            raise AssertionError(args.pool_command)
    return EXIT_OK


async def remove_images(client: Client, references: Sequence[str], out: Output) -> int:
    """``image rm``: each in turn; report each failure; the first failure's status."""
    status = EXIT_OK
    removals: list[p.ImageRemoveReply] = []
    for reference in references:
        try:
            removal = await client.remove_image(reference)
        except (ZonedError, ClientError) as exc:
            out.error(exc)
            if status == EXIT_OK:
                status = exit_code_for(exc)
            continue
        removals.append(removal)
        if not out.json:
            out.text(format_removal(removal))
    if out.json:
        out.text(format_json(removals) + "\n")
    return status


async def _sample(client: Client) -> dict[str, p.ZoneMetricsData]:
    samples: dict[str, p.ZoneMetricsData] = {}
    for zone in await client.list_zones():
        try:
            samples[zone.name] = await client.zone_metrics(zone.name)
        except ZonedError:
            continue  # destroyed meanwhile
    return samples


async def top(client: Client, args: argparse.Namespace, out: Output) -> None:
    """``top``: sample every zone's metrics each interval; CPU use between samples."""
    interval = max(0.1, args.interval)
    previous = await _sample(client)
    live = not args.once and out.stdout.isatty() and not out.json
    while True:
        await trio.sleep(interval)
        current = await _sample(client)
        rows = [(m, cpu_percent(previous.get(name), m)) for name, m in sorted(current.items())]
        if out.json:
            out.text(format_top_json(rows) + "\n")
        else:
            clear = "\x1b[H\x1b[2J" if live else ""
            out.text(clear + format_top(rows))
        if args.once:
            return
        previous = current
