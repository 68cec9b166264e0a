"""The unmodified e2b SDK against zoned's E2B-compatible endpoint, on real zones.

One private zoned serves the module, its endpoint on a loopback port with
two keys of two owners (``nobody`` and uid 4242, neither root: root would
see every zone). One sandbox, made by the first key, is shared by the tests
in file order; the last tests end it (kill) and make one more (its timeout
passes across a daemon restart, made from a second template: the built-in
root). The README's example is run as written, in a subprocess. Needs what ``.ci/run`` sets up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxQuery,
)

from tests.integration.conftest import private_zoned
from tests.waiting import wait_until
from zoned.client import Client
from zoned.errors import NotFound
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

KEY_A = "e2b_test_key_owner_nobody_" + "a" * 8
KEY_B = "e2b_test_key_owner_4242_" + "b" * 8
MAX_UPLOAD = 1024 * 1024
README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass(frozen=True)
class Endpoint:
    url: str
    daemon: LocalDaemon


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    port = _free_port()
    extra = f"""
[e2b]
enabled = true
listen = "127.0.0.1:{port}"
max_upload_bytes = {MAX_UPLOAD}

[e2b.templates.base]

[e2b.templates.small]
image = "builtin"

[[e2b.keys]]
name = "a"
key_sha256 = "{_sha(KEY_A)}"
owner = "nobody"

