"""zonectl's command line: the parser, and the checks argparse cannot do.

An option that becomes a wire field takes its bounds and its default from
that field of :mod:`zoned.protocol` (the very rule the daemon's decoder
applies), so the command line and the protocol cannot disagree.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, get_args

import msgspec
import msgspec.inspect

from zoned import protocol as p
from zoned.cli.exits import EXIT_STATUS_HELP, PROG
from zoned.client import DEFAULT_MAX_FILE, DEFAULT_SOCKET, SOCKET_ENV

# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may be empty; the daemon checks both)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_user(text: str) -> str:
    """``USER[:GROUP]``: names (the image's /etc/passwd, /etc/group) or numbers."""
    user, sep, group = text.partition(":")
    if not user or (sep and (not group or ":" in group)):
        raise argparse.ArgumentTypeError(f"expected USER[:GROUP], got {text!r}")
    return text


def parse_entrypoint(text: str) -> list[str]:
    """``--entrypoint PROGRAM`` (as Docker's): one program; "" clears the image's."""
    return [text] if text else []


def _field(kind: type[msgspec.Struct], name: str) -> msgspec.inspect.Field:
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        if field.name == name:
            return field
    raise AssertionError(f"{kind.__name__} has no field {name!r}")


_Number = msgspec.inspect.IntType | msgspec.inspect.FloatType


def _number_type(kind: type[msgspec.Struct], name: str) -> _Number:
    """The numeric type of a wire field (of ``T | None`` too), with its bounds."""
    field_type = _field(kind, name).type
    candidates = (
        field_type.types if isinstance(field_type, msgspec.inspect.UnionType) else (field_type,)
    )
    for candidate in candidates:
        if isinstance(candidate, _Number):
            return candidate
    raise AssertionError(f"{kind.__name__}.{name} is not a number")


def wire_default(kind: type[msgspec.Struct], name: str) -> Any:
    """The protocol's default for a field (what the daemon takes when it is left out)."""
    default = _field(kind, name).default
    assert default is not msgspec.NODEFAULT, f"{kind.__name__}.{name} has no default"
    return default


def describe_bounds(bounds: _Number) -> str:
    """``a whole number from 1 to 256``, ``a number > 0 and <= 86400``."""
    whole = isinstance(bounds, msgspec.inspect.IntType)
    noun = "a whole number" if whole else "a number"
    if whole and bounds.ge is not None and bounds.le is not None:
        return f"{noun} from {bounds.ge} to {bounds.le}"
    limits = [
        f"{word} {value:g}"
        for word, value in (
            (">=", bounds.ge),
            (">", bounds.gt),
            ("<=", bounds.le),
            ("<", bounds.lt),
        )
        if value is not None
    ]
    return f"{noun} {' and '.join(limits)}" if limits else noun


def _within(bounds: _Number, value: float) -> bool:
    return (
        (bounds.ge is None or value >= bounds.ge)
        and (bounds.gt is None or value > bounds.gt)
        and (bounds.le is None or value <= bounds.le)
        and (bounds.lt is None or value < bounds.lt)
    )


def wire_number(kind: type[msgspec.Struct], name: str) -> Callable[[str], Any]:
    """An argparse ``type`` for the option that becomes ``kind.name``: its type and bounds."""
    bounds = _number_type(kind, name)
    whole = isinstance(bounds, msgspec.inspect.IntType)
    expected = describe_bounds(bounds)

    def parse(text: str) -> int | float:
        try:
            value: int | float = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not _within(bounds, value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


def wire_option(
    parser: argparse.ArgumentParser,
    flag: str,
    kind: type[msgspec.Struct],
    name: str,
    metavar: str,
    help: str | None = None,
) -> None:
    """A numeric option that becomes ``kind.name``: the field's type, bounds and default."""
    parser.add_argument(
        flag,
        type=wire_number(kind, name),
        default=wire_default(kind, name),
        metavar=metavar,
        help=help,
    )


def parse_uuid(text: str) -> str:
    """A zone's uuid as the protocol writes it (lower-case, hyphenated)."""
    value = text.strip().lower()
    if not re.fullmatch(p.UUID_PATTERN, value):
        raise argparse.ArgumentTypeError(f"expected a zone's uuid, got {text!r}")
    return value


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float) -> float:
    """A point in time as Unix seconds: ``30s``/``10m``/``2h``/``3d`` ago, ``@<unix
    seconds>``, or an ISO 8601 time (``2026-12-02T04:00:00Z``; without an offset: UTC).

    Raises :class:`argparse.ArgumentTypeError` saying what is accepted.
    """
    expected = (
        "expected a time: 30s, 10m, 2h or 3d ago, @<unix seconds>,"
        f" or ISO 8601 like 2026-12-02T04:00:00Z; got {text!r}"
    )
    value = text.strip()
    if not value:
        raise argparse.ArgumentTypeError(expected)
    if value[-1] in _UNITS and value[:-1].replace(".", "", 1).isdigit():
        seconds = float(value[:-1]) * _UNITS[value[-1]]
        return max(0.0, now - seconds)
    if value.startswith("@"):
        try:
            unix = float(value[1:])
        except ValueError:
            raise argparse.ArgumentTypeError(expected) from None
        if not 0.0 <= unix <= 1e10:
            raise argparse.ArgumentTypeError(f"{expected} (out of range)")
        return unix
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    unix = moment.timestamp()
    if not 0.0 <= unix <= 1e10:
        raise argparse.ArgumentTypeError(f"{expected} (out of range)")
    return unix


def _positive_int(text: str) -> int:
    """A client-side count (no wire field): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------
# Options shared by several commands
# ---------------------------------------------------------------------------


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


def tag_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="also tag the image so; repeatable",
    )


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


def zone_options(parser: argparse.ArgumentParser, kind: type[p.CreateZone | p.RunZone]) -> None:
    """What a new zone looks like (``create``: ``kind`` CreateZone; ``run``: RunZone)."""
    wire_option(parser, "--vcpus", kind, "vcpus", "N")
    wire_option(parser, "--memory", kind, "memory_mib", "MIB")
    parser.add_argument(
        "--profile", default=wire_default(kind, "profile"), metavar="P", help="guest kernel profile"
    )
    parser.add_argument(
        "--placement", choices=get_args(p.Placement), default=wire_default(kind, "placement")
    )
    parser.add_argument(
        "--machine", choices=get_args(p.Machine), default=None, help="default: the daemon's"
    )
    label_option(parser, "repeatable")
    image_options(parser, kind)
    net_options(parser)


def image_options(
    parser: argparse.ArgumentParser, kind: type[p.CreateZone | p.RunZone | p.PoolSpec]
) -> None:
    """The new zone's workload root: its image and its writable layer."""
    parser.add_argument(
        "--image",
        default=None,
        metavar="IMAGE",
        help=f"the workload root: an image of the daemon's store (default: its default"
        f" image; {p.BUILTIN_IMAGE}: the small built-in root)",
    )
    parser.add_argument(
        "--writable-layer",
        choices=get_args(p.WritableLayer),
        default=wire_default(kind, "writable_layer"),
        help="where the zone's writes go: tmpfs (its RAM) or disk (a scratch disk of its own);"
        " default: %(default)s",
    )
    wire_option(
        parser,
        "--writable-size",
        kind,
        "writable_layer_mib",
        "MIB",
        "the writable layer's size (default: tmpfs half the zone's memory, the most it may"
        " take; disk the daemon's default_scratch_mib)",
    )


def net_options(parser: argparse.ArgumentParser, *, for_change: bool = False) -> None:
    """``--net`` and ``--publish`` (``create``, ``run``; ``net set`` changes them)."""
    if not for_change:
        parser.add_argument(
            "--net",
            action="append",
            default=None,
            metavar="none|open|RULE,...",
            help="the zone's network: none (the default: no NIC), open (the internet,"
            " never the host's networks), or an allow-list: NAME[:PORTS] (*.NAME for"
            " every name below), CIDR[:PORTS][/tcp|/udp], e.g."
            " pypi.org,*.pythonhosted.org:443,10.1.0.0/16:5432; repeatable",
        )
    parser.add_argument(
        "--publish",
        "-p",
        dest="publishes",
        action="append",
        default=None if for_change else [],
        metavar="[ADDRESS:]HOST_PORT:ZONE_PORT",
        help="the zone's TCP port on the host (address default 127.0.0.1); repeatable",
    )


def process_options(parser: argparse.ArgumentParser) -> None:
    """How a process runs (``exec`` and ``run``), then its command line."""
    parser.add_argument(
        "--interactive",
        "-i",
        action="store_true",
        help="send zonectl's stdin to the process (else its stdin is empty)",
    )
    parser.add_argument(
        "--env",
        "-e",
        dest="env",
        type=parse_label,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable; repeatable (PATH has a default)",
    )
    parser.add_argument(
        "--tty",
        "-t",
        action="store_true",
        help="run on a pseudo-terminal (with -i: a raw, interactive session)",
    )
    wire_option(
        parser,
        "--memory-limit",
        p.Exec,
        "memory_limit_mib",
        "MIB",
        "memory limit of the command and its children (OOM-killed beyond it)",
    )
    wire_option(
        parser,
        "--pids-limit",
        p.Exec,
        "pids_limit",
        "N",
        "most processes the command and its children may have at once",
    )
    parser.add_argument(
        "--no-new-privs",
        action="store_true",
        help="the command and its children can never gain privileges (setuid programs"
        " run as the caller)",
    )
    parser.add_argument(
        "--workdir",
        "-w",
        default=None,
        metavar="DIR",
        help="working directory (default: the image's WorkingDir, else /)",
    )
    parser.add_argument(
        "--user",
        "-u",
        type=parse_user,
        default=None,
        metavar="USER[:GROUP]",
        help="run as this user, by name (the image's /etc/passwd) or number"
        " (default: the image's User, else root)",
    )
    parser.add_argument(
        "--entrypoint",
        type=parse_entrypoint,
        default=None,
        metavar="PROGRAM",
        help="replace the image's Entrypoint (and drop its Cmd); '' clears it",
    )


def command_line(parser: argparse.ArgumentParser, metavar: str, help: str) -> None:
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar=metavar, help=help)


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------


