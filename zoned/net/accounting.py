"""Per-zone network counters, refused events, and the rate limits that bound them.

Pure (the caller passes ``now``). A zone's refused connections and names
become events, but a flood must not drown the event stream: events pass a
token bucket, and the next event that does pass says how many were
suppressed before it. Counters are never suppressed.
"""

from __future__ import annotations

from typing import Literal

import msgspec

RefusedKind = Literal["connect", "dns", "rebinding", "sni", "limit"]


class NetCounters(msgspec.Struct, kw_only=True, omit_defaults=True):
    bytes_out: int = 0  # zone -> world (proxied payload and forwarded UDP)
    bytes_in: int = 0  # world -> zone
    connections_allowed: int = 0
    connections_refused: int = 0
    connections_active: int = 0
    dns_answered: int = 0
    dns_refused: int = 0
    dns_dropped: int = 0  # garbage or over the rate limit: no answer at all
    events_suppressed: int = 0


class RefusedEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    time: float
    kind: RefusedKind
    destination: str = ""  # address, or the name asked for
    port: int = 0
    protocol: str = "tcp"
    name: str = ""  # the name claimed (SNI/Host) or queried
    rule: str = ""  # why: a refused range, "name-not-allowed", "sni-mismatch", ...
    suppressed_before: int = 0  # events dropped by the rate limit since the last one


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class EventLimiter:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.bucket = TokenBucket(rate, burst, now)
        self.suppressed = 0

    def admit(self, event: RefusedEvent, now: float, counters: NetCounters) -> RefusedEvent | None:
        """The event to publish (carrying the suppressed count), or None if over the limit."""
        if not self.bucket.take(now):
            self.suppressed += 1
            counters.events_suppressed += 1
            return None
        if self.suppressed:
            event = msgspec.structs.replace(event, suppressed_before=self.suppressed)
            self.suppressed = 0
        return event
