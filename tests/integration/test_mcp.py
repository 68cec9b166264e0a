"""zoned-mcp as an MCP client runs it: a subprocess on stdio, driven by the mcp SDK's client.

One private zoned serves the module. The first test is one agent's session
end to end (its zones are shared by its checks: one zone of the session, one
fresh zone for run_code, one leftover of a dead session to reclaim); the
second ends a session by SIGTERM in the middle of a call. Needs what
``.ci/run`` sets up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

import mcp_types as types
import psutil
import pytest
import trio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.integration.conftest import private_zoned
from tests.zone_events import watching
from zoned import protocol as p
from zoned.client import Client
from zoned.errors import NotFound
from zoned.localdaemon import LocalDaemon
from zoned.mcp.labels import LABEL_SESSION, LABEL_UID
from zoned.mcp.tools import TOOLS

pytestmark = pytest.mark.integration

ZONED_MCP = Path(sys.executable).parent / "zoned-mcp"
CALL_TIMEOUT_S = 300.0
#: Small limits, to see them cut output and refuse writes without big data.
LIMITS = ["--max-output", "4096", "--max-write", "100000", "--max-zones", "3"]


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    with private_zoned("mcp-") as daemon:
        yield daemon


@contextlib.asynccontextmanager
async def mcp_session(daemon: LocalDaemon, errlog: TextIO) -> AsyncIterator[ClientSession]:
    if not ZONED_MCP.exists():
        pytest.fail(f"{ZONED_MCP} is missing: install zoned into this venv (pip install -e .)")
    server = StdioServerParameters(
        command=str(ZONED_MCP),
        args=["--socket", str(daemon.socket), "--log-level", "info", *LIMITS],
    )
    async with (
        stdio_client(server, errlog=errlog) as (read, write),
        ClientSession(read, write) as session,
    ):
        with trio.fail_after(CALL_TIMEOUT_S):
            await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    with trio.fail_after(CALL_TIMEOUT_S):
        result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {text_of(result)}"
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    """The error message of a call that must fail."""
    with trio.fail_after(CALL_TIMEOUT_S):
        result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool}({arguments}) did not fail: {result}"
    return text_of(result)


def text_of(result: types.CallToolResult) -> str:
    (content,) = result.content
    assert isinstance(content, types.TextContent), content
    return content.text


async def our_zones(daemon: LocalDaemon) -> list[p.ZoneInfo]:
    """The zones of this uid's sessions still there (not stopped)."""
    async with Client(daemon.socket, client_name="it") as client:
        zones = await client.list_zones({LABEL_UID: str(os.getuid())})
    return [zone for zone in zones if zone.state != "stopped"]


def log_text(log: TextIO) -> str:
    """What zoned-mcp wrote to its stderr so far."""
    log.flush()
    return Path(log.name).read_text()


