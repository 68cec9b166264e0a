"""Each zone's QEMU identity: a uid and gid of its own from a reserved range.

One QEMU escape must not own every zone, so no two zones' QEMUs share a uid:
libvirt starts each with a static DAC label ``+UID:+GID`` (the same number
for both, and no supplementary groups) taken from the configured range
``zone_uid_base .. zone_uid_base + zone_uid_count - 1``. The range's first id
is the accelerator probe's; zones get the others.

Rules:

- The range must not overlap any user or group of the host, nor any
  subordinate id range (``/etc/subuid``, ``/etc/subgid``: a rootless
  container's ids are real kernel ids too). :func:`range_clashes` says where it
  does; the daemon refuses to start then, and changes nothing.
- :class:`QemuIdAllocator` hands out the lowest free id. An id is free when no
  zone record holds it and no live process runs as it (another daemon on the
  same host, a forgotten QEMU); the caller passes the ids of live processes.
- A zone keeps its id while its QEMU lives, across daemon restarts (the
  record and the domain's metadata carry it); destroy, or a failure that
  stops its QEMU, releases it.

The parsers and the allocator are pure; :func:`read_host_accounts` and
:func:`live_process_ids` read the host (blocking: worker threads).
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zoned.errors import Conflict, NoCapacity


@dataclass(frozen=True)
class IdRange:
    """``count`` ids from ``base``: uids and gids alike."""

    base: int
    count: int

    @property
    def last(self) -> int:
        return self.base + self.count - 1

    @property
    def probe_id(self) -> int:
        """The accelerator probe's id: the first of the range."""
        return self.base

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.base <= value <= self.last

    def overlaps(self, start: int, count: int) -> bool:
        return start <= self.last and self.base <= start + count - 1

    def __str__(self) -> str:
        return f"{self.base}-{self.last}"


@dataclass(frozen=True)
class SubordinateRange:
    """One line of ``/etc/subuid`` or ``/etc/subgid``: ``owner:start:count``."""

    owner: str
    start: int
    count: int


@dataclass(frozen=True)
class HostAccounts:
    """The ids the host already uses, by kind."""

    users: dict[int, str] = field(default_factory=dict)
    groups: dict[int, str] = field(default_factory=dict)
    subuids: tuple[SubordinateRange, ...] = ()
    subgids: tuple[SubordinateRange, ...] = ()


def parse_subordinate_ids(text: str) -> tuple[SubordinateRange, ...]:
    """The ranges of a ``/etc/subuid``-style file; malformed lines are skipped,
    as shadow-utils skips them."""
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or line.lstrip().startswith("#"):
            continue
        owner, start, count = parts
        if start.isdigit() and count.isdigit():
            ranges.append(SubordinateRange(owner, int(start), int(count)))
    return tuple(ranges)


def range_clashes(ids: IdRange, accounts: HostAccounts, *, limit: int = 5) -> list[str]:
    """Where ``ids`` overlaps the host's accounts, in words; empty when it does not."""
    clashes: list[str] = []
    for kind, table in (("user", accounts.users), ("group", accounts.groups)):
        for number in sorted(n for n in table if n in ids):
            clashes.append(f"{kind} {table[number]} ({number})")
    for kind, subranges in (("subuid", accounts.subuids), ("subgid", accounts.subgids)):
        for sub in subranges:
            if ids.overlaps(sub.start, sub.count):
                clashes.append(
                    f"{kind} range of {sub.owner} ({sub.start}-{sub.start + sub.count - 1})"
                )
    if len(clashes) > limit:
        clashes = [*clashes[:limit], f"and {len(clashes) - limit} more"]
    return clashes


class QemuIdAllocator:
    """Which zone holds which id of the range (pure bookkeeping)."""

    def __init__(self, ids: IdRange) -> None:
        self.ids = ids
        self._by_zone: dict[str, int] = {}
        self._by_id: dict[int, str] = {}

    def allocate(self, zone: str, busy: Iterable[int] = ()) -> int:
        """The lowest id no zone holds and no process in ``busy`` runs as."""
        if zone in self._by_zone:
            raise Conflict(f"zone {zone!r} already has QEMU id {self._by_zone[zone]}")
        taken = set(self._by_id).union(busy)
        for candidate in range(self.ids.base + 1, self.ids.last + 1):
            if candidate not in taken:
                self._by_zone[zone] = candidate
                self._by_id[candidate] = zone
                return candidate
        raise NoCapacity(
            f"no free QEMU uid left in {self.ids} (zone_uid_base/zone_uid_count):"
            f" {len(self._by_id)} held by zones, the rest by running processes"
        )

    def adopt(self, zone: str, uid: int) -> None:
        """Record that ``zone`` (re-adopted) holds ``uid``; Conflict if another does."""
        holder = self._by_id.get(uid)
        if holder is not None and holder != zone:
            raise Conflict(f"QEMU uid {uid} of zone {zone!r} is already zone {holder!r}'s")
        self._by_zone[zone] = uid
        self._by_id[uid] = zone

    def rename(self, zone: str, new_name: str) -> None:
        """The id ``zone`` holds is ``new_name``'s now (a pool zone acquired)."""
        if new_name in self._by_zone:
            raise Conflict(f"zone {new_name!r} already has QEMU id {self._by_zone[new_name]}")
        uid = self._by_zone.pop(zone, None)
        if uid is not None:
            self._by_zone[new_name] = uid
            self._by_id[uid] = new_name

    def release(self, zone: str) -> None:
        uid = self._by_zone.pop(zone, None)
        if uid is not None:
            self._by_id.pop(uid, None)

    def held(self) -> dict[str, int]:
        return dict(self._by_zone)


# --------------------------------------------------------------------------
# Reading the host (blocking)
# --------------------------------------------------------------------------


def read_host_accounts(etc: Path = Path("/etc")) -> HostAccounts:
    """Users and groups (through NSS, so /etc/passwd and /etc/group and
    whatever else enumerates) and the subordinate id ranges."""

    def subordinate(name: str) -> tuple[SubordinateRange, ...]:
        try:
            return parse_subordinate_ids((etc / name).read_text())
        except FileNotFoundError:
            return ()

    return HostAccounts(
        users={entry.pw_uid: entry.pw_name for entry in pwd.getpwall()},
        groups={entry.gr_gid: entry.gr_name for entry in grp.getgrall()},
        subuids=subordinate("subuid"),
        subgids=subordinate("subgid"),
    )


def live_process_ids(ids: IdRange, proc: Path = Path("/proc")) -> set[int]:
    """The ids in ``ids`` that a live process runs as (any of its uids or gids)."""
    found: set[int] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "status")) as status:
                for line in status:
                    if line.startswith(("Uid:", "Gid:")):
                        found.update(int(n) for n in line.split()[1:] if int(n) in ids)
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found