def _subcommand(
    parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    """A (sub)command taking ``--socket`` and ``--json`` after its name too."""
    return parent.add_parser(
        name,
        help=help,
        description=help,
        parents=[_global_options(after_command=True)],
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; :func:`parse_args` adds the checks argparse cannot do."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage zones: small VMs with their own hardened kernel, run by zoned.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(after_command=False)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return _subcommand(commands, name, help)

    command("host", "show the host: accelerator, CPUs, memory, kernels")

    create = command("create", "create a zone and wait until it is ready")
    create.add_argument("name", metavar="NAME")
    zone_options(create, p.CreateZone)
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

    watch = command(
        "watch", "print events as they happen (zones, processes, the host), until Ctrl-C"
    )
    watch.add_argument(
        "--zone",
        dest="zones",
        action="append",
        default=[],
        metavar="NAME",
        help="only this zone's events; repeatable",
    )
    watch.add_argument(
        "--kind",
        dest="kinds",
        action="append",
        default=[],
        choices=get_args(p.EventKind),
        help="only events of this kind; repeatable (default: every kind)",
    )

    net = command("net", "a running zone's network: show it, or change its policy")
    net_commands = net.add_subparsers(dest="net_command", metavar="ACTION", required=True)
    net_show = _subcommand(net_commands, "show", "policy, publishes, addresses and counters")
    net_show.add_argument("name", metavar="ZONE")
    net_set = _subcommand(
        net_commands, "set", "a new policy and/or publishes, in force at once (no restart)"
    )
    net_set.description = (
        "A new allow-list (none, open, or RULE,... as for create --net)"
        " and/or publishes; open connections it no longer allows are closed."
    )
    net_set.add_argument("name", metavar="ZONE")
    net_set.add_argument("rules", nargs="?", default=None, metavar="none|open|RULE,...")
    net_options(net_set, for_change=True)
    net_set.add_argument(
        "--no-publish", action="store_true", help="remove every publish of the zone"
    )

    logs = command(
        "logs",
        "write a zone's serial console log (raw bytes) to stdout; a destroyed zone's"
        " log while the daemon keeps it",
    )
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("--follow", "-f", action="store_true", help="keep writing new output")
    wire_option(logs, "--tail", p.ConsoleLog, "tail_bytes", "BYTES", "last BYTES only")
    logs.add_argument(
        "--uuid",
        default=None,
        type=parse_uuid,
        metavar="UUID",
        help="that zone of the name (default: the zone now, else the newest destroyed one)",
    )

    audit = command(
        "audit",
        "print the audit trail: who created, ran, destroyed, quarantined what, and how it ended",
    )
    audit.add_argument("--zone", default="", metavar="NAME", help="only this zone's records")
    audit.add_argument(
        "--since",
        default=None,
        metavar="TIME",
        help="only records from TIME on: 30s, 10m, 2h, 3d (ago), @UNIX, or ISO 8601",
    )

    quarantine = command(
        "quarantine",
        "freeze a zone now (vCPUs paused, processes refused) and collect its evidence"
        " (memory, logs, audit records, events, what it booted) into a bundle on the host",
    )
    quarantine.add_argument("name", metavar="ZONE")
    quarantine.add_argument(
        "--destroy", action="store_true", help="destroy the zone once its evidence is collected"
    )

    exec_ = command(
        "exec", "run a command in a zone, streaming its output; exits with its exit status"
    )
    exec_.add_argument("name", metavar="ZONE")
    process_options(exec_)
    command_line(
        exec_,
        "-- COMMAND [ARG...]",
        "what to run (none: the image's Entrypoint and Cmd)",
    )

    run = command(
        "run",
        "boot a fresh zone of an image, run a command in it, destroy it; exits with the"
        " command's status",
    )
    zone_options(run, p.RunZone)
    run.add_argument("--name", default="", help="zone name (default: run-<random>)")
    wire_option(
        run,
        "--timeout",
        p.RunZone,
        "timeout_s",
        "SECONDS",
        "kill the command (exit 124) when it runs longer (from its start: the zone's"
        " boot is not counted, the daemon's boot timeout bounds it)",
    )
    process_options(run)
    command_line(
        run,
        "[IMAGE] [-- COMMAND [ARG...]]",
        "the image (default: the daemon's default image) and the command, which replaces the"
        " image's Cmd (none: the image's Entrypoint and Cmd)",
    )

    cp = command(
        "cp",
        "copy a file or directory between this host and a zone (ZONE:PATH on one side)",
    )
    cp.add_argument("source", metavar="SRC", help="a local path or ZONE:PATH")
    cp.add_argument("dest", metavar="DEST", help="a local path or ZONE:PATH")
    cp.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_FILE,
        metavar="N",
        help="refuse to copy more than N bytes out of a zone (default: 1 GiB)",
    )
    cp.add_argument(
        "--outward-links",
        action="store_true",
        help="copy symbolic links that lead outside the directory as they are (by default"
        " they refuse the copy; links are never followed while copying)",
    )

    image = command("image", "manage the daemon's images: pull, import, list, inspect, remove")
    images = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return _subcommand(images, name, help)

    pull = action("pull", "fetch an image from its registry and convert it")
    pull.add_argument("reference", metavar="REFERENCE", help="name[:tag][@digest]")
    pull.add_argument("--platform", default=None, help="os/arch[/variant] (default: the host's)")
    tag_option(pull)
    pull.add_argument("--username", default=None, help="registry user name")
    pull.add_argument(
        "--password-stdin", action="store_true", help="read the registry password from stdin"
    )
    pull.add_argument(
        "--token-stdin", action="store_true", help="read a registry bearer token from stdin"
    )
    pull.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, no TLS (a registry on loopback only)",
    )

    import_ = action(
        "import", "import an OCI image layout (a directory) or a docker save / OCI archive"
    )
    import_.add_argument("path", metavar="PATH", help="a layout directory or an archive file")
    import_.add_argument(
        "--name",
        dest="reference",
        default=None,
        metavar="NAME",
        help="which image of a layout or archive holding several (ref.name, repo:tag)",
    )
    import_.add_argument("--platform", default=None, help="os/arch[/variant] (default: the host's)")
    tag_option(import_)

    action("list", "list the images")
    inspect = action("inspect", "show one image: tags, digests, its config")
    inspect.add_argument("reference", metavar="IMAGE")
    remove = action("rm", "untag or remove images (refused while a zone uses one)")
    remove.add_argument("references", metavar="IMAGE", nargs="+")
    action("prune", "remove every image no zone uses (the default image stays)")
    action("sizes", "disk use of the image store, per image")

    pool = command("pool", "warm pools: booted, never-used zones that run and create take")
    pools = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    pool_set = _subcommand(pools, "set", "create or change a pool (root and administrators)")
    pool_set.add_argument("name", metavar="NAME")
    wire_option(pool_set, "--size", p.PoolSpec, "size", "N", "zones to keep ready")
    wire_option(pool_set, "--vcpus", p.PoolSpec, "vcpus", "N")
    wire_option(pool_set, "--memory", p.PoolSpec, "memory_mib", "MIB")
    pool_set.add_argument(
        "--profile",
        default=wire_default(p.PoolSpec, "profile"),
        metavar="P",
        help="guest kernel profile",
    )
    pool_set.add_argument(
        "--machine", choices=get_args(p.Machine), default=None, help="default: the daemon's"
    )
    image_options(pool_set, p.PoolSpec)
    _subcommand(pools, "list", "list the pools: ready zones, hits, misses, refill failures")
    pool_rm = _subcommand(pools, "rm", "remove pools; their unused zones are destroyed")
    pool_rm.add_argument("names", metavar="NAME", nargs="+")

    top = command("top", "live CPU and memory of every zone: the host's view and the guest's")
    top.add_argument("--once", action="store_true", help="one sample, then exit")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="default: 1")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; exits (status 2) on a usage error.

    ``labels`` becomes a dict; a key given twice is a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "audit" and args.since is not None:
        try:
            args.since = parse_since(args.since, time.time())
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--since: {exc}")
    if hasattr(args, "labels"):
        labels: dict[str, str] = {}
        for key, value in args.labels:
            if key in labels:
                parser.error(f"label {key!r} given more than once")
            labels[key] = value
        args.labels = labels
    if args.command == "net" and args.net_command == "set":
        if args.no_publish:
            if args.publishes:
                parser.error("net set: --publish and --no-publish contradict each other")
            args.publishes = []
        if args.rules is None and args.publishes is None:
            parser.error("net set: give the new rules, --publish or --no-publish")
    if hasattr(args, "argv"):
        words = list(args.argv)
        before, command = (
            (words[: words.index("--")], words[words.index("--") + 1 :])
            if "--" in words
            else (words, [])
        )
        if args.command == "exec":
            # No -- at all: every word is the command, as before images.
            args.argv = command if "--" in words else before
            if "--" in words and before:
                parser.error(
                    f"exec: unexpected {' '.join(before)!r} before --"
                    " (options go before the zone's name)"
                )
        else:
            if len(before) > 1:
                parser.error(
                    "run: give at most one image, then the command after --:"
                    " zonectl run [OPTIONS] [IMAGE] [-- COMMAND [ARG...]]"
                )
            if before:
                if args.image is not None and args.image != before[0]:
                    parser.error(f"run: two images: --image {args.image} and {before[0]}")
                args.image = before[0]
            args.argv = command
        env: dict[str, str] = {}
        for key, value in args.env:
            env[key] = value
        args.env = env
    if getattr(args, "password_stdin", False) and getattr(args, "token_stdin", False):
        parser.error("image pull: --password-stdin or --token-stdin, not both")
    if getattr(args, "password_stdin", False) and not args.username:
        parser.error("image pull: --password-stdin needs --username")
    return args
