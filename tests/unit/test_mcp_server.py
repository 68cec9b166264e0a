"""zoned-mcp's MCP side: the tool list, every failure a tool result, the wire read by trio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mcp_types as types
import trio

from zoned.mcp import results as r
from zoned.mcp import server
from zoned.mcp import tools as t
from zoned.mcp.options import Config
from zoned.mcp.session import Session


def test_the_tool_list_is_the_tools_with_their_schemas() -> None:
    limits = t.Limits(max_timeout_s=42.0, default_timeout_s=10.0)
    listed = server.tool_list(limits)
    assert [tool.name for tool in listed] == [spec.name for spec in t.TOOLS]
    for tool, spec in zip(listed, t.TOOLS, strict=True):
        assert tool.input_schema == t.input_schema(spec, limits)
        assert tool.output_schema == t.output_schema(spec)
        assert tool.annotations is not None
        assert tool.annotations.read_only_hint == spec.read_only
        assert tool.annotations.open_world_hint is False


def test_a_result_is_structured_and_the_same_as_text() -> None:
    result = server.success_result(r.WriteResult(zone="z", path="/f", bytes_written=3))
    assert not result.is_error
    assert result.structured_content == {"zone": "z", "path": "/f", "bytes_written": 3}
    (content,) = result.content
    assert isinstance(content, types.TextContent)
    assert json.loads(content.text) == result.structured_content


async def test_every_failure_is_a_tool_error(tmp_path: Path) -> None:
    """No daemon at all: what is refused before connecting, then the connection's own error."""
    config = Config(socket=tmp_path / "no-zoned.sock", limits=t.Limits())
    async with trio.open_nursery() as nursery:
        session = Session(config, nursery)

        async def error(tool: str, arguments: dict[str, object] | None) -> str:
            result = await server.call_tool(session, tool, arguments)
            assert result.is_error and result.structured_content is None, result
            (content,) = result.content
            assert isinstance(content, types.TextContent)
            return content.text

        assert (await error("rm_rf", {})).startswith("no tool 'rm_rf'; the tools are: create_zone")
        assert "absolute path" in await error("read_file", {"zone": "w", "path": "x"})
        assert "invalid arguments" in await error("run_code", None)
        assert "no zone 'w' in this session" in await error(
            "run_command", {"zone": "w", "argv": ["true"]}
        )
        assert session._client is None  # none of that needed zoned
        message = await error("create_zone", {})
        assert message.startswith(f"cannot connect to zoned at {config.socket}: no such socket")
        assert session.zones == {}
        await session.close()


async def test_wire_lines_are_read_by_trio_and_bounded() -> None:
    read_end, write_end = os.pipe()
    lines = server._Lines(trio.lowlevel.FdStream(read_end), max_line=20)
    got: list[str] = []

    async def read_all() -> None:
        async for line in lines:
            got.append(line)

    async with trio.open_nursery() as nursery, trio.lowlevel.FdStream(write_end) as writer:
        nursery.start_soon(read_all)
        for piece in (
            b'{"a":',
            b' 1}\n{"b"',
            b":2}\n",
            b"x" * 30,
            b"y" * 30 + b"\n",
            b"\xff{}\n",
            b"last",
        ):
            await writer.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()
    # The writer closed: the reader ends, with the last line that had no newline.
    assert got == ['{"a": 1}\n', '{"b":2}\n', "\ufffd{}\n", "last"]


async def test_reading_the_wire_stops_at_a_cancel() -> None:
    # The SDK's own stdin reader is a worker thread that no cancellation stops.
    read_end, write_end = os.pipe()
    lines = server._Lines(trio.lowlevel.FdStream(read_end), max_line=100)
    with trio.move_on_after(0.05) as scope:
        async for _line in lines:
            pass
    assert scope.cancelled_caught
    os.close(write_end)


async def test_a_session_counts_its_zones_and_names(tmp_path: Path) -> None:
    config = Config(socket=tmp_path / "no-zoned.sock", limits=t.Limits(max_zones=2))
    async with trio.open_nursery() as nursery:
        session = Session(config, nursery)
        assert session.name_prefix == f"mcp-{session.tag}-" and len(session.tag) == 6
        with session._room_for_a_zone(session.name_prefix + "run1"):
            assert session._unused_name("run") == "run2"
            with session._room_for_a_zone(session.name_prefix + "a"):
                try:
                    with session._room_for_a_zone(session.name_prefix + "b"):
                        raise AssertionError("a third zone was let in")
                except r.ToolInputError as refused:
                    assert "2 zone(s) already" in refused.message
        assert not session._in_use("run1")
        await session.close()
