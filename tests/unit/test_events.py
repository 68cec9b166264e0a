"""The event hub: watchers get the zones and kinds they asked for, and one that
falls behind is cut off while publishing goes on for everybody else."""

from __future__ import annotations

import trio

from zoned.events import WATCHER_BUFFER, EventHub
from zoned.protocol import Event


def drain(receive: trio.MemoryReceiveChannel[Event]) -> list[Event]:
    found = []
    while True:
        try:
            found.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return found


async def test_a_slow_watcher_is_cut_off_and_publishing_goes_on() -> None:
    hub = EventHub()
    with (
        hub.watch(kinds=["net_refused"]) as slow,
        hub.watch(zones=["b"], kinds=["net_refused", "zone_state"]) as other,
    ):
        for _ in range(WATCHER_BUFFER + 1):
            hub.publish("net_refused", zone="a")
        hub.publish("net_refused", zone="b")
        hub.publish("zone_state", zone="b", state="ready")
        # The slow one got its buffer's worth, then its stream ended.
        assert len(drain(slow)) == WATCHER_BUFFER
        assert [(e.kind, e.zone) for e in drain(other)] == [
            ("net_refused", "b"),
            ("zone_state", "b"),
        ]
        hub.publish("net_refused", zone="b")
        assert len(drain(other)) == 1