async def test_an_agent_session_over_stdio(zoned: LocalDaemon, tmp_path: Path) -> None:
    # A zone that a session which no longer runs left behind: this process's
    # pid with a start time it never had.
    async with Client(zoned.socket, client_name="it") as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            await client.create_zone(
                "mcp-leftover",
                labels={LABEL_UID: str(os.getuid()), LABEL_SESSION: f"{os.getpid()}.1"},
            )

    with open(tmp_path / "zoned-mcp.log", "w") as log:
        async with mcp_session(zoned, log) as session:
            listed = await session.list_tools()
            assert sorted(tool.name for tool in listed.tools) == sorted(t.name for t in TOOLS)
            for tool in listed.tools:
                assert tool.input_schema["type"] == "object", tool
                assert tool.output_schema is not None and tool.output_schema["type"] == "object"

            # A zone of the session and a fresh zone for run_code, booting together.
            results: dict[str, dict[str, Any]] = {}

            async def create() -> None:
                results["zone"] = await call(session, "create_zone", name="work", vcpus=1)

            async def python() -> None:
                results["python"] = await call(
                    session, "run_code", language="python", code="import sys; print(6 * 7)"
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(create)
                nursery.start_soon(python)
            zone = results["zone"]["zone"]
            assert results["zone"]["name"] == "work" and results["zone"]["state"] == "ready"
            ran = results["python"]
            assert (ran["exit_code"], ran["stdout"], ran["fresh_zone"]) == (0, "42\n", True), ran

            # The leftover was reclaimed before the first call was served.
            async with Client(zoned.socket, client_name="it") as client:
                try:
                    info = await client.get_zone("mcp-leftover")
                except NotFound:
                    pass
                else:
                    assert info.state == "stopped", info
            assert "mcp-leftover" in log_text(log)

            shell = await call(
                session,
                "run_code",
                language="shell",
                zone="work",
                code="echo $((6 * 7)); echo oops >&2; exit 3",
            )
            assert (shell["exit_code"], shell["stdout"], shell["stderr"]) == (3, "42\n", "oops\n")
            assert not shell["fresh_zone"] and shell["zone"] == zone

            text = "héllo from the host\n" * 10
            wrote = await call(
                session, "write_file", zone="work", path="/work/out/hello.txt", content=text
            )
            assert wrote["bytes_written"] == len(text.encode())
            back = await call(session, "read_file", zone=zone, path="/work/out/hello.txt")
            assert (back["content"], back["truncated"]) == (text, False)
            cut = await call(
                session, "read_file", zone="work", path="/work/out/hello.txt", max_bytes=7
            )
            assert (cut["content"], cut["truncated"]) == ("héllo ", True) and cut["notes"]
            listing = await call(session, "list_files", zone="work", path="/work/out")
            assert [(e["name"], e["type"], e["size"]) for e in listing["entries"]] == [
                ("hello.txt", "file", len(text.encode()))
            ]

            failed = await call(session, "run_command", zone="work", argv=["ls", "/no/such"])
            assert failed["exit_code"] not in (0, None) and "/no/such" in failed["stderr"]
            slow = await call(
                session, "run_command", zone="work", argv=["sleep", "60"], timeout_s=1
            )
            assert (slow["timed_out"], slow["signal"], slow["exit_code"]) == (True, 9, None), slow
            loud = await call(
                session,
                "run_command",
                zone="work",
                argv=["python3", "-c", "print('a' * 50000 + 'END')"],
            )
            assert loud["stdout_bytes"] == 50004 and len(loud["stdout"].encode()) < 4300
            assert loud["stdout"].startswith("aaa") and loud["stdout"].endswith("END\n")
            assert any("cut" in note for note in loud["notes"]), loud["notes"]

            # Bad input: a clear error, nothing done.
            assert "absolute path" in await refused(
                session, "read_file", zone="work", path="relative.txt"
            )
            assert "no zone 'elsewhere'" in await refused(
                session, "run_command", zone="elsewhere", argv=["true"]
            )
            assert "timeout_s" in await refused(
                session, "run_command", zone="work", argv=["true"], timeout_s=0
            )
            assert "at most 100000 bytes" in await refused(
                session, "write_file", zone="work", path="/work/big", content="x" * 100001
            )
            assert "no tool" in await refused(session, "format_disk")
            assert "a zone named 'work' already" in await refused(
                session, "create_zone", name="work"
            )
            gone = await call(session, "run_command", zone="work", argv=["ls", "/work"])
            assert gone["stdout"] == "out\n", gone  # the oversized write left nothing

            zones = await call(session, "list_zones")
            assert [z["zone"] for z in zones["zones"]] == [zone]

        # The session is over: its zones are gone.
        assert await our_zones(zoned) == []
        assert "session ended: 1 zone(s) destroyed" in log_text(log)


async def test_sigterm_ends_the_session_and_its_zones(zoned: LocalDaemon, tmp_path: Path) -> None:
    with open(tmp_path / "zoned-mcp.log", "w") as log:
        async with mcp_session(zoned, log) as session:
            (server,) = [
                child
                for child in psutil.Process().children()
                if any("zoned-mcp" in part for part in child.cmdline())
            ]
            answered: list[types.CallToolResult] = []
            over = trio.Event()

            async def long_call() -> None:
                try:
                    answered.append(
                        await session.call_tool(
                            "run_code", {"language": "shell", "code": "sleep 600", "timeout_s": 600}
                        )
                    )
                except Exception:
                    pass  # the server went away under it: that is the point
                finally:
                    over.set()

            async with (
                Client(zoned.socket, client_name="it") as client,
                watching(client) as events,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(long_call)
                with trio.fail_after(CALL_TIMEOUT_S):
                    await events.wait_for(
                        lambda e: e.zone.startswith("mcp-") and e.state == "ready"
                    )
                server.send_signal(signal.SIGTERM)
                # The call ends when the server has: its stdout closes at its exit.
                with trio.fail_after(CALL_TIMEOUT_S):
                    await over.wait()
        assert answered == [], answered
        assert await our_zones(zoned) == []
        text = log_text(log)
        assert "SIGTERM: the session ends" in text and "session ended" in text, text
