"""Waiting on the daemon's event stream instead of polling it.

:func:`watching` subscribes a client to lifecycle events and yields an
:class:`EventLog` that collects them as they arrive; its waits wake on the
next event, never on a timer. Callers own the timeout (``trio.fail_after``).

Subscribe before the fact you wait for can happen: the stream carries
events from the moment the daemon takes the request. An in-process daemon
(the service tests) has taken it once ``trio.testing.wait_all_tasks_blocked()``
returns after :func:`watching`; a daemon in another process has taken it
within the request's round trip, long before a zone boots or dies.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from zoned import protocol as p
from zoned.client import Client


class EventLog:
    """Events in arrival order; :meth:`wait_for` returns the first that matches."""

    def __init__(self) -> None:
        self.events: list[p.Event] = []
        self._arrived = trio.Event()

    async def collect(
        self,
        client: Client,
        kinds: Sequence[p.EventKind] = (),
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        async with contextlib.aclosing(client.watch_events(kinds=kinds)) as events:
            task_status.started()
            async for event in events:
                self.events.append(event)
                self._arrived.set()
                self._arrived = trio.Event()

    async def wait_for(self, predicate: Callable[[p.Event], bool]) -> p.Event:
        """The first event, seen or still to come, for which ``predicate`` holds."""
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            await self._arrived.wait()

    async def wait_for_state(self, zone: str, state: p.ZoneState) -> p.Event:
        return await self.wait_for(
            lambda e: e.kind == "zone_state" and e.zone == zone and e.state == state
        )

    def states(self, zone: str) -> list[str]:
        """The states ``zone`` entered, in order."""
        return [e.state for e in self.events if e.kind == "zone_state" and e.zone == zone]


@contextlib.asynccontextmanager
async def watching(client: Client, kinds: Sequence[p.EventKind] = ()) -> AsyncIterator[EventLog]:
    """Collect ``client``'s event stream (of ``kinds``: default, the daemon's
    default kinds) for the duration of the block."""
    log = EventLog()
    async with trio.open_nursery() as nursery:
        await nursery.start(log.collect, client, kinds)
        yield log
        nursery.cancel_scope.cancel()
