"""The MCP side of zoned-mcp: the SDK's low-level server on stdio, under trio.

The ``mcp`` SDK is written for anyio, which runs on trio: this is one
``trio.run`` like the rest of zoned, the SDK's tasks are trio tasks and the
:class:`~zoned.client.Client` of the session is used from them directly.

Rules:

- ``tools/list`` and ``tools/call`` only. Each call is decoded by
  :func:`zoned.mcp.tools.parse_arguments` and done by the
  :class:`~zoned.mcp.session.Session`; whatever goes wrong becomes a result
  with ``isError`` and a message for the model (a bug is logged with its
  traceback on stderr and reported only as an internal error), never a
  protocol error and never a crash.
- The wire is this process's stdin and stdout, read and written by trio
  itself (:func:`stdio_streams`), not by the SDK's default, which reads stdin
  in a worker thread that a cancellation cannot stop: SIGTERM would then wait
  for the client's next line. File descriptors 0 and 1 are pointed at
  /dev/null and stderr meanwhile, so that nothing else can write into the
  JSON-RPC stream.
- The session ends when stdin closes or at SIGTERM, SIGINT or SIGHUP; its
  zones are then destroyed (within :data:`CLOSE_TIMEOUT_S`; a second signal
  stops waiting). If this process dies instead, the daemon destroys them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import mcp_types as types
import msgspec
import trio
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

import zoned
from zoned.errors import innermost
from zoned.mcp import results as r
from zoned.mcp import tools as t
from zoned.mcp.options import Config
from zoned.mcp.session import Session

log = logging.getLogger(__name__)

#: How long the end of a session may take to destroy its zones.
CLOSE_TIMEOUT_S = 60.0
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_RECEIVE_CHUNK = 64 * 1024

INSTRUCTIONS = """\
zoned runs code in zones: small virtual machines with their own kernel, no
network, and a root filesystem from an image (by default Debian bookworm with
python3) whose writes stay in memory. Use run_code for a snippet in a fresh
zone, or create_zone and then run_command, write_file, read_file and
list_files in it. Every zone of this session is destroyed when the session
ends."""


def tool_list(limits: t.Limits) -> list[types.Tool]:
    return [
        types.Tool(
            name=tool.name,
            title=tool.title,
            description=tool.description,
            input_schema=t.input_schema(tool, limits),
            output_schema=t.output_schema(tool),
            annotations=types.ToolAnnotations(
                title=tool.title,
                read_only_hint=tool.read_only,
                destructive_hint=tool.destructive,
                idempotent_hint=tool.idempotent,
                open_world_hint=False,
            ),
        )
        for tool in t.TOOLS
    ]


def error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


def success_result(result: r.ToolResult) -> types.CallToolResult:
    data = msgspec.to_builtins(result)
    return types.CallToolResult(
        content=[types.TextContent(text=msgspec.json.encode(data).decode())],
        structured_content=data,
    )


async def call_tool(
    session: Session, name: str, arguments: dict[str, Any] | None
) -> types.CallToolResult:
    """One ``tools/call``, whatever happens, as a result."""
    tool = t.TOOLS_BY_NAME.get(name)
    if tool is None:
        known = ", ".join(t.TOOLS_BY_NAME)
        return error_result(f"no tool {name!r}; the tools are: {known}")
    try:
        args = t.parse_arguments(tool, arguments, session.limits)
        return success_result(await session.handlers[name](args))
    except Exception as raised:
        exc = innermost(raised)
        if isinstance(exc, r.EXPECTED_ERRORS):
            log.info("tool %s: %s", name, r.error_text(exc))
        else:
            log.error("tool %s failed unexpectedly", name, exc_info=exc)
        return error_result(r.error_text(exc))


def build_server(session: Session) -> Server[Any]:
    tools = tool_list(session.limits)

    async def on_list_tools(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def on_call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await call_tool(session, params.name, params.arguments)

    return Server(
        "zoned-mcp",
        version=zoned.__version__,
        instructions=INSTRUCTIONS,
        on_list_tools=on_list_tools,
        on_call_tool=on_call_tool,
    )


# ---------------------------------------------------------------------------
# stdio
# ---------------------------------------------------------------------------


class _Lines:
    """JSON-RPC lines from the wire, read by trio (cancellable), each at most ``max_line`` bytes."""

    def __init__(self, stream: trio.lowlevel.FdStream, max_line: int) -> None:
        self._stream = stream
        self._max_line = max_line

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        buffer = bytearray()
        skipping = False
        while data := await self._stream.receive_some(_RECEIVE_CHUNK):
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                if not skipping:
                    buffer += data[start : end + 1]
                    yield buffer.decode(errors="replace")
                skipping = False
                buffer.clear()
                start = end + 1
            if not skipping:
                buffer += data[start:]
                if len(buffer) > self._max_line:
                    log.error("a message on stdin is longer than %d bytes: dropped", self._max_line)
                    skipping = True
                    buffer.clear()
        if buffer and not skipping:
            yield buffer.decode(errors="replace")


class _Writer:
    """The wire's other half: each message is written whole by trio."""

    def __init__(self, stream: trio.lowlevel.FdStream) -> None:
        self._stream = stream

    async def write(self, text: str) -> None:
        await self._stream.send_all(text.encode())

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()


def claim_stdio() -> tuple[int, int]:
    """Private copies of fds 0 and 1 for the wire; 0 becomes /dev/null and 1 stderr."""
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return wire_in, wire_out


def max_message_bytes(limits: t.Limits) -> int:
    """The longest line a client needs: the largest write_file, in base64, and room to spare."""
    return limits.max_write_bytes * 4 // 3 + 1024 * 1024


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------


async def serve(config: Config) -> None:
    """Serve one MCP session on stdio until it ends, then end its zones."""
    wire_in, wire_out = claim_stdio()
    serving = trio.CancelScope()
    closing = trio.CancelScope()
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            # The first signal ends the session, a second one its clean-up.
            nursery.start_soon(_on_signals, signals, [serving, closing])
            session = Session(config, nursery)
            server = build_server(session)
            nursery.start_soon(_connect_early, session)
            try:
                with serving:
                    stdin = _Lines(
                        trio.lowlevel.FdStream(wire_in), max_message_bytes(config.limits)
                    )
                    stdout = _Writer(trio.lowlevel.FdStream(wire_out))
                    # The SDK takes any object with async line iteration and write/flush.
                    async with stdio_server(
                        stdin=cast("anyio.AsyncFile[str]", stdin),
                        stdout=cast("anyio.AsyncFile[str]", stdout),
                    ) as (read_stream, write_stream):
                        options = server.create_initialization_options()
                        await server.run(read_stream, write_stream, options)
                    log.info("stdin closed: the session ends")
            finally:
                with trio.CancelScope(shield=True), closing, trio.move_on_after(CLOSE_TIMEOUT_S):
                    await session.close()
                nursery.cancel_scope.cancel()


async def _connect_early(session: Session) -> None:
    """Connect (and reclaim) at start; a daemon that is not there yet is tried again per call."""
    try:
        await session.client()
    except Exception as raised:
        log.warning("%s (tried again at the first tool call)", r.error_text(innermost(raised)))


async def _on_signals(signals: AsyncIterator[int], scopes: list[trio.CancelScope]) -> None:
    """Each signal cancels the next of ``scopes``."""
    async for signum in signals:
        scope = next((scope for scope in scopes if not scope.cancel_called), None)
        if scope is not None:
            log.info(
                "%s: %s",
                signal.Signals(signum).name,
                "the session ends" if scope is scopes[0] else "not waiting for its zones",
            )
            scope.cancel()
