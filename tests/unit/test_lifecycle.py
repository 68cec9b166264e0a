"""The zone lifecycle state machine (pure)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from zoned import lifecycle
from zoned.errors import Conflict
from zoned.lifecycle import (
    INPUTS,
    STATES,
    Input,
    hears_agent,
    is_quarantined,
    is_ready,
    is_settled,
    is_terminal,
    runs_domain,
    transition,
)
from zoned.protocol import ZoneState


def _docstring_table() -> dict[tuple[ZoneState, Input], ZoneState]:
    """The table in the module docstring, read back; pairs marked ``-`` are left out.

    The docstring is the machine's specification: a change to the machine
    must change it, and this reads it independently of the code's table.
    """
    doc = lifecycle.__doc__ or ""
    lines = doc.split("::", 1)[1].strip("\n").splitlines()
    header = lines[0].split()
    assert tuple(header) == STATES
    table: dict[tuple[ZoneState, Input], ZoneState] = {}
    rows = 0
    for line in lines[1:]:
        if not line.strip():
            break
        event, *cells = line.split()
        assert event in INPUTS, event
        rows += 1
        for state, cell in zip(STATES, cells, strict=True):
            if cell != "-":
                table[(state, event)] = state if cell == "=" else cell  # type: ignore[assignment]
    assert rows == len(INPUTS)
    return table


EXPECTED = _docstring_table()


def test_states_and_inputs_are_the_wire_vocabulary() -> None:
    assert STATES == (
        "creating",
        "booting",
        "ready",
        "stopping",
        "stopped",
        "failed",
        "quarantined",
    )
    assert len(INPUTS) == 11


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", INPUTS)
def test_full_table(state: ZoneState, event: Input) -> None:
    expected = EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(Conflict) as caught:
            transition(state, event)
        assert caught.value.code == "conflict"
        assert repr(state) in caught.value.message
        assert repr(event) in caught.value.message
    else:
        result = transition(state, event)
        assert result.new_state == expected
        assert result.changed == (expected != state)
        assert result.reason


def test_unknown_state_or_input_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="unknown"):
        transition("running", "started")  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="unknown"):
        transition("ready", "reboot")  # type: ignore[arg-type]


def test_reason_is_the_meaning_plus_the_detail() -> None:
    assert transition("booting", "agent_hello").reason == "agent said hello"
    crashed = transition("ready", "domain_crashed", "qemu killed by signal 11")
    assert crashed.new_state == "failed"
    assert crashed.reason == "domain crashed: qemu killed by signal 11"


def test_terminal() -> None:
    assert [s for s in STATES if is_terminal(s)] == ["stopped", "failed"]


def test_settled_running_and_ready() -> None:
    assert [s for s in STATES if not is_settled(s)] == ["creating", "booting"]
    assert [s for s in STATES if runs_domain(s)] == ["booting", "ready", "quarantined"]
    assert [s for s in STATES if hears_agent(s)] == ["booting", "ready"]
    assert [s for s in STATES if is_ready(s)] == ["ready"]
    assert [s for s in STATES if is_quarantined(s)] == ["quarantined"]
    # Every state a transition can reach from booting is settled, except booting itself.
    reached = {new for (old, _), new in EXPECTED.items() if old == "booting"}
    assert {s for s in reached if not is_settled(s)} == {"booting"}


def walk(steps: Iterable[tuple[Input, str]], state: ZoneState = "creating") -> list[str]:
    """Feed inputs in order; return the states passed through and the last reason."""
    seen: list[str] = [state]
    reason = ""
    for event, detail in steps:
        result = transition(state, event, detail)
        state, reason = result.new_state, result.reason
        seen.append(state)
    return [*seen, reason]


def test_normal_life() -> None:
    assert walk(
        [
            ("started", ""),
            ("agent_hello", "kernel 6.12.1"),
            ("destroy_requested", "by uid 1000"),
            ("domain_stopped", "destroyed"),
        ]
    ) == [
        "creating",
        "booting",
        "ready",
        "stopping",
        "stopped",
        "domain stopped: destroyed",
    ]


def test_destroy_during_boot_absorbs_late_facts() -> None:
    assert walk(
        [
            ("started", ""),
            ("destroy_requested", ""),
            # The agent's hello and the boot timer race the destroy: stale.
            ("agent_hello", ""),
            ("boot_timeout", ""),
            ("domain_stopped", "destroyed"),
            # The undefine after the destroy, and a repeated destroy request.
            ("domain_vanished", ""),
            ("destroy_requested", ""),
        ]
    ) == [
        "creating",
        "booting",
        "stopping",
        "stopping",
        "stopping",
        "stopped",
        "stopped",
        "stopped",
        "destroy requested",
    ]


def test_destroy_during_creation_absorbs_the_late_start() -> None:
    assert walk([("destroy_requested", ""), ("started", ""), ("domain_stopped", "")])[:-1] == [
        "creating",
        "stopping",
        "stopping",
        "stopped",
    ]


def test_qemu_crash_fails_the_zone_with_its_reason() -> None:
    states = walk(
        [
            ("started", ""),
            ("agent_hello", ""),
            ("domain_crashed", "qemu-system-x86_64 exited: signal 6"),
        ]
    )
    assert states[-2:] == ["failed", "domain crashed: qemu-system-x86_64 exited: signal 6"]
    # The stop event that follows the crash leaves the failure (and its reason) alone.
    late = transition("failed", "domain_stopped", "crashed")
    assert late.new_state == "failed"
    assert not late.changed


def test_boot_timeout_fails_the_zone() -> None:
    states = walk([("started", ""), ("boot_timeout", "60 s")])
    assert states[-2:] == ["failed", "no agent hello within the boot timeout: 60 s"]
    # The shell destroys the leftover domain; its events are absorbed.
    assert not transition("failed", "domain_stopped").changed
    # And a destroy request afterwards cleans up through stopping.
    assert transition("failed", "destroy_requested").new_state == "stopping"
    with pytest.raises(Conflict, match=r"'failed'.*'agent_hello'"):
        transition("failed", "agent_hello")


def test_agent_silent_fails_a_ready_zone() -> None:
    states = walk([("started", ""), ("agent_hello", ""), ("agent_silent", "30 s")])
    assert states[-2:] == ["failed", "agent went silent: 30 s"]
    with pytest.raises(Conflict):
        transition("booting", "agent_silent")


def test_readoption_after_restart() -> None:
    assert transition("ready", "resumed_after_restart").new_state == "booting"
    assert transition("booting", "agent_hello").new_state == "ready"
    assert transition("stopping", "resumed_after_restart").new_state == "stopping"
    # A zone whose domain vanished while the daemon was away.
    assert transition("ready", "domain_vanished").new_state == "failed"
    # A stopped zone whose domain runs: a conflict for the shell to resolve.
    with pytest.raises(Conflict, match=r"'stopped'.*'resumed_after_restart'"):
        transition("stopped", "resumed_after_restart")


def test_destroying_a_stopped_zone_is_a_no_op() -> None:
    result = transition("stopped", "destroy_requested")
    assert result.new_state == "stopped"
    assert not result.changed


def test_quarantine_freezes_until_destroyed() -> None:
    assert walk(
        [
            ("started", ""),
            ("agent_hello", ""),
            ("quarantine_requested", "by uid 0"),
            # The paused agent cannot answer: its silence is stale, not a failure.
            ("agent_silent", ""),
            ("agent_misbehaved", ""),
            # A daemon restart leaves it frozen.
            ("resumed_after_restart", ""),
            # A second quarantine (more evidence) changes nothing.
            ("quarantine_requested", ""),
            ("destroy_requested", ""),
            ("domain_stopped", "destroyed"),
        ]
    )[:-1] == [
        "creating",
        "booting",
        "ready",
        "quarantined",
        "quarantined",
        "quarantined",
        "quarantined",
        "quarantined",
        "stopping",
        "stopped",
    ]
    assert transition("booting", "quarantine_requested").new_state == "quarantined"
    # Its QEMU going away by itself fails it.
    assert transition("quarantined", "domain_crashed").new_state == "failed"


@pytest.mark.parametrize("state", ["creating", "stopping", "stopped", "failed"])
def test_only_a_running_zone_can_be_quarantined(state: ZoneState) -> None:
    with pytest.raises(Conflict, match="quarantine_requested"):
        transition(state, "quarantine_requested")


@pytest.mark.parametrize("event", INPUTS)
def test_the_input_is_read_back_from_its_reason(event: Input) -> None:
    state = next(s for s in STATES if (s, event) in EXPECTED)
    assert lifecycle.input_of_reason(transition(state, event, "detail: x").reason) == event
    assert lifecycle.input_of_reason(transition(state, event).reason) == event
    assert lifecycle.input_of_reason("something else") is None
