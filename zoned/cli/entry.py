"""``zonectl``'s entry point: parse, run, turn every failure into its exit status."""

from __future__ import annotations

import os
import sys

import trio

from zoned.cli.args import parse_args
from zoned.cli.commands import Output, run_command
from zoned.cli.exits import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    StoppedWaiting,
    exit_code_for,
)
from zoned.client import ClientError
from zoned.errors import ZonedError, innermost


def _silence_stdout() -> None:
    # Python would complain again flushing the dead pipe at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run zonectl; returns the exit status (see :mod:`zoned.cli`)."""
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
        out = Output(sys.stdout, sys.stderr, args.json)
        try:
            return trio.run(run_command, args, out)
        except BaseException as raised:
            if isinstance(raised, BaseExceptionGroup) and raised.subgroup(KeyboardInterrupt):
                return EXIT_INTERRUPTED
            failure = innermost(raised)
            if isinstance(failure, StoppedWaiting):
                out.note(f"{PROG}: interrupted: stopped waiting for the process")
                return failure.status
            if isinstance(failure, ZonedError | ClientError):
                out.error(failure)
                return exit_code_for(failure)
            if isinstance(failure, BrokenPipeError):
                _silence_stdout()
                return EXIT_BROKEN_PIPE
            raise
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
