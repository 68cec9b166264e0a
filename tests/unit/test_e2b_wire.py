"""The E2B endpoint's pure translation: Connect framing, envd's messages, the REST API.

Where the SDK's own message classes can say what the wire holds, they do:
a request the SDK would send is encoded by its protobuf classes and decoded
here, and what the endpoint sends is decoded by them.
"""

from __future__ import annotations

import base64
import math
import struct
import tomllib
from typing import Literal, cast

import msgspec
import pytest
import trio
from e2b.envd.filesystem import filesystem_pb
from e2b.envd.process import process_pb
from protobuf import Oneof

from tests.samples import minimal_zone
from zoned import protocol as p
from zoned.client import Process
from zoned.config import Config, E2bConfig
from zoned.e2b import api, envd, processes
from zoned.e2b import connectrpc as rpc
from zoned.e2b.processes import RunningProcess, event_stream

# ---------------------------------------------------------------- Connect


def test_an_envelope_round_trips_and_ends_a_stream() -> None:
    framed = rpc.envelope(b'{"a":1}')
    assert framed == b"\x00\x00\x00\x00\x07" + b'{"a":1}'
    assert rpc.single_envelope(framed) == b'{"a":1}'
    assert rpc.end_of_stream() == b"\x02\x00\x00\x00\x02{}"
    end = rpc.end_of_stream(rpc.RpcError("not_found", "gone"))
    flags, length = struct.unpack(">BI", end[:5])
    assert flags == rpc.FLAG_END_STREAM and length == len(end) - 5
    assert msgspec.json.decode(end[5:]) == {"error": {"code": "not_found", "message": "gone"}}


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"", "invalid_argument", "not an enveloped message"),
        (b"\x00\x00\x00", "invalid_argument", "not an enveloped message"),
        (b"\x00\x00\x00\x00\x09{}", "invalid_argument", "envelope says 9 bytes"),
        (b"\x00\x00\x00\x00\x01{}", "invalid_argument", "envelope says 1 bytes"),
        (b"\x01\x00\x00\x00\x02{}", "unimplemented", "compressed"),
        (b"\x02\x00\x00\x00\x02{}", "invalid_argument", "flags 0x2"),
    ],
)
def test_a_malformed_envelope_is_refused(body: bytes, code: str, words: str) -> None:
    with pytest.raises(rpc.RpcError) as raised:
        rpc.single_envelope(body)
    assert raised.value.code == code
    assert words in raised.value.message


def test_unary_errors_get_connects_status_and_body() -> None:
    error = rpc.RpcError("unauthenticated", "no token")
    assert error.http_status == 401
    assert msgspec.json.decode(error.body()) == {"code": "unauthenticated", "message": "no token"}
    assert rpc.RpcError("already_exists", "x").http_status == 409
    assert len(rpc.RpcError("internal", "x" * 10_000).message) == rpc.MAX_MESSAGE_CHARS


def test_messages_and_timeouts_are_checked() -> None:
    with pytest.raises(rpc.RpcError, match="not JSON"):
        rpc.decode_message(b"{nope", envd.StartRequest)
    with pytest.raises(rpc.RpcError, match="invalid message"):
        rpc.decode_message(b'{"process": {"cmd": 5}}', envd.StartRequest)
    assert rpc.timeout_ms(None) is None
    assert rpc.timeout_ms("60000") == 60000
    for bad in ("-1", "1e3", "12345678901"):
        with pytest.raises(rpc.RpcError):
            rpc.timeout_ms(bad)


# ---------------------------------------------------------------- envd messages in


def test_the_sdks_start_request_decodes() -> None:
    sent = process_pb.StartRequest(
        process=process_pb.ProcessConfig(
            cmd="/bin/bash", envs={"A": "1"}, args=["-l", "-c", "echo hi"], cwd="/tmp"
        ),
        stdin=True,
        tag="job",
    ).to_json()
    start = rpc.decode_message(sent.encode(), envd.StartRequest)
    assert start.process == envd.ProcessConfig(
        cmd="/bin/bash", args=["-l", "-c", "echo hi"], envs={"A": "1"}, cwd="/tmp"
    )
    assert start.stdin is True and start.tag == "job" and start.pty is None


