"""Who is calling, and what they may see and do (pure).

Every control-socket connection has a :class:`Caller`: the peer's uid, gid
and pid from ``SO_PEERCRED`` and its supplementary groups (read from
``/proc/<pid>/status`` when it connected). The daemon hands it to every
request's handler; it is also what later work (an audit trail, API keys
mapped to owners) keys on.

Rules (:class:`AccessPolicy`):

- Root and members of the socket's group (``zoned``) may connect; anybody
  else gets ``permission_denied`` (:meth:`AccessPolicy.may_connect`).
- A zone belongs to the uid that created it (its *owner*). Zones recorded
  before owners existed belong to root.
- Root and members of the administrators' group (``admin_group`` in
  ``zoned.toml``; none by default) see and act on every zone. Everyone else
  sees and acts on their own zones only: another user's zone does not exist
  for them (``not_found``, the same answer as for a name nobody holds), it is
  left out of ``list``, its events are not sent to them, and ``host`` does
  not name it. Zone names are one namespace for the whole host, so creating a
  zone under a name someone else holds is refused as a ``conflict`` that
  says only that the name is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from zoned.protocol import Event

#: The owner of zones recorded before zones had owners.
ROOT_UID = 0


@dataclass(frozen=True)
class Caller:
    """One control-socket peer: ``SO_PEERCRED`` and its supplementary groups."""

    uid: int
    gid: int
    groups: frozenset[int]
    pid: int
    #: ``/proc/<pid>/exe`` when it connected ("" if unreadable), for the audit trail.
    exe: str = ""

    def in_group(self, gid: int | None) -> bool:
        return gid is not None and (self.gid == gid or gid in self.groups)


#: The daemon acting on its own behalf (re-adoption, finishing a destroy).
DAEMON = Caller(uid=ROOT_UID, gid=0, groups=frozenset(), pid=0)


@dataclass(frozen=True)
class AccessPolicy:
    """Group ids the rules above name; ``None`` where the group does not exist."""

    socket_gid: int | None
    admin_gid: int | None = None

    def may_connect(self, caller: Caller) -> bool:
        return caller.uid == ROOT_UID or caller.in_group(self.socket_gid)

    def sees_all(self, caller: Caller) -> bool:
        """Root, or a member of the administrators' group."""
        return caller.uid == ROOT_UID or caller.in_group(self.admin_gid)

    def may_act_on(self, caller: Caller, owner_uid: int) -> bool:
        return caller.uid == owner_uid or self.sees_all(caller)

    def event_view(self, caller: Caller) -> Callable[[Event, int | None], Event | None]:
        """What ``caller`` gets of an event of a zone owned by the given uid
        (None: not a zone's event): its own zones' events, and host events
        without the names of zones that are not its own."""
        if self.sees_all(caller):
            return _whole
        uid = caller.uid

        def view(event: Event, owner_uid: int | None) -> Event | None:
            if owner_uid is not None:
                return event if owner_uid == uid else None
            if event.kind in ("cpu_online", "cpu_offline") and event.reason:
                # It lists the zones the CPU's change affects.
                return msgspec.structs.replace(event, reason="")
            return event

        return view


def _whole(event: Event, owner_uid: int | None) -> Event:
    return event
