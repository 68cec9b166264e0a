"""Warm pools, the IO shell: templates, background refill, acquire.

A pool is a named template (:class:`~zoned.protocol.PoolSpec`) and a target
number of booted, never-used zones of it. The pure rules (matching, fit,
back-off) are :mod:`zoned.pooling`'s. Rules of this shell:

- Templates come from zoned.toml's ``[pools.<name>]`` tables and from
  ``set_pool``/``remove_pool`` (root and administrators), which are kept in
  ``state_dir/pools.json`` and win over the file's entries. A template that
  names an unknown image or profile, or does not fit the host, is refused
  and nothing changes.
- One refill task boots pool zones one at a time, through the zone manager's
  ordinary create (admission control included: pool zones count against
  capacity) as the daemon, under an internal name (``pool-<pool>-<hex>``)
  with the record's ``pool`` set. Pool zones are invisible to ``list`` and
  ``get`` until acquired. A refill that fails (no capacity, a bad image, a
  boot that fails) destroys what it made, counts the failure, shows its
  reason and waits before that pool's next try (:func:`pooling.backoff_s`).
- Zones beyond a pool's size, of a pool that no longer exists, or that
  failed are destroyed by the same task, so resizing to 0 or removing a pool
  empties it.
- ``create_zone`` and ``run_zone`` that match a pool take its oldest ready
  zone in one synchronous step (:meth:`ZoneManager.take_pool_zone`), so no
  zone is handed out twice; no ready zone means a cold boot (a miss). The
  acquired zone is the caller's, with the requested name and labels; its
  domain keeps its internal name.
- A restarted daemon re-adopts pool zones with the other zones (their
  records carry ``pool``), and this task counts them as the pool's again.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from zoned import pooling
from zoned.access import DAEMON, AccessPolicy, Caller
from zoned.config import Config
from zoned.errors import InvalidRequest, NotFound, PermissionDenied, ZonedError
from zoned.imageservice import ImageService
from zoned.kernel.store import find_kernel
from zoned.protocol import MAX_POOLS, CreateZone, PoolInfo, PoolSpec, ZoneInfo
from zoned.store import write_file_atomically
from zoned.zones import ZoneManager, check_memory

log = logging.getLogger(__name__)

POOLS_FILE = "pools.json"


class _Saved(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What ``set_pool``/``remove_pool`` changed, over zoned.toml's pools."""

    pools: dict[str, PoolSpec] = {}
    removed: list[str] = []