[[e2b.keys]]
name = "b"
key_sha256 = "{_sha(KEY_B)}"
owner = "4242"
"""
    url = f"http://127.0.0.1:{port}"
    with sdk_pointed_at(url), private_zoned("e2b-", extra_config=extra) as daemon:
        yield Endpoint(url, daemon)


@contextlib.contextmanager
def sdk_pointed_at(url: str) -> Iterator[None]:
    """E2B_API_URL and E2B_SANDBOX_URL set to ``url`` (as a user sets them), then restored."""
    saved = {name: os.environ.get(name) for name in ("E2B_API_URL", "E2B_SANDBOX_URL")}
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def sandbox(endpoint: Endpoint) -> Iterator[Sandbox]:
    sbx = Sandbox.create(
        template="base",
        timeout=900,
        metadata={"suite": "e2b", "case": "shared"},
        envs={"GREETING": "hello from create"},
        api_key=KEY_A,
    )
    try:
        yield sbx
    finally:
        Sandbox.kill(sbx.sandbox_id, api_key=KEY_A)


def zones_of(daemon: LocalDaemon) -> list[str]:
    async def names() -> list[str]:
        async with Client(daemon.socket) as client:
            return [zone.name for zone in await client.list_zones()]

    return trio.run(names)


def zone_exists(daemon: LocalDaemon, name: str) -> bool:
    async def look() -> bool:
        async with Client(daemon.socket) as client:
            try:
                zone = await client.get_zone(name)
            except NotFound:
                return False
            return zone.state != "stopped"

    return trio.run(look)


# ---------------------------------------------------------------- sandboxes


def test_create_returns_a_ready_sandbox(sandbox: Sandbox, endpoint: Endpoint) -> None:
    info = sandbox.get_info()
    assert info.sandbox_id == sandbox.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"suite": "e2b", "case": "shared"}
    assert info.state.value == "running"
    assert info.envd_version == "0.5.7"
    assert sandbox.is_running()
    assert sandbox.sandbox_id in zones_of(endpoint.daemon)
    # The response came once the zone runs commands: the first one just works,
    # in the template's image (base: the daemon's default, Debian bookworm).
    assert "bookworm" in sandbox.commands.run("cat /etc/os-release").stdout


def test_run_streams_output_with_envs_and_cwd(sandbox: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    result = sandbox.commands.run(
        'echo "$GREETING"; echo "$EXTRA"; pwd; for i in 1 2 3; do echo line$i; done; echo oops >&2',
        envs={"EXTRA": "per command"},
        cwd="/tmp",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    expected = "hello from create\nper command\n/tmp\nline1\nline2\nline3\n"
    assert result.exit_code == 0
    assert result.stdout == expected
    assert "".join(out) == expected
    assert result.stderr == "oops\n" == "".join(err)


def test_failing_command_raises_with_its_exit_code(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as raised:
        sandbox.commands.run("echo partial; echo broken >&2; exit 3")
    assert raised.value.exit_code == 3
    assert raised.value.stdout == "partial\n"
    assert raised.value.stderr == "broken\n"


def test_commands_and_files_as_another_user_of_the_image(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("id -un", user="nobody").stdout == "nobody\n"
    sandbox.files.write("/tmp/nobodys.txt", "mine", user="nobody")
    assert sandbox.commands.run("stat -c %U /tmp/nobodys.txt").stdout == "nobody\n"
    with pytest.raises(SandboxException, match="Permission denied"):
        sandbox.files.write("/root/not-for-nobody.txt", "no", user="nobody")


def test_background_command_killed(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 600", background=True)
    assert handle.pid in [process.pid for process in sandbox.commands.list()]
    assert handle.kill()
    with pytest.raises(CommandExitException) as raised:
        handle.wait()
    assert raised.value.exit_code == -1
    assert handle.pid not in [process.pid for process in sandbox.commands.list()]
    assert not sandbox.commands.kill(handle.pid)


def test_stdin_and_connect_to_a_running_command(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("read line; echo got $line", background=True, stdin=True)
    again = sandbox.commands.connect(handle.pid)
    sandbox.commands.send_stdin(handle.pid, "abc\n")
    assert again.wait().stdout == "got abc\n"
    assert handle.wait().stdout == "got abc\n"


def test_a_pty_session(sandbox: Sandbox) -> None:
    handle = sandbox.pty.create(PtySize(rows=30, cols=100))
    sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=120))
    sandbox.pty.send_stdin(handle.pid, b"stty size; echo pty-$((40+2)); exit 0\n")
    seen: list[bytes] = []
    result = handle.wait(on_pty=seen.append)
    assert result.exit_code == 0
    screen = b"".join(seen)
    assert b"pty-42" in screen and b"40 120" in screen


# ---------------------------------------------------------------- files


def test_file_round_trip_with_checksum(sandbox: Sandbox) -> None:
    data = os.urandom(300 * 1024)
    info = sandbox.files.write("/tmp/data/blob.bin", data)
    assert info.path == "/tmp/data/blob.bin"
    back = sandbox.files.read("/tmp/data/blob.bin", format="bytes")
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    in_zone = sandbox.commands.run("sha256sum /tmp/data/blob.bin").stdout.split()[0]
    assert in_zone == hashlib.sha256(data).hexdigest()
    # The octet-stream upload, gzip-compressed (envd 0.5.7).
    sandbox.files.write("/tmp/data/zipped.txt", "compressed " * 1000, gzip=True)
    assert sandbox.files.read("/tmp/data/zipped.txt") == "compressed " * 1000


def test_file_operations(sandbox: Sandbox) -> None:
    files = sandbox.files
    assert files.make_dir("/tmp/ops/sub")
    assert not files.make_dir("/tmp/ops/sub")
    files.write("/tmp/ops/a.txt", "alpha")
    files.write("relative.txt", "in root's home")
    assert files.read("/root/relative.txt") == "in root's home"
    assert files.exists("/tmp/ops/a.txt")
    names = {entry.name: entry.type for entry in files.list("/tmp/ops")}
    assert names == {"a.txt": FileType.FILE, "sub": FileType.DIR}
    deep = {entry.path for entry in files.list("/tmp", depth=2)}
    assert {"/tmp/ops/a.txt", "/tmp/ops/sub"} <= deep
    moved = files.rename("/tmp/ops/a.txt", "/tmp/ops/sub/b.txt")
    assert moved.path == "/tmp/ops/sub/b.txt"
    assert files.get_info("/tmp/ops/sub/b.txt").size == 5
    files.remove("/tmp/ops")
    assert not files.exists("/tmp/ops")
    with pytest.raises(FileNotFoundException):
        files.read("/tmp/ops/sub/b.txt")


# ---------------------------------------------------------------- keys


def test_list_shows_the_callers_sandboxes_only(sandbox: Sandbox) -> None:
    mine = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"}), api_key=KEY_A)
    assert sandbox.sandbox_id in [info.sandbox_id for info in mine.next_items()]
    other = Sandbox.list(query=SandboxQuery(metadata={"case": "nope"}), api_key=KEY_A)
    assert other.next_items() == []
    theirs = Sandbox.list(api_key=KEY_B)
    assert sandbox.sandbox_id not in [info.sandbox_id for info in theirs.next_items()]


def test_another_keys_sandbox_does_not_exist(sandbox: Sandbox, endpoint: Endpoint) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sandbox.sandbox_id, api_key=KEY_B)
    with pytest.raises(NotFoundException):
        Sandbox.connect(sandbox.sandbox_id, api_key=KEY_B)
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(sandbox.sandbox_id, 1, api_key=KEY_B)
    assert not Sandbox.kill(sandbox.sandbox_id, api_key=KEY_B)
    # envd calls need the sandbox's access token, which only its owner gets.
    answer = httpx.post(
        endpoint.url + "/process.Process/List",
        headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "Content-Type": "application/json"},
        content=b"{}",
    )
    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthenticated"
    assert sandbox.is_running()
    assert sandbox.get_info().end_at > sandbox.get_info().started_at


def test_wrong_key_gets_the_authentication_error(sandbox: Sandbox, endpoint: Endpoint) -> None:
    zones = zones_of(endpoint.daemon)
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_not_a_key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="e2b_not_a_key").next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.get_info(sandbox.sandbox_id, api_key="e2b_not_a_key")
    assert zones_of(endpoint.daemon) == zones


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors_and_changes_nothing(
    sandbox: Sandbox, endpoint: Endpoint
) -> None:
    zones = zones_of(endpoint.daemon)
    with pytest.raises(SandboxException, match="template 'no-such' not found"):
        Sandbox.create(template="no-such", api_key=KEY_A)
    with pytest.raises(SandboxException, match="pause/resume is not supported"):
        sandbox.pause()
    assert zones_of(endpoint.daemon) == zones

    token = sandbox._envd_access_token
    assert token is not None
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": token}
    before = sandbox.commands.list()
    malformed = httpx.post(
        endpoint.url + "/process.Process/Start",
        headers={**headers, "Content-Type": "application/connect+json"},
        content=b"\x00\x00\x00\x00\x40{}",  # says 64 bytes, holds 2
    )
    assert malformed.status_code == 400
    assert malformed.json()["code"] == "invalid_argument"
    assert "envelope says 64 bytes" in malformed.json()["message"]
    not_json = httpx.post(
        endpoint.url + "/filesystem.Filesystem/Stat",
        headers={**headers, "Content-Type": "application/json"},
        content=b"{path",
    )
    assert not_json.status_code == 400
    assert sandbox.commands.list() == before

    with pytest.raises(SandboxException, match="larger than"):
        sandbox.files.write("/tmp/too-big.bin", b"x" * (MAX_UPLOAD + 1))
    assert not sandbox.files.exists("/tmp/too-big.bin")
    with pytest.raises(InvalidArgumentException, match=r"'\.\.' component"):
        sandbox.files.write("/tmp/../etc/evil", "no")
    with pytest.raises(InvalidArgumentException, match=r"'\.\.' component"):
        sandbox.files.read("../../etc/passwd")
    with pytest.raises(InvalidArgumentException, match="cannot change directory"):
        sandbox.commands.run("true", cwd="/no/such/dir")
    with pytest.raises(InvalidArgumentException, match="not in the image's /etc/passwd"):
        sandbox.commands.run("true", user="nobody-here")
    assert not sandbox.files.exists("/etc/evil")
    with pytest.raises(SandboxException, match="not supported by zoned"):
        sandbox.files.watch_dir("/tmp")


# ---------------------------------------------------------------- ends


def test_kill(sandbox: Sandbox, endpoint: Endpoint) -> None:
    assert sandbox.kill()
    with pytest.raises(NotFoundException):
        sandbox.get_info()
    assert not sandbox.is_running()
    assert not zone_exists(endpoint.daemon, sandbox.sandbox_id)
    assert not Sandbox.kill(sandbox.sandbox_id, api_key=KEY_A)


def test_readme_example_runs_as_written(endpoint: Endpoint) -> None:
    text = README.read_text()
    found = re.search(r"<!-- e2b-example -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md has no e2b example marked <!-- e2b-example -->"
    code = found[1]
    assert len(code.strip().splitlines()) == 5
    env = {**os.environ, "E2B_API_KEY": KEY_A}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("hello from a zone")
    assert [info.sandbox_id for info in Sandbox.list(api_key=KEY_A).next_items()] == []


def test_set_timeout_expiry_survives_a_restart(endpoint: Endpoint) -> None:
    sbx = Sandbox.create(template="small", timeout=900, api_key=KEY_A)
    # The small template is the built-in root: busybox's sh, no bash.
    assert "busybox" in sbx.commands.run("readlink /bin/sh").stdout
    first_end = sbx.get_info().end_at
    sbx.set_timeout(20)
    assert sbx.get_info().end_at < first_end
    # The deadline is the daemon's: stop it (the zone keeps running), start it again.
    endpoint.daemon.stop()
    assert zone_exists_offline(endpoint.daemon, sbx.sandbox_id)
    endpoint.daemon.start()
    assert sbx.is_running()
    wait_until(
        lambda: not zone_exists(endpoint.daemon, sbx.sandbox_id),
        f"sandbox {sbx.sandbox_id} destroyed at its timeout",
        timeout=120,
        details=endpoint.daemon.log_text,
    )
    with pytest.raises(NotFoundException):
        sbx.get_info()


def zone_exists_offline(daemon: LocalDaemon, name: str) -> bool:
    """With the daemon stopped: does libvirt still run the zone's domain?"""
    result = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domstate", daemon.domain_name(name)],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() == "running"
