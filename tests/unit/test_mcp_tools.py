"""zoned-mcp's tools: schemas from the argument Structs, limits overlaid, arguments decoded."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonschema
import pytest

from zoned import protocol as p
from zoned.mcp import tools as t
from zoned.mcp.results import Encoding, ToolInputError

LIMITS = t.Limits(max_timeout_s=120.0, default_timeout_s=30.0, max_vcpus=2, max_write_bytes=1000)


def schema(name: str) -> dict[str, Any]:
    return t.input_schema(t.TOOLS_BY_NAME[name], LIMITS)


def test_every_tool_has_an_object_schema_that_refuses_unknown_fields() -> None:
    assert len(t.TOOLS_BY_NAME) == len(t.TOOLS)
    for tool in t.TOOLS:
        for built in (t.input_schema(tool, LIMITS), t.output_schema(tool)):
            assert built["type"] == "object", tool.name
            jsonschema.Draft202012Validator.check_schema(built)
        assert t.input_schema(tool, LIMITS)["additionalProperties"] is False
        assert tool.description and tool.title


def test_patterns_are_ecma_regexes() -> None:
    # ECMA-262 (what JavaScript clients validate with) has no \Z: "$" it is.
    for tool in t.TOOLS:
        text = json.dumps(t.input_schema(tool, LIMITS))
        assert "\\\\Z" not in text, tool.name
    path = schema("read_file")["properties"]["path"]
    assert path["pattern"] == "^/[^\\x00]*$"


def test_limits_overlay_the_schema() -> None:
    timeout = schema("run_command")["properties"]["timeout_s"]
    number = next(s for s in timeout["anyOf"] if s.get("type") == "number")
    assert number["maximum"] == 120.0 and timeout["default"] == 30.0
    vcpus = schema("create_zone")["properties"]["vcpus"]
    assert vcpus["maximum"] == 2 and vcpus["minimum"] == p.MIN_VCPUS
    name = schema("create_zone")["properties"]["name"]
    string = next(s for s in name["anyOf"] if s.get("type") == "string")
    assert string["maxLength"] == 63 - len("mcp-") - t.SESSION_TAG_CHARS - 1
    assert schema("read_file")["properties"]["max_bytes"]["default"] == LIMITS.max_read_bytes


# (tool, arguments, accepted): the schema and the decoder must agree on each.
CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("create_zone", {}, True),
    ("create_zone", {"name": "web", "vcpus": 2, "memory_mib": 512}, True),
    ("create_zone", {"vcpus": 3}, False),  # over this server's limit
    ("create_zone", {"vcpus": 0}, False),
    ("create_zone", {"memory_mib": 32}, False),
    ("create_zone", {"name": "Web"}, False),
    ("create_zone", {"name": "x" * 60}, False),
    ("create_zone", {"image": "debian:12"}, True),
    ("create_zone", {"image": "two words"}, False),
    ("create_zone", {"image": ""}, False),
    ("list_zones", {}, True),
    ("list_zones", {"all": True}, False),
    ("destroy_zone", {"zone": "mcp-abc123-1"}, True),
    ("destroy_zone", {}, False),
    ("run_command", {"zone": "w", "argv": ["ls", "-l"]}, True),
    ("run_command", {"zone": "w", "argv": ["ls"], "timeout_s": 120, "cwd": "/tmp"}, True),
    ("run_command", {"zone": "w", "argv": ["ls"], "env": {"A": "1"}, "stdin": "x"}, True),
    ("run_command", {"zone": "w", "argv": []}, False),
    ("run_command", {"zone": "w", "argv": "ls -l"}, False),
    ("run_command", {"zone": "w", "argv": ["ls"], "timeout_s": 0}, False),
    ("run_command", {"zone": "w", "argv": ["ls"], "timeout_s": 121}, False),
    ("run_command", {"zone": "w", "argv": ["ls"], "cwd": "tmp"}, False),
    ("run_command", {"zone": "w", "argv": ["ls"], "env": {"A=B": "1"}}, False),
    ("run_command", {"zone": "../x", "argv": ["ls"]}, False),
    ("run_code", {"language": "python", "code": "print(1)"}, True),
    ("run_code", {"language": "shell", "code": "ls", "zone": "w", "timeout_s": 5}, True),
    ("run_code", {"language": "ruby", "code": "p 1"}, False),
    ("run_code", {"language": "python", "code": ""}, False),
    ("run_code", {"language": "python", "code": "1", "image": "builtin"}, True),
    ("run_code", {"language": "python", "code": "1", "image": "a\nb"}, False),
    ("write_file", {"zone": "w", "path": "/a", "content": "x"}, True),
    ("write_file", {"zone": "w", "path": "/a", "content": "eA==", "encoding": "base64"}, True),
    ("write_file", {"zone": "w", "path": "/a", "content": "x", "mode": "0755"}, True),
    ("write_file", {"zone": "w", "path": "/a", "content": "x", "mode": "rwx"}, False),
    ("write_file", {"zone": "w", "path": "a", "content": "x"}, False),
    ("write_file", {"zone": "w", "path": "/a\x00b", "content": "x"}, False),
    ("read_file", {"zone": "w", "path": "/etc/passwd", "max_bytes": 10}, True),
    ("read_file", {"zone": "w", "path": "/etc/passwd", "max_bytes": 0}, False),
    ("read_file", {"zone": "w", "path": "/etc/passwd", "encoding": "latin-1"}, False),
    ("list_files", {"zone": "w", "path": "/"}, True),
    ("list_files", {"zone": "w"}, False),
]


@pytest.mark.parametrize(("tool", "arguments", "accepted"), CASES)
def test_schema_and_decoder_agree(tool: str, arguments: dict[str, Any], accepted: bool) -> None:
    validator = jsonschema.Draft202012Validator(schema(tool))
    assert validator.is_valid(arguments) is accepted, list(validator.iter_errors(arguments))
    if accepted:
        args = t.parse_arguments(t.TOOLS_BY_NAME[tool], arguments, LIMITS)
        assert isinstance(args, t.TOOLS_BY_NAME[tool].arguments)
    else:
        with pytest.raises(ToolInputError, match=f"^invalid arguments for {tool}: "):
            t.parse_arguments(t.TOOLS_BY_NAME[tool], arguments, LIMITS)


def test_errors_say_what_a_field_wants() -> None:
    def message(tool: str, **arguments: Any) -> str:
        with pytest.raises(ToolInputError) as raised:
            t.parse_arguments(t.TOOLS_BY_NAME[tool], arguments, LIMITS)
        return raised.value.message

    assert "absolute path in the zone, starting with /" in message(
        "read_file", zone="w", path="etc/passwd"
    )
    assert "this server allows at most 120" in message(
        "run_command", zone="w", argv=["ls"], timeout_s=600
    )
    assert "unknown field `gpus`" in message("create_zone", gpus=1)
    assert "`$.network`" in message("create_zone", network="pypi.org")
    assert "missing required field `zone`" in message("list_files", path="/")
    assert "`$.argv`" in message("run_command", zone="w", argv=[])


def test_arguments_take_their_defaults() -> None:
    args = t.parse_arguments(t.TOOLS_BY_NAME["run_command"], {"zone": "w", "argv": ["id"]}, LIMITS)
    assert isinstance(args, t.RunCommandArgs)
    assert (args.timeout_s, args.cwd, args.env, args.stdin) == (None, "/", {}, None)
    assert t.parse_arguments(t.TOOLS_BY_NAME["list_zones"], None, LIMITS) == t.NoArgs()


def test_write_content_is_decoded_and_bounded() -> None:
    def content(text: str, encoding: Encoding = "utf-8") -> bytes:
        args = t.WriteFileArgs(zone="w", path="/f", content=text, encoding=encoding)
        return t.decode_content(args, LIMITS)

    assert content("héllo") == "héllo".encode()
    assert content(base64.b64encode(b"\x00\xff").decode(), "base64") == b"\x00\xff"
    assert len(content("x" * 1000)) == 1000
    for too_big in ("x" * 1001, "é" * 501):  # 1001 characters; 1002 bytes
        with pytest.raises(ToolInputError, match="at most 1000 bytes"):
            content(too_big)
    with pytest.raises(ToolInputError, match="at most 1000 bytes"):
        content(base64.b64encode(b"x" * 1001).decode(), "base64")
    with pytest.raises(ToolInputError, match="at most 1000 bytes"):
        content("A" * 100_000, "base64")  # refused before decoding
    with pytest.raises(ToolInputError, match="not base64"):
        content("no base64!", "base64")
    assert t.octal_mode("0755") == 0o755 and t.octal_mode("644") == 0o644


def test_stdin_is_bounded_by_the_agents_input_window() -> None:
    fits = t.RunCommandArgs(zone="w", argv=["cat"], stdin="x" * t.MAX_STDIN_BYTES)
    assert t.stdin_bytes(fits) == b"x" * t.MAX_STDIN_BYTES
    assert t.stdin_bytes(t.RunCommandArgs(zone="w", argv=["cat"])) is None
    with pytest.raises(ToolInputError, match="write_file"):
        t.stdin_bytes(t.RunCommandArgs(zone="w", argv=["cat"], stdin="é" * t.MAX_STDIN_BYTES))


def test_limits_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="zone prefix"):
        t.Limits(zone_prefix="MCP")
    with pytest.raises(ValueError, match="default memory"):
        t.Limits(default_memory_mib=4096, max_memory_mib=2048)
    with pytest.raises(ValueError, match="default timeout"):
        t.Limits(default_timeout_s=700.0, max_timeout_s=600.0)
    assert t.Limits(zone_prefix="a").max_short_name_chars == 63 - 1 - t.SESSION_TAG_CHARS - 1
