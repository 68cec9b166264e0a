"""DNS pinning: which names the resolver answered with which address, for one zone.

Pure (the caller passes ``now``). The proxy lets a name-rule connection
through only to an address recorded here for an allowed name. Bounded:
at most ``max_entries`` (address, name) pairs; when full, the entries that
expire first make room, so a zone that floods DNS only forgets its own
oldest answers. A pin lives at least ``min_ttl_s`` (clients cache longer
than DNS TTLs say) and at most ``max_ttl_s``; the TTL the zone sees is cut
to the pin's lifetime, so a well-behaved client never connects to an
address that is no longer pinned.
"""

from __future__ import annotations

from collections.abc import Iterable

from zoned.net.policy import IPAddress


class PinTable:
    def __init__(
        self, *, max_entries: int = 4096, min_ttl_s: float = 300.0, max_ttl_s: float = 86400.0
    ) -> None:
        self.max_entries = max_entries
        self.min_ttl_s = min_ttl_s
        self.max_ttl_s = max_ttl_s
        self._by_addr: dict[IPAddress, dict[str, float]] = {}
        self._count = 0
        self.evicted = 0

    def __len__(self) -> int:
        return self._count

    def lifetime(self, ttl: int) -> float:
        """How long an answer with ``ttl`` stays pinned."""
        return min(max(float(ttl), self.min_ttl_s), self.max_ttl_s)

    def client_ttl(self, ttl: int) -> int:
        """The TTL handed to the zone: never longer than the pin lives."""
        return int(min(ttl, self.lifetime(ttl)))

    def record(
        self, names: Iterable[str], addrs: Iterable[tuple[IPAddress, int]], now: float
    ) -> None:
        names = list(names)
        for addr, ttl in addrs:
            expiry = now + self.lifetime(ttl)
            entry = self._by_addr.setdefault(addr, {})
            for name in names:
                if name not in entry:
                    self._count += 1
                entry[name] = max(expiry, entry.get(name, 0.0))
        if self._count > self.max_entries:
            self.expire(now)
        while self._count > self.max_entries:
            self._evict_earliest()

    def record_until(self, name: str, addr: IPAddress, expiry: float) -> None:
        """One pin with an absolute expiry (seeding a restarted helper); bounded like record."""
        entry = self._by_addr.setdefault(addr, {})
        if name not in entry:
            self._count += 1
        entry[name] = max(expiry, entry.get(name, 0.0))
        while self._count > self.max_entries:
            self._evict_earliest()

    def entries(self, now: float) -> list[tuple[IPAddress, str, float]]:
        """Every live pin as (address, name, expiry)."""
        return [
            (addr, name, expiry)
            for addr, entry in self._by_addr.items()
            for name, expiry in entry.items()
            if expiry > now
        ]

    def names_for(self, addr: IPAddress, now: float) -> set[str]:
        entry = self._by_addr.get(addr)
        if not entry:
            return set()
        return {name for name, expiry in entry.items() if expiry > now}

    def pinned(self, name: str, addr: IPAddress, now: float) -> bool:
        expiry = self._by_addr.get(addr, {}).get(name)
        return expiry is not None and expiry > now

    def expire(self, now: float) -> None:
        for addr in list(self._by_addr):
            entry = self._by_addr[addr]
            for name in [n for n, expiry in entry.items() if expiry <= now]:
                del entry[name]
                self._count -= 1
            if not entry:
                del self._by_addr[addr]

    def _evict_earliest(self) -> None:
        addr, name = min(
            ((a, n) for a, entry in self._by_addr.items() for n in entry),
            key=lambda key: self._by_addr[key[0]][key[1]],
        )
        del self._by_addr[addr][name]
        if not self._by_addr[addr]:
            del self._by_addr[addr]
        self._count -= 1
        self.evicted += 1
