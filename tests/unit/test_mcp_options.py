"""zoned-mcp's command line and environment, and the README's client entry."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from zoned.mcp import options
from zoned.mcp.tools import Limits

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    config = options.parse_config([], environ={})
    assert config == options.Config(socket=None, limits=Limits(), reclaim=True, log_level="warning")


def test_options_and_the_environment() -> None:
    environ = {
        "ZONED_MCP_MAX_ZONES": "2",
        "ZONED_MCP_SOCKET": "/env.sock",
        "ZONED_MCP_NO_RECLAIM": "1",
    }
    config = options.parse_config(["--max-timeout", "30", "--default-timeout", "10"], environ)
    assert config.socket == Path("/env.sock") and not config.reclaim
    assert (config.limits.max_zones, config.limits.max_timeout_s) == (2, 30.0)
    # The command line wins over the environment.
    config = options.parse_config(["--max-zones", "3", "--socket", "/arg.sock"], environ)
    assert (config.limits.max_zones, config.socket) == (3, Path("/arg.sock"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-zones", "0"],
        ["--max-zones", "two"],
        ["--max-timeout", "0"],
        ["--max-timeout", "100000"],
        ["--default-timeout", "700"],  # over the maximum timeout
        ["--zone-prefix", "Upper-"],
        ["--log-level", "chatty"],
        ["--max-output", "10"],
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        options.parse_config(argv, environ={})
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("usage: zoned-mcp")


def test_a_bad_environment_value_names_its_variable() -> None:
    with pytest.raises(SystemExit, match="ZONED_MCP_MAX_READ='lots'"):
        options.parse_config([], environ={"ZONED_MCP_MAX_READ": "lots"})


def test_help_names_every_option_and_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        options.parse_config(["--help"], environ={})
    text = capsys.readouterr().out
    for flag in ("--socket", "--max-zones", "--max-output", "--no-reclaim", "ZONED_MCP_"):
        assert flag in text


def test_the_readme_entry_starts_zoned_mcp_with_valid_arguments() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Agents over MCP") :]
    snippet = re.search(r"```json\n(.*?)```", section, re.S)
    assert snippet is not None, "the README has no JSON entry for MCP clients"
    server = json.loads(snippet[1])["mcpServers"]["zoned"]
    assert Path(server["command"]).name == "zoned-mcp"
    options.parse_config(server["args"], environ={})
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["zoned-mcp"] == "zoned.mcp:main"