def test_the_sdks_selectors_inputs_and_signals_decode() -> None:
    pid: Literal["pid"] = "pid"
    selector = process_pb.ProcessSelector(selector=Oneof(pid, 42))
    signal = process_pb.SendSignalRequest(process=selector, signal=process_pb.Signal.SIGKILL)
    decoded = rpc.decode_message(signal.to_json().encode(), envd.SendSignalRequest)
    assert decoded.process == envd.ProcessSelector(pid=42)
    assert envd.signal_number(decoded.signal) == 9
    with pytest.raises(rpc.RpcError, match="unsupported signal"):
        envd.signal_number("SIGNAL_SIGSTOP")
    stdin: Literal["stdin"] = "stdin"
    given = process_pb.SendInputRequest(
        process=selector, input=process_pb.ProcessInput(input=Oneof(stdin, b"\x00data"))
    )
    request = rpc.decode_message(given.to_json().encode(), envd.SendInputRequest)
    assert request.input is not None
    assert envd.decode_bytes(request.input.stdin, "input") == b"\x00data"
    with pytest.raises(rpc.RpcError, match="not base64"):
        envd.decode_bytes("***", "input")
    tag: Literal["tag"] = "tag"
    tagged = process_pb.ConnectRequest(process=process_pb.ProcessSelector(selector=Oneof(tag, "t")))
    assert rpc.decode_message(
        tagged.to_json().encode(), envd.SelectorRequest
    ).process == envd.ProcessSelector(tag="t")


def test_the_sdks_filesystem_requests_decode() -> None:
    listing = filesystem_pb.ListDirRequest(path="/tmp", depth=2).to_json().encode()
    assert rpc.decode_message(listing, envd.ListDirRequest) == envd.ListDirRequest("/tmp", 2)
    move = filesystem_pb.MoveRequest(source="a", destination="b").to_json().encode()
    assert rpc.decode_message(move, envd.MoveRequest) == envd.MoveRequest("a", "b")


# ---------------------------------------------------------------- users, paths, commands


def basic(name: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:".encode()).decode()


def test_users_come_from_basic_authorization() -> None:
    assert envd.user_from_authorization(None) is envd.DEFAULT_USER
    assert envd.DEFAULT_USER.spec is None  # the image's own User
    root = envd.user_from_authorization(basic("root"))
    assert (root.spec, root.home) == ("root", "/root")
    user = envd.user_from_authorization(basic("user"))
    assert (user.spec, user.home) == ("user", "/home/user")
    assert envd.user_from_authorization(basic("")) is envd.DEFAULT_USER
    with pytest.raises(rpc.RpcError, match="invalid user name"):
        envd.user_from_authorization(basic("../x"))
    with pytest.raises(rpc.RpcError, match="Basic"):
        envd.user_from_authorization("Bearer x")
    with pytest.raises(rpc.RpcError, match="not base64"):
        envd.user_from_authorization("Basic !!!")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/tmp/a", "/tmp/a"),
        ("notes.txt", "/root/notes.txt"),
        ("/tmp//b/./c", "/tmp/b/c"),
        ("/", "/"),
        ("dir/", "/root/dir"),
    ],
)
def test_paths_are_absolute_in_the_zone(given: str, expected: str) -> None:
    assert envd.zone_path(given, envd.DEFAULT_USER) == expected


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("", "empty"),
        ("/tmp/../etc/passwd", "'..' component"),
        ("../x", "'..' component"),
        ("/tmp/a\x00b", "NUL"),
        ("/" + "a" * p.MAX_PATH_CHARS, "longer than"),
    ],
)
def test_paths_outside_the_rules_are_refused(given: str, words: str) -> None:
    with pytest.raises(rpc.RpcError, match=words):
        envd.zone_path(given, envd.DEFAULT_USER)


