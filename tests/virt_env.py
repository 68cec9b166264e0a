"""zoned.virt's Hypervisor on a libvirt URI for a test, with the domain events it
delivers, and the test's domains removed after it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from zoned import virt
from zoned.virt import DomainEvent, Hypervisor


class Env:
    def __init__(self, hv: Hypervisor, events: trio.MemoryReceiveChannel[DomainEvent]) -> None:
        self.hv = hv
        self.events = events


@contextlib.asynccontextmanager
async def connected(
    uri: str, prefix: str, own: tuple[str, ...] = ()
) -> AsyncIterator[tuple[Hypervisor, trio.MemoryReceiveChannel[DomainEvent]]]:
    """A connection to ``uri`` and its event channel. On leaving, the domains
    that ``list_domains(prefix)`` finds and whose names start with one of
    ``own`` (default: ``prefix``) are removed, shielded (a cancelled test
    cleans up too)."""
    own = own or (prefix,)
    send, receive = virt.open_event_channel()
    async with await Hypervisor.connect(uri, trio.CapacityLimiter(4), send) as hv:
        try:
            yield hv, receive
        finally:
            with trio.CancelScope(shield=True):
                for summary in await hv.list_domains(prefix):
                    if summary.name.startswith(own):
                        await hv.remove(summary.name)
