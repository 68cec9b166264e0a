"""zoned-mcp: an MCP server (stdio) that lets an agent run code in zones.

It is a thin translation of MCP tool calls onto :class:`zoned.client.Client`:
no zone logic of its own. By job:

=====================================  ==========================================
:mod:`zoned.mcp.tools`                 the tools, pure: argument Structs, their
                                       schemas, the limits
:mod:`zoned.mcp.results`               results, bounded output, error text (pure)
:mod:`zoned.mcp.labels`                the labels that tie zones to a session,
                                       leftovers of dead sessions (pure)
:mod:`zoned.mcp.options`               the command line (and ``ZONED_MCP_*``)
:mod:`zoned.mcp.session`               one session's zones and the tool calls,
                                       over one client connection
:mod:`zoned.mcp.server`                the ``mcp`` SDK's server on stdio, under
                                       trio; signals and the session's end
=====================================  ==========================================

The ``mcp`` SDK is an optional dependency (the ``mcp`` extra, locked in
``requirements/mcp.txt``: ``tools/install-locked VENV mcp``):
only :mod:`zoned.mcp.server` imports it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from zoned.mcp.options import PROG, log_level, parse_config

#: Exit statuses: as zonectl's where they mean the same.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=log_level(config), stream=sys.stderr, format=f"{PROG}: %(levelname)s: %(message)s"
    )
    try:
        import trio

        from zoned.mcp.server import serve
    except ImportError as exc:
        print(
            f"{PROG}: the MCP SDK is missing ({exc}): install zoned with its mcp extra,"
            " from the lock: bash tools/install-locked VENV mcp (docs/host-setup.md)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        trio.run(serve, config)
    except Exception:
        logging.getLogger(PROG).exception("zoned-mcp failed")
        return EXIT_FAILED
    return EXIT_OK


__all__ = ["main"]