def test_the_sdks_bash_runs_in_sh_where_bash_is_missing() -> None:
    argv = envd.command_argv(envd.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", "echo hi"]))
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:] == ["e2b-shell", "-l", "-c", "echo hi"]
    assert "exec bash" in argv[2] and "exec sh" in argv[2]
    assert envd.command_argv(envd.ProcessConfig(cmd="/usr/bin/env", args=["x"])) == [
        "/usr/bin/env",
        "x",
    ]
    with pytest.raises(rpc.RpcError, match="cmd is empty"):
        envd.command_argv(envd.ProcessConfig())


def test_command_environment_layers() -> None:
    env = envd.command_env({"A": "sandbox", "B": "b"}, {"A": "command"})
    assert env == {"A": "command", "B": "b"}


# ---------------------------------------------------------------- envd messages out


def test_events_decode_with_the_sdks_classes() -> None:
    def event(data: bytes) -> process_pb.ProcessEvent:
        response = process_pb.StartResponse.from_json(data.decode())
        assert response.event is not None
        return response.event

    assert event(envd.start_event(7)).event == Oneof(
        "start", process_pb.ProcessEvent.StartEvent(pid=7)
    )
    data = event(envd.data_event("stderr", b"\xffbytes")).event
    assert data is not None and isinstance(data.value, process_pb.ProcessEvent.DataEvent)
    assert data.value.output == Oneof("stderr", b"\xffbytes")
    assert event(envd.KEEPALIVE_EVENT).event is not None


async def test_a_stream_closed_at_its_start_event_lets_go_of_the_process() -> None:
    # A client gone before the first event was written: the stream's
    # subscription is closed, so the process's output does not wait for it.
    running = RunningProcess(7, None, envd.ProcessConfig(cmd="x"), False, cast(Process, None))
    stream = event_stream(running, running.subscribe(), deadline=math.inf, keepalive_s=50.0)
    assert await anext(stream) == rpc.envelope(envd.start_event(7))
    await stream.aclose()
    with trio.fail_after(5):
        for _ in range(processes.STREAM_BUFFER + 1):
            await running.publish(envd.KEEPALIVE_EVENT)
    assert running.streams == []


def test_how_a_process_ended_reads_as_envds() -> None:
    def end(exit: p.ExecExit) -> dict[str, object]:
        decoded: dict[str, dict[str, dict[str, object]]] = msgspec.json.decode(envd.end_event(exit))
        return decoded["event"]["end"]

    assert end(p.ExecExit(id=1, exit_code=3)) == {
        "exitCode": 3,
        "exited": True,
        "status": "exit status 3",
    }
    killed = end(p.ExecExit(id=1, signal=9))
    assert killed == {"exitCode": -1, "exited": False, "status": "signal: killed"}
    timed_out = end(p.ExecExit(id=1, signal=9, timed_out=True))
    assert "time ran out" in str(timed_out["error"])


def test_entries_decode_with_the_sdks_classes() -> None:
    output = b"81a4 5 1700000000 root staff\n"
    entry = envd.parse_stat("/tmp/a.txt", output)
    info = filesystem_pb.StatResponse.from_json(envd.entry_response(entry).decode()).entry
    assert info is not None
    assert (info.name, info.path, info.size, info.mode) == ("a.txt", "/tmp/a.txt", 5, 0o644)
    assert info.type == filesystem_pb.FileType.FILE
    assert (info.owner, info.group, info.permissions) == ("root", "staff", "-rw-r--r--")
    link = envd.parse_stat("/tmp/l", b"a1ff 3 0 root root\n/etc/hostname\n")
    assert link.symlink_target == "/etc/hostname" and link.file_type == "FILE_TYPE_SYMLINK"
    directory = envd.parse_stat("/", b"41ed 4096 0 root root\n")
    listed = filesystem_pb.ListDirResponse.from_json(envd.entries_response([directory]).decode())
    assert listed.entries[0].type == filesystem_pb.FileType.DIRECTORY


