"""zoned-mcp's command line: the daemon's socket and the session's limits.

Every option may also come from the environment (``ZONED_MCP_<OPTION>``,
e.g. ``ZONED_MCP_MAX_ZONES=2``); an option on the command line wins. The
socket is the client's (``--socket``, else ``$ZONED_SOCKET``, else
``/run/zoned/zoned.sock``). Pure: parsing only.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoned import protocol as p
from zoned.client import DEFAULT_SOCKET, SOCKET_ENV
from zoned.mcp.tools import Limits

PROG = "zoned-mcp"
ENV_PREFIX = "ZONED_MCP_"
LOG_LEVELS = ("debug", "info", "warning", "error")

DESCRIPTION = """\
An MCP server (stdio) that gives an agent zones to run code in: create, list
and destroy zones, run commands and code, write, read and list files. Each
session's zones are destroyed when it ends (stdin closes, SIGTERM, or the
server dies: the daemon then destroys them itself) and carry the labels
zoned-mcp.uid and zoned-mcp.session; at start, zones that dead sessions of
the same user left behind are destroyed (--no-reclaim keeps them)."""


@dataclass(frozen=True)
class Config:
    socket: Path | None
    limits: Limits
    reclaim: bool = True
    log_level: str = "warning"


def _number(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if kind is float and not low < value <= high:
            raise argparse.ArgumentTypeError(f"expected a number > {low:g} and <= {high:g}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}")
        return value

    return parse


# (option, Limits field, parse, help)
_LIMIT_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    # Each zone of a session holds a request open on its connection, which
    # the daemon allows 64 of (MAX_INFLIGHT): the rest are for tool calls.
    ("--max-zones", "max_zones", _number(int, 1, 32), "zones of one session at once"),
    ("--max-vcpus", "max_vcpus", _number(int, 1, p.MAX_VCPUS), "vCPUs of one zone"),
    (
        "--max-memory-mib",
        "max_memory_mib",
        _number(int, p.MIN_MEMORY_MIB, p.MAX_MEMORY_MIB),
        "memory of one zone",
    ),
    (
        "--default-memory-mib",
        "default_memory_mib",
        _number(int, p.MIN_MEMORY_MIB, p.MAX_MEMORY_MIB),
        "memory of a zone when the call gives none",
    ),
    (
        "--default-timeout",
        "default_timeout_s",
        _number(float, 0, p.MAX_RUN_TIMEOUT_S),
        "seconds a command may run when the call gives no timeout_s",
    ),
    (
        "--max-timeout",
        "max_timeout_s",
        _number(float, 0, p.MAX_RUN_TIMEOUT_S),
        "largest timeout_s a call may ask for",
    ),
    (
        "--boot-timeout",
        "boot_timeout_s",
        _number(float, 0, p.MAX_RUN_TIMEOUT_S),
        "seconds a zone may take to boot",
    ),
    (
        "--max-output",
        "max_output_bytes",
        _number(int, 1024, 64 * 1024 * 1024),
        "bytes of each of stdout and stderr in a result (head and tail kept)",
    ),
    (
        "--max-read",
        "max_read_bytes",
        _number(int, 1, 64 * 1024 * 1024),
        "bytes read_file returns at most",
    ),
    (
        "--max-write",
        "max_write_bytes",
        _number(int, 1, 1024 * 1024 * 1024),
        "bytes write_file writes at most",
    ),
    (
        "--max-list-entries",
        "max_list_entries",
        _number(int, 1, 1_000_000),
        "entries list_files returns at most",
    ),
    ("--zone-prefix", "zone_prefix", str, "start of every zone name this server makes"),
)


def env_name(option: str) -> str:
    return ENV_PREFIX + option.removeprefix("--").replace("-", "_").upper()


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Every option can be set in the environment as {ENV_PREFIX}<OPTION>, e.g."
        f" {env_name('--max-zones')}=2.",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=_from_env(environ, "--socket", None, Path),
        metavar="PATH",
        help=f"zoned's control socket (default: ${env_name('--socket')}, else ${SOCKET_ENV},"
        f" else {DEFAULT_SOCKET})",
    )
    for option, name, parse, text in _LIMIT_OPTIONS:
        default = getattr(defaults, name)
        parser.add_argument(
            option,
            dest=name,
            type=parse,
            default=_from_env(environ, option, default, parse),
            metavar="N" if parse is not str else "TEXT",
            help=f"{text} (default {default!s})",
        )
    parser.add_argument(
        "--no-reclaim",
        action="store_false",
        dest="reclaim",
        default=_from_env(environ, "--no-reclaim", "", str) not in ("1", "yes", "true"),
        help="leave the zones of dead sessions alone at start",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=_from_env(environ, "--log-level", "warning", str),
        help="what goes to stderr (default warning)",
    )
    return parser


def _from_env(
    environ: Mapping[str, str], option: str, default: Any, parse: Callable[[str], Any]
) -> Any:
    text = environ.get(env_name(option))
    if text is None or text == "":
        return default
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"{PROG}: {env_name(option)}={text!r}: {exc}") from None


def parse_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """The configuration for ``argv``; exits with status 2 and a message when it is bad."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:
        parser.error(f"{env_name('--log-level')}: one of {', '.join(LOG_LEVELS)}")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}
    try:
        limits = Limits(**values)
    except ValueError as exc:
        parser.error(str(exc))
    return Config(socket=args.socket, limits=limits, reclaim=args.reclaim, log_level=args.log_level)


def log_level(config: Config) -> int:
    level: int = getattr(logging, config.log_level.upper())
    return level
