"""The labels that tie zones to the zoned-mcp session that made them, pure.

Every zone a session makes carries :data:`LABEL_UID` (the uid the session
runs as) and :data:`LABEL_SESSION` (``<pid>.<start time in clock ticks>``:
unique on this host while the process runs, and whether it still runs can
be told from ``/proc``). Zones that outlived their session (the daemon was
restarted under it and adopted them) are so found, and reclaimed
(:func:`leftover_zones`) by the next session of the same uid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from zoned import protocol as p

LABEL_UID = "zoned-mcp.uid"
LABEL_SESSION = "zoned-mcp.session"


class SessionId(NamedTuple):
    pid: int
    start_ticks: int

    def label(self) -> str:
        return f"{self.pid}.{self.start_ticks}"


def parse_session_label(text: str) -> SessionId | None:
    """A session label's value; None for anything this server did not write."""
    found = re.fullmatch(r"([1-9][0-9]{0,9})\.([0-9]{1,20})", text)
    if found is None:
        return None
    return SessionId(int(found[1]), int(found[2]))


def process_start_ticks(stat: str) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time since boot, clock ticks); None if garbled."""
    # The command name (field 2) is in parentheses and may hold anything, ")" too.
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def session_labels(uid: int, session: SessionId) -> dict[str, str]:
    return {LABEL_UID: str(uid), LABEL_SESSION: session.label()}


def leftover_zones(
    zones: list[p.ZoneInfo], uid: int, session: SessionId, alive: Mapping[SessionId, bool]
) -> list[str]:
    """Zones that sessions of ``uid`` other than ``session`` left and that no longer run."""
    found = []
    for zone in zones:
        if zone.labels.get(LABEL_UID) != str(uid) or zone.state in ("stopped", "failed"):
            continue
        owner = parse_session_label(zone.labels.get(LABEL_SESSION, ""))
        if owner is None or owner == session:
            continue
        if not alive.get(owner, True):
            found.append(zone.name)
    return found