@pytest.mark.parametrize(
    "output", [b"", b"garbage\n", b"81a4 5 x root root\n", b"81a4 5 0 " + b"u" * 65 + b" g\n"]
)
def test_a_stat_that_makes_no_sense_is_refused(output: bytes) -> None:
    with pytest.raises(rpc.RpcError, match="cannot be read"):
        envd.parse_stat("/x", output)


def test_a_process_list_decodes_with_the_sdks_classes() -> None:
    record = envd.ProcessRecord(7, "t", envd.ProcessConfig(cmd="sleep", args=["9"], cwd="/"))
    listed = process_pb.ListResponse.from_json(envd.list_response([record]).decode())
    assert listed.processes[0].pid == 7 and listed.processes[0].tag == "t"
    assert listed.processes[0].config is not None and listed.processes[0].config.cmd == "sleep"


# ---------------------------------------------------------------- uploads


def multipart(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    body = b""
    for name, data in parts:
        body += (
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode()


def test_multipart_uploads_are_read() -> None:
    body = multipart("XyZ", ("/tmp/a", b"one\r\n--not a boundary"), ("b.txt", b""))
    parts = envd.multipart_parts('multipart/form-data; boundary="XyZ"', body)
    assert parts == [
        envd.UploadPart("/tmp/a", b"one\r\n--not a boundary"),
        envd.UploadPart("b.txt", b""),
    ]


@pytest.mark.parametrize(
    ("content_type", "body", "words"),
    [
        ("multipart/form-data", b"", "without a boundary"),
        ("multipart/form-data; boundary=b", b"junk", "does not start"),
        ("multipart/form-data; boundary=b", b"--b\r\nno header end", "no header end"),
        ("multipart/form-data; boundary=b", b"--bX", "not followed by CRLF"),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; filename="a"\r\n\r\nx',
            "no closing boundary",
        ),
    ],
)
def test_malformed_multipart_is_refused(content_type: str, body: bytes, words: str) -> None:
    with pytest.raises(rpc.RpcError, match=words):
        envd.multipart_parts(content_type, body)


# ---------------------------------------------------------------- REST


def e2b_config(text: str = "") -> E2bConfig:
    key = "0" * 64
    raw = tomllib.loads(
        f'[e2b]\nenabled = true\n[[e2b.keys]]\nname = "k"\nkey_sha256 = "{key}"\nowner = "root"\n'
        + text
    )
    return msgspec.convert(raw, Config).e2b


def test_the_sdks_new_sandbox_body_decodes() -> None:
    body = b'{"templateID": "base", "timeout": 60, "metadata": {"a": "b"}, "envVars": {"X": "1"},'
    body += b' "autoPause": false, "secure": true}'
    new = api.decode_body(body, api.NewSandbox)
    assert (new.template_id, new.timeout, new.metadata, new.env_vars) == (
        "base",
        60,
        {"a": "b"},
        {"X": "1"},
    )
    api.check_new_sandbox(new, e2b_config())
    with pytest.raises(api.ApiError) as raised:
        api.decode_body(b'{"timeout": 5}', api.NewSandbox)
    assert raised.value.status == 400 and "templateID" in raised.value.message


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"templateID": "gpu"}, 404, "template 'gpu' not found (this host has: base)"),
        ({"templateID": "base", "autoPause": True}, 400, "pause/resume is not supported"),
        ({"templateID": "base", "mcp": {"x": {}}}, 400, "MCP"),
        ({"templateID": "base", "volumeMounts": [{"name": "v"}]}, 400, "volumes"),
        ({"templateID": "base", "timeout": 0}, 400, "timeout must be within"),
        ({"templateID": "base", "timeout": 10**9}, 400, "timeout must be within"),
        ({"templateID": "base", "metadata": {"a b": "c"}}, 400, "metadata key 'a b'"),
        ({"templateID": "base", "metadata": {f"k{i}": "v" for i in range(31)}}, 400, "at most"),
        ({"templateID": "base", "envVars": {"A=B": "c"}}, 400, "environment variable"),
    ],
)
def test_what_zoned_does_not_do_is_refused(
    body: dict[str, object], status: int, words: str
) -> None:
    new = api.decode_body(msgspec.json.encode(body), api.NewSandbox)
    with pytest.raises(api.ApiError) as raised:
        api.check_new_sandbox(new, e2b_config())
    assert raised.value.status == status
    assert words in raised.value.message
    assert msgspec.json.decode(raised.value.body())["code"] == status


