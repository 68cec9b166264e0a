"""The client's options, declared once: they are the wire fields; one function builds requests."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, get_type_hints

import msgspec
import pytest

from zoned import protocol as p
from zoned.client import (
    CreateOptions,
    ExecOptions,
    ExecResult,
    ProcessOptions,
    RunExecOptions,
    RunOptions,
    RunProcessOptions,
    ZoneOptions,
)
from zoned.client.options import wire_request
from zoned.errors import InvalidRequest


def option_names(options: type[Any]) -> set[str]:
    return set(get_type_hints(options))


# What the caller gives as a positional argument, or what only the client sets.
NOT_OPTIONS = {"id", "zone", "argv"}


@pytest.mark.parametrize(
    ("options", "kind", "fixed"),
    [
        (CreateOptions, p.CreateZone, {"name"}),
        (ProcessOptions, p.Exec, set()),
        (RunProcessOptions, p.RunZone, set()),
    ],
)
def test_options_are_exactly_the_wire_fields(
    options: type[Any], kind: type[msgspec.Struct], fixed: set[str]
) -> None:
    """A field the protocol gains must be declared here, once, or this fails."""
    assert option_names(options) == set(kind.__struct_fields__) - NOT_OPTIONS - fixed


def test_the_smaller_option_sets_are_parts_of_the_larger() -> None:
    assert option_names(ExecOptions) < option_names(ProcessOptions)
    assert option_names(ZoneOptions) < option_names(CreateOptions)
    assert option_names(ZoneOptions) < option_names(RunOptions)
    assert option_names(RunExecOptions) == option_names(RunOptions) | option_names(ExecOptions)
    # exec()/run() collect output and feed input themselves: no terminal there.
    assert not option_names(RunExecOptions) & {"stdin", "tty", "rows", "cols"}


def test_left_out_options_take_the_protocols_defaults() -> None:
    assert wire_request(p.Exec, 3, {}, zone="web", argv=("true",)) == p.Exec(
        id=3, zone="web", argv=["true"]
    )
    assert wire_request(p.CreateZone, 4, {}, name="web") == p.CreateZone(id=4, name="web")


def test_collections_become_what_the_wire_wants() -> None:
    request = wire_request(
        p.CreateZone,
        5,
        {"kernel_args": (arg for arg in ("quiet",)), "labels": MappingProxyType({"a": "b"})},
        name="web",
    )
    assert request.kernel_args == ["quiet"] and type(request.labels) is dict
    assert request.labels == {"a": "b"}
    run = wire_request(p.RunZone, 6, {"env": {"A": "1"}, "timeout_s": 5.0}, argv=["env"])
    assert (run.env, run.timeout_s, run.argv) == ({"A": "1"}, 5.0, ["env"])


def test_a_string_for_argv_is_invalid_before_anything_is_built() -> None:
    with pytest.raises(InvalidRequest, match="argv must be a list"):
        wire_request(p.Exec, 1, {}, zone="web", argv="ls -l")
    with pytest.raises(InvalidRequest, match="argv must be a list"):
        wire_request(p.RunZone, 1, {}, argv="ls -l")
    with pytest.raises(InvalidRequest, match="entrypoint must be a list"):
        wire_request(p.RunZone, 1, {"entrypoint": "sh"}, argv=[])


@pytest.mark.parametrize("argv", [[], ()])
def test_an_empty_argv_asks_for_the_images_command(argv: Any) -> None:
    assert wire_request(p.Exec, 1, {}, zone="web", argv=argv).argv == []
    run = wire_request(p.RunZone, 1, {"entrypoint": ("python3", "-I")}, argv=argv)
    assert (run.argv, run.entrypoint) == ([], ["python3", "-I"])


def test_the_protocols_own_checks_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest, match="argv\\[0\\] must not be empty"):
        wire_request(p.Exec, 1, {}, zone="web", argv=[""])
    with pytest.raises(InvalidRequest, match="kernel_args too long"):
        wire_request(p.CreateZone, 1, {"kernel_args": ["x" * 200] * 8}, name="web")


def test_exec_result_carries_the_wire_exit() -> None:
    exit = p.ExecExit(id=9, signal=15, cpu_time_s=0.5)
    result = ExecResult(exit, stdout=b"out")
    assert result.exit is exit and result.returncode == -15 and result.stderr == b""
    assert ExecResult(p.ExecExit(id=9, exit_code=3)).returncode == 3
