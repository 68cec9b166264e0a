"""The event hub: every lifecycle, process and host event, fanned out to watchers.

Publishing never blocks (sync never blocks): each watcher has a bounded
buffer, and a watcher that falls that far behind is cut off (its stream
ends with an error) rather than slowing the daemon or growing memory.

A zone's events carry its owner's uid (kept here, not sent): each watcher
has a view that decides what of an event it gets, so that a caller sees
only the events of the zones it may see (:mod:`zoned.access`). A watcher
may also ask for some zones' events only, and for some kinds only (by
default, the kinds of the first protocol version:
:data:`~zoned.protocol.DEFAULT_EVENT_KINDS`). Listeners (the audit trail's
per-zone event files, the metrics' counters) see every event, with the
zone's uuid when the publisher knows it; they must not block either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from zoned.protocol import (
    DEFAULT_EVENT_KINDS,
    CallerInfo,
    Event,
    EventKind,
    ExecRecord,
    NetRefusal,
)

log = logging.getLogger(__name__)

WATCHER_BUFFER = 1024

#: What a watcher gets of an event of a zone owned by the given uid (None:
#: not a zone's event): the event, an edited copy, or None for nothing.
View = Callable[[Event, int | None], Event | None]
#: Told of every event and the zone's uuid ("" when the publisher did not say).
Listener = Callable[[Event, str], None]


def _everything(event: Event, owner_uid: int | None) -> Event | None:
    return event


@dataclass(frozen=True)
class _Watcher:
    send: trio.MemorySendChannel[Event]
    view: View
    zones: frozenset[str]
    kinds: frozenset[str]


class EventHub:
    def __init__(self) -> None:
        self._seq = 0
        self._watchers: dict[int, _Watcher] = {}
        self._next_watcher = 0
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(
        self,
        kind: EventKind,
        *,
        zone: str = "",
        state: str = "",
        previous: str = "",
        reason: str = "",
        cpu: int | None = None,
        owner_uid: int | None = None,
        exec: ExecRecord | None = None,
        caller: CallerInfo | None = None,
        zone_uuid: str = "",
        refused: NetRefusal | None = None,
    ) -> Event:
        self._seq += 1
        event = Event(
            seq=self._seq,
            time=time.time(),
            kind=kind,
            zone=zone,
            state=state,
            previous=previous,
            reason=reason,
            cpu=cpu,
            exec=exec,
            caller=caller,
            refused=refused,
        )
        log.info(
            "event %s zone=%s %s->%s %s",
            kind,
            zone or "-",
            previous or "-",
            state or "-",
            reason,
        )
        for listener in self._listeners:
            try:
                listener(event, zone_uuid)
            except Exception:
                log.exception("an event listener failed on %s", event.kind)
        for key, watcher in list(self._watchers.items()):
            if event.kind not in watcher.kinds or (watcher.zones and zone not in watcher.zones):
                continue
            seen = watcher.view(event, owner_uid)
            if seen is None:
                continue
            try:
                watcher.send.send_nowait(seen)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # Too slow or gone: cut it off; its receiver sees the channel end.
                watcher.send.close()
                del self._watchers[key]
        return event

    @contextmanager
    def watch(
        self,
        view: View = _everything,
        zones: Iterable[str] = (),
        kinds: Iterable[EventKind] = (),
    ) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """A receive channel of the events published from now on, as ``view``
        shows them: of ``zones`` only (none of the host's) when given, of
        ``kinds`` (default: :data:`~zoned.protocol.DEFAULT_EVENT_KINDS`)."""
        send, receive = trio.open_memory_channel[Event](WATCHER_BUFFER)
        key = self._next_watcher
        self._next_watcher += 1
        self._watchers[key] = _Watcher(
            send, view, frozenset(zones), frozenset(kinds or DEFAULT_EVENT_KINDS)
        )
        try:
            yield receive
        finally:
            self._watchers.pop(key, None)
            send.close()
            receive.close()