SANDBOX_RECORD = api.SandboxRecord(
    sandbox_id="e2b-x",
    zone_uuid="u",
    template="base",
    owner_uid=0,
    key_name="k",
    started_at=1_700_000_000.5,
    end_at=1_700_000_300.0,
)


def test_sandbox_json_is_what_the_sdk_reads() -> None:
    from e2b.api.client.models import ListedSandbox, SandboxDetail
    from e2b.api.client.models import Sandbox as SandboxModel

    record = SANDBOX_RECORD
    created = SandboxModel.from_dict(msgspec.json.decode(api.sandbox_json(record, "tok")))
    assert (created.sandbox_id, created.envd_version, created.envd_access_token) == (
        "e2b-x",
        api.ENVD_VERSION,
        "tok",
    )
    labels = {api.SANDBOX_LABEL: "base", api.METADATA_PREFIX + "team": "a"}
    zone = msgspec.structs.replace(minimal_zone("e2b-x", labels=labels), vcpus=2, memory_mib=512)
    detail = api.detail(record, zone)
    parsed = SandboxDetail.from_dict(detail)
    assert (parsed.cpu_count, parsed.memory_mb, parsed.metadata) == (2, 512, {"team": "a"})
    assert parsed.end_at.timestamp() == 1_700_000_300.0
    assert ListedSandbox.from_dict(detail).state.value == "running"


def test_a_sandbox_is_its_own_zone_while_it_runs() -> None:
    zone = minimal_zone("e2b-x")
    assert api.is_its_zone(SANDBOX_RECORD, zone)
    assert not api.is_its_zone(SANDBOX_RECORD, None)
    assert not api.is_its_zone(SANDBOX_RECORD, msgspec.structs.replace(zone, uuid="later"))
    assert not api.is_its_zone(SANDBOX_RECORD, minimal_zone("e2b-x", state="stopped"))


def test_the_list_query_is_read_as_the_sdk_writes_it() -> None:
    query = api.list_query("metadata=team%3Da%26x%3D%252F&state=running,paused&limit=5")
    assert query.metadata == {"team": "a", "x": "/"}
    assert query.states == {"running", "paused"}
    assert (query.limit, query.offset) == (5, 0)
    assert api.list_query("nextToken=10").offset == 10
    with pytest.raises(api.ApiError, match="numbers"):
        api.list_query("limit=x")


def test_the_e2b_configuration_never_serves_without_keys() -> None:
    with pytest.raises(msgspec.ValidationError, match="at least one"):
        msgspec.convert({"e2b": {"enabled": True}}, Config)
    assert msgspec.convert({}, Config).e2b.enabled is False
    python = e2b_config('[e2b.templates.py]\nimage = "python:3.12"\n').templates["py"]
    assert python.image == "python:3.12"
    with pytest.raises(msgspec.ValidationError, match="image"):
        e2b_config('[e2b.templates.py]\nimage = "two words"\n')
    with pytest.raises(msgspec.ValidationError, match=r"e2b\.listen"):
        msgspec.convert({"e2b": {"listen": "nowhere"}}, Config)
    assert set(e2b_config("[e2b.templates.big]\nvcpus = 2\n").templates) == {"big"}
