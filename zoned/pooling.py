"""Warm pools, the pure part: which pool a request matches, what a template
may ask of the host, how long a failing pool waits.

The IO shell is :mod:`zoned.pools`. Rules:

- A request matches a pool when it asks for exactly what the pool's zones
  are (:func:`matches`): the same image as written ("" and the daemon's
  default image are one), profile, vCPUs, memory, machine (None: the
  daemon's default), writable layer kind and size, shared placement and no
  extra kernel arguments. Anything else boots cold.
- A template is refused, changing nothing, when it is beyond the host's
  per-zone limits or when all pools' zones together would take more memory
  than the host has for zones (:func:`check_fits`).
- A pool whose refills fail in a row waits 2, 4, 8 ... s (at most the
  configured maximum) before the next try, and says why (:class:`PoolState`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from zoned.errors import InvalidRequest
from zoned.protocol import CreateZone, PoolInfo, PoolSpec


@dataclass(frozen=True)
class HostLimits:
    """What one zone may ask for on this host, and the memory all zones share."""

    max_vcpus: int
    zone_memory_mib: int
    default_image: str
    default_machine: str


def _same_image(a: str, b: str, default: str) -> bool:
    return (a or default) == (b or default)


def matches(spec: PoolSpec, request: CreateZone, limits: HostLimits) -> bool:
    """Whether a zone of ``spec`` is exactly what ``request`` asks for."""
    machine = limits.default_machine
    return (
        _same_image(spec.image, request.image, limits.default_image)
        and spec.profile == request.profile
        and spec.vcpus == request.vcpus
        and spec.memory_mib == request.memory_mib
        and (spec.machine or machine) == (request.machine or machine)
        and spec.writable_layer == request.writable_layer
        and spec.writable_layer_mib == request.writable_layer_mib
        and request.placement == "shared"
        and not request.kernel_args
        # Pool zones have no network: a zone that asks for one boots cold.
        and request.net is None
        and not request.publishes
    )


def pool_for(pools: Mapping[str, PoolSpec], request: CreateZone, limits: HostLimits) -> str | None:
    """The first pool (by name) ``request`` matches, or None."""
    return next((name for name in sorted(pools) if matches(pools[name], request, limits)), None)


def check_fits(
    name: str, spec: PoolSpec, others: Mapping[str, PoolSpec], limits: HostLimits
) -> None:
    """InvalidRequest unless the pool ``name`` fits the host beside ``others``
    (a zone's own memory bounds are :func:`zoned.zones.check_memory`'s)."""
    if spec.vcpus > limits.max_vcpus:
        raise InvalidRequest(
            f"pool {name!r}: vcpus={spec.vcpus} is above this host's limit of {limits.max_vcpus}"
        )
    total = sum(s.size * s.memory_mib for n, s in others.items() if n != name)
    total += spec.size * spec.memory_mib
    if total > limits.zone_memory_mib:
        raise InvalidRequest(
            f"pool {name!r}: {spec.size} zones of {spec.memory_mib} MiB would make the pools"
            f" hold {total} MiB, more than the {limits.zone_memory_mib} MiB this host has for"
            " zones"
        )


#: A template's fields that are a create's own (all but its ``size``).
_TEMPLATE_IN_CREATE: Final = tuple(
    name for name in PoolSpec.__struct_fields__ if name in CreateZone.__struct_fields__
)


def create_request(name: str, spec: PoolSpec) -> CreateZone:
    """The create that boots one zone of ``spec`` under the internal ``name``."""
    return CreateZone(
        id=0, name=name, **{field: getattr(spec, field) for field in _TEMPLATE_IN_CREATE}
    )


def backoff_s(failures_in_a_row: int, maximum: float) -> float:
    """How long a pool waits after ``failures_in_a_row`` failed refills."""
    if failures_in_a_row <= 0:
        return 0.0
    return float(min(maximum, 2.0 ** min(failures_in_a_row, 32)))


@dataclass
class PoolState:
    """One pool's counters since the daemon started (the shell updates them)."""

    hits: int = 0
    misses: int = 0
    refill_failures: int = 0
    failures_in_a_row: int = 0
    last_failure: str = ""
    backoff_until: float | None = None
    acquire_last_s: float | None = None
    acquire_total_s: float = 0.0

    def refill_failed(self, reason: str, now: float, maximum_backoff: float) -> None:
        self.refill_failures += 1
        self.failures_in_a_row += 1
        self.last_failure = reason
        self.backoff_until = now + backoff_s(self.failures_in_a_row, maximum_backoff)

    def refilled(self) -> None:
        self.failures_in_a_row = 0
        self.backoff_until = None

    def acquired(self, seconds: float) -> None:
        self.hits += 1
        self.acquire_last_s = seconds
        self.acquire_total_s += seconds

    def waiting(self, now: float) -> bool:
        return self.backoff_until is not None and now < self.backoff_until

    def info(self, name: str, spec: PoolSpec, *, ready: int, booting: int) -> PoolInfo:
        """The pool as ``list_pools`` shows it: its template, its zones and the
        counters PoolInfo shows by the same names; the shell's bookkeeping
        (failures in a row, shown as the back-off; the acquire total, shown as
        its mean) is not."""
        return PoolInfo(
            name=name,
            spec=spec,
            ready=ready,
            booting=booting,
            acquire_mean_s=self.acquire_total_s / self.hits if self.hits else None,
            **{field: getattr(self, field) for field in _STATE_IN_INFO},
        )


#: The counters of a pool's state that PoolInfo shows as they are.
_STATE_IN_INFO: Final = tuple(
    field.name
    for field in dataclasses.fields(PoolState)
    if field.name in PoolInfo.__struct_fields__
)
