"""The event hub: every lifecycle and host event, fanned out to watchers.

Publishing never blocks (sync never blocks): each watcher has a bounded
buffer, and a watcher that falls that far behind is cut off (its stream
ends with an error) rather than slowing the daemon or growing memory.

A zone's events carry its owner's uid (kept here, not sent): each watcher
has a view that decides what of an event it gets, so that a caller sees
only the events of the zones it may see (:mod:`zoned.access`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from zoned.protocol import Event, EventKind

log = logging.getLogger(__name__)

WATCHER_BUFFER = 1024

#: What a watcher gets of an event of a zone owned by the given uid (None:
#: not a zone's event): the event, an edited copy, or None for nothing.
View = Callable[[Event, int | None], Event | None]


def _everything(event: Event, owner_uid: int | None) -> Event | None:
    return event


class EventHub:
    def __init__(self) -> None:
        self._seq = 0
        self._watchers: dict[int, tuple[trio.MemorySendChannel[Event], View]] = {}
        self._next_watcher = 0

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
        )
        log.info(
            "event %s zone=%s %s->%s %s",
            kind,
            zone or "-",
            previous or "-",
            state or "-",
            reason,
        )
        for key, (send, view) in list(self._watchers.items()):
            seen = view(event, owner_uid)
            if seen is None:
                continue
            try:
                send.send_nowait(seen)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # Too slow or gone: cut it off; its receiver sees the channel end.
                send.close()
                del self._watchers[key]
        return event

    @contextmanager
    def watch(self, view: View = _everything) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """A receive channel of every event published from now on, as ``view`` shows it."""
        send, receive = trio.open_memory_channel[Event](WATCHER_BUFFER)
        key = self._next_watcher
        self._next_watcher += 1
        self._watchers[key] = (send, view)
        try:
            yield receive
        finally:
            self._watchers.pop(key, None)
            send.close()
            receive.close()
