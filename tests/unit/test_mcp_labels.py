"""The labels that tie zones to a zoned-mcp session, and which zones are leftovers."""

from __future__ import annotations

import os
from pathlib import Path

from tests.samples import minimal_zone
from zoned import protocol as p
from zoned.mcp import labels as lb

ME = lb.SessionId(pid=100, start_ticks=5000)
UID = 1000


def zone(name: str, labels: dict[str, str], state: p.ZoneState = "ready") -> p.ZoneInfo:
    return minimal_zone(name, state=state, labels=labels)


def test_session_labels_round_trip() -> None:
    labels = lb.session_labels(UID, ME)
    assert labels == {lb.LABEL_UID: "1000", lb.LABEL_SESSION: "100.5000"}
    assert lb.parse_session_label(labels[lb.LABEL_SESSION]) == ME
    # The labels are valid wire labels.
    p.ListZones(id=1, labels=labels)


def test_only_labels_zoned_mcp_wrote_are_read() -> None:
    for text in ("", "100", "100.", ".5", "0.5", "a.5", "100.5.6", " 100.5", "100.5\n", "1e3.5"):
        assert lb.parse_session_label(text) is None, text


def test_process_start_time_from_proc_stat() -> None:
    fields = " ".join(str(n) for n in range(3, 30))  # field 3 .. 29; field 22 is "22"
    assert lb.process_start_ticks(f"42 (sh) {fields}") == 22
    assert lb.process_start_ticks(f"42 (a) b) (c) {fields}") == 22  # ")" in the name
    assert lb.process_start_ticks("42 (sh) R 1 2") is None
    assert lb.process_start_ticks("garbage") is None
    assert lb.process_start_ticks(f"42 (sh) {fields}".replace(" 22 ", " x ")) is None
    # This process's own line reads.
    assert lb.process_start_ticks(Path(f"/proc/{os.getpid()}/stat").read_text()) is not None


def test_leftovers_are_zones_of_dead_sessions_of_the_same_uid() -> None:
    dead = lb.SessionId(200, 1)
    alive = lb.SessionId(300, 2)
    zones = [
        zone("a", lb.session_labels(UID, dead)),
        zone("b", lb.session_labels(UID, alive)),
        zone("c", lb.session_labels(UID, ME)),  # this session's own
        zone("d", lb.session_labels(UID + 1, dead)),  # another user's
        zone("e", {lb.LABEL_UID: str(UID), lb.LABEL_SESSION: "not ours"}),
        zone("f", lb.session_labels(UID, dead), state="stopped"),
        zone("g", {}),
        zone("h", lb.session_labels(UID, lb.SessionId(400, 3))),  # unknown liveness: kept
    ]
    assert lb.leftover_zones(zones, UID, ME, {dead: False, alive: True}) == ["a"]