class PoolKeeper:
    """The daemon's warm pools."""

    def __init__(
        self, config: Config, manager: ZoneManager, images: ImageService, policy: AccessPolicy
    ) -> None:
        self.config = config
        self.manager = manager
        self.images = images
        self.policy = policy
        self.templates: dict[str, PoolSpec] = dict(config.pools)
        self.states: dict[str, pooling.PoolState] = {}
        self._saved = _Saved()
        self._path = Path(config.state_dir) / POOLS_FILE
        self._wake = trio.Event()
        # When the last zone was taken (trio clock): refills wait pool_refill_delay_s after it.
        self._last_hit = -math.inf
        manager.pool_changed = self._wake_up

    def _wake_up(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ queries

    def limits(self) -> pooling.HostLimits:
        topology = self.manager.allocator.topology
        return pooling.HostLimits(
            max_vcpus=self.config.max_vcpus,
            zone_memory_mib=topology.memory_total_mib - self.config.reserved_memory_mib,
            default_image=self.config.default_image,
            default_machine=self.config.machine,
        )

    def state(self, name: str) -> pooling.PoolState:
        return self.states.setdefault(name, pooling.PoolState())

    def info(self, name: str) -> PoolInfo:
        zones = self.manager.pool_zones(name)
        ready = sum(1 for zone in zones if zone.record.state == "ready")
        booting = sum(1 for zone in zones if zone.record.state in ("creating", "booting"))
        spec = self.templates.get(name, PoolSpec(size=0))
        return self.state(name).info(name, spec, ready=ready, booting=booting)

    def infos(self) -> list[PoolInfo]:
        return [self.info(name) for name in sorted(self.templates)]

    # ------------------------------------------------------------ templates

    async def set(self, name: str, spec: PoolSpec, caller: Caller) -> PoolInfo:
        self._may_change(caller)
        if name not in self.templates and len(self.templates) >= MAX_POOLS:
            raise InvalidRequest(f"there are {MAX_POOLS} pools already, the most this host keeps")
        pooling.check_fits(name, spec, self.templates, self.limits())
        try:
            check_memory(
                self.config, spec.memory_mib, spec.profile, spec.machine or self.config.machine
            )
        except InvalidRequest as exc:
            raise InvalidRequest(f"pool {name!r}: {exc.message}") from None
        request = pooling.create_request("pool-check", spec)
        self.manager.writable_layer_mib(request)
        try:
            await trio.to_thread.run_sync(find_kernel, Path(self.config.kernel_store), spec.profile)
        except NotFound as exc:
            raise InvalidRequest(f"pool {name!r}: unknown profile: {exc.message}") from None
        try:
            await self.images.check(spec.image)
        except ZonedError as exc:
            raise InvalidRequest(f"pool {name!r}: {exc.message}") from None
        saved = self._saved
        changed = _Saved(
            pools={**saved.pools, name: spec}, removed=[n for n in saved.removed if n != name]
        )
        await self._save(changed)
        self.templates[name] = spec
        self.state(name).refilled()  # a changed template gets a fresh try
        self._wake.set()
        log.info("pool %s set: %s", name, spec)
        return self.info(name)

    async def remove(self, name: str, caller: Caller) -> PoolInfo:
        self._may_change(caller)
        if name not in self.templates:
            raise NotFound(f"no pool named {name!r}")
        saved = self._saved
        removed = sorted({*saved.removed, name}) if name in self.config.pools else saved.removed
        pools = {n: s for n, s in saved.pools.items() if n != name}
        await self._save(_Saved(pools=pools, removed=removed))
        info = self.info(name)
        del self.templates[name]
        self._wake.set()
        log.info("pool %s removed", name)
        return info

    def _may_change(self, caller: Caller) -> None:
        if not self.policy.sees_all(caller):
            raise PermissionDenied(
                "pools are for root and the administrators' group (admin_group in zoned.toml):"
                " their zones count against every user's capacity"
            )

    async def _save(self, saved: _Saved) -> None:
        data = msgspec.json.encode(saved)
        await trio.to_thread.run_sync(write_file_atomically, self._path, data)
        self._saved = saved

    async def _load(self) -> None:
        path = trio.Path(self._path)
        if not await path.is_file():
            return
        try:
            saved = msgspec.json.decode(await path.read_bytes(), type=_Saved)
        except (OSError, msgspec.DecodeError) as exc:
            log.error("%s cannot be read, using zoned.toml's pools only: %s", self._path, exc)
            return
        self._saved = saved
        for name in saved.removed:
            self.templates.pop(name, None)
        self.templates.update(saved.pools)

    # ------------------------------------------------------------ acquire

    async def create(
        self,
        request: CreateZone,
        caller: Caller,
        *,
        registered: Callable[[str], object] | None = None,
    ) -> ZoneInfo:
        """A zone for ``request``: a matching pool's ready zone, else a cold boot.
        ``registered`` as for :meth:`ZoneManager.create` (a hit's zone holds its
        name at once)."""
        pool = pooling.pool_for(self.templates, request, self.limits())
        if pool is None:
            return await self.manager.create(request, caller, registered=registered)
        started = time.monotonic()
        old = self.manager.take_pool_zone(pool, request.name, dict(request.labels), caller)
        self._wake.set()
        if old is None:
            self.state(pool).misses += 1
            return await self.manager.create(request, caller, registered=registered)
        if registered is not None:
            registered(old.uuid)
        self._last_hit = trio.current_time()
        zone = await self.manager.persist_acquired(request.name, old)
        self.state(pool).acquired(time.monotonic() - started)
        log.info("zone %s: taken from pool %s (was %s)", request.name, pool, old.name)
        return zone

    # ------------------------------------------------------------ refill

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every pool at its size until cancelled."""
        await self._load()
        task_status.started()
        while True:
            self._wake = trio.Event()
            await self._trim()
            await trio.sleep_until(self._last_hit + self.config.pool_refill_delay_s)
            now = time.time()
            target = self._next_to_fill(now)
            if target is not None:
                await self._fill(target)
                continue
            waits = [
                state.backoff_until
                for name, state in self.states.items()
                if name in self.templates and state.backoff_until is not None
            ]
            wait = min(waits) - now if waits else math.inf
            with trio.move_on_after(max(wait, 0.0)):
                await self._wake.wait()

    def _next_to_fill(self, now: float) -> str | None:
        for name in sorted(self.templates):
            spec = self.templates[name]
            alive = [z for z in self.manager.pool_zones(name) if z.record.state in _ALIVE_STATES]
            if len(alive) < spec.size and not self.state(name).waiting(now):
                return name
        return None

    async def _trim(self) -> None:
        """Destroy zones beyond their pool's size, of removed pools, or failed."""
        for pool in sorted(self.manager.pool_names()):
            size = self.templates[pool].size if pool in self.templates else 0
            zones = self.manager.pool_zones(pool)
            alive = [z for z in zones if z.record.state in _ALIVE_STATES]
            doomed = [z for z in zones if z.record.state not in _ALIVE_STATES]
            doomed += alive[size:][::-1]
            for zone in doomed:
                if zone.record.state == "creating":
                    continue  # its create is still running; trimmed next round
                await self.manager.destroy_pool_zone(zone.record.name)

    async def _fill(self, pool: str) -> None:
        spec = self.templates[pool]
        name = f"pool-{pool}-{secrets.token_hex(4)}"
        state = self.state(pool)
        try:
            await self.manager.create(pooling.create_request(name, spec), DAEMON, pool=pool)
        except ZonedError as exc:
            state.refill_failed(exc.message, time.time(), self.config.pool_backoff_max_s)
            log.warning(
                "pool %s: refill failed (%d in a row, next try in %.0f s): %s",
                pool,
                state.failures_in_a_row,
                pooling.backoff_s(state.failures_in_a_row, self.config.pool_backoff_max_s),
                exc.message,
            )
            await self.manager.destroy_pool_zone(name)
        else:
            state.refilled()


_ALIVE_STATES = ("creating", "booting", "ready")
