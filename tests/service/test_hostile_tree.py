"""``zonectl cp ZONE:/dir DEST`` against a zone that sends a crafted tar stream.

The whole path of a copy out of a zone (client, control socket, daemon, agent
channel) with a fake agent that plays a fully compromised zone: whatever
runs as ``tar`` (the test checks it was asked for the agent's own tools)
answers with an archive built here to write outside the destination. The
copy must fail, naming the entry, write nothing outside and leave no
destination behind; a well-formed tree still copies.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import trio

from tests.service.test_hostile_agent import fake_agent
from zoned import protocol as p
from zoned.cli.cp import copy
from zoned.client import Client, UnsafeTree
from zoned.daemon import Daemon


def crafted(outside: Path) -> dict[str, bytes]:
    """Archives by name, each trying another way out of the destination."""

    def build(*members: tuple[str, bytes, str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, kind, link, data in members:
                info = tarfile.TarInfo(name)
                info.type, info.linkname, info.size = kind, link, len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    return {
        "absolute-link": build(
            (".", tarfile.DIRTYPE, "", b""),
            ("fine.txt", tarfile.REGTYPE, "", b"fine"),
            ("out", tarfile.SYMTYPE, str(outside), b""),
            ("out/evil", tarfile.REGTYPE, "", b"pwned"),
        ),
        "outward-link": build(("up", tarfile.SYMTYPE, "../../outside", b"")),
        "dotdot": build(("../outside/evil", tarfile.REGTYPE, "", b"pwned")),
        "hard-link": build(("h", tarfile.LNKTYPE, str(outside / "file"), b"")),
        "good": build(
            (".", tarfile.DIRTYPE, "", b""),
            ("sub", tarfile.DIRTYPE, "", b""),
            ("sub/a.txt", tarfile.REGTYPE, "", b"alpha"),
            ("link", tarfile.SYMTYPE, "sub/a.txt", b""),
        ),
    }


async def test_a_crafted_archive_writes_nothing_outside_and_cp_leaves_nothing(
    daemon: Daemon, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("untouched\n")
    archives = crafted(outside)
    asked: list[p.AgentExecStart] = []

    async def compromised(stream: trio.SocketStream, start: p.AgentExecStart) -> None:
        asked.append(start)
        out = b""
        if start.argv[0] == "tar":
            out = archives[start.argv[-2].rsplit("/", 1)[-1]]  # -C /trees/<name> .
        messages: list[p.AgentToHost] = [p.AgentExecStarted(exec_id=start.exec_id, pid=2)]
        for offset in range(0, len(out), p.MAX_EXEC_CHUNK):
            chunk = out[offset : offset + p.MAX_EXEC_CHUNK]
            messages.append(p.AgentExecOutput(exec_id=start.exec_id, stream="stdout", data=chunk))
        messages.append(p.AgentExecExit(exec_id=start.exec_id, exit_code=0))
        for message in messages:
            await stream.send_all(p.encode_frame(message, p.AGENT_MAX_FRAME))

    runtime = Path(daemon.config.runtime_dir) / "zones"
    into = tmp_path / "into"
    into.mkdir()
    async with trio.open_nursery() as agents:
        await agents.start(
            lambda task_status: fake_agent(
                runtime / "owned" / "agent.sock",
                compromised,
                every_exec=True,
                task_status=task_status,
            )
        )
        async with Client(daemon.config.socket_path, client_name="test") as client:
            assert (await client.create_zone("owned")).state == "ready"
            expected = {
                "absolute-link": r"member 'out/evil' is inside 'out', which is a symlink",
                "outward-link": r"member 'up' is a symbolic link to '\.\./\.\./outside'",
                "dotdot": r"member '\.\./outside/evil': the name goes up",
                "hard-link": r"member 'h': a hard link to '/.*/outside/file', which is absolute",
            }
            for name, message in expected.items():
                with trio.fail_after(30), pytest.raises(UnsafeTree, match=message):
                    await copy(client, f"owned:/trees/{name}", str(into / name), 1 << 20)
            assert list(into.iterdir()) == []
            assert sorted(outside.iterdir()) == [outside / "file"]
            assert (outside / "file").read_text() == "untouched\n"
            with trio.fail_after(30):
                said = await copy(client, "owned:/trees/good", str(into), 1 << 20)
            assert (into / "good" / "link").read_text() == "alpha"
            assert "1 files, 2 directories, 1 links" in said, said
            await client.destroy_zone("owned")
        agents.cancel_scope.cancel()
    # Every helper of the copy ran with the agent's own tools.
    assert asked and all(start.agent_tools for start in asked), asked
