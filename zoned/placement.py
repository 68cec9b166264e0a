"""CPU and memory placement of zones: a pure, deterministic allocator.

Vocabulary: a *CPU* is a logical CPU (hardware thread); a *core* is a physical
core, the group of SMT siblings sharing (package_id, core_id).

Rules
-----

1. Reserved CPUs are never given to zones. They run the zones' emulator
   threads (QEMU's main loop and IO threads). If no reserved CPU is online,
   a zone's emulator threads run on the zone's own CPUs (exclusive) or on the
   shared pool (shared).
2. Offline CPUs are never allocated.
3. ``exclusive`` zones get whole physical cores: every thread of each core it
   takes belongs to that zone alone, even threads its vCPUs do not use
   (a 3-vCPU zone on a 2-thread host takes 2 cores and leaves one thread
   idle). A core is eligible only if all its threads are online and none is
   reserved. Each vCPU is pinned to one host thread, filling cores in order so
   that consecutive vCPUs are SMT siblings on the host.
4. An exclusive zone's cores and memory come from one NUMA node: among the
   nodes with enough free whole cores and free memory, the one with the most
   free memory (lowest id on a tie). A zone that fits on no single node is
   refused with ``NoCapacity``; it is never split across nodes, because a
   guest without a virtual NUMA topology cannot know half its memory is remote
   and would run unpredictably slower. Cores are taken lowest CPU id first.
5. The *shared pool* is every online CPU that is neither reserved nor owned by
   an exclusive zone. ``shared`` zones float over the whole pool: every vCPU
   may run on any pool CPU. A shared zone may not have more vCPUs than the
   pool has CPUs, and that stays true: an exclusive allocation is refused if it
   would leave the pool smaller than the largest shared zone (in particular,
   the pool is never emptied while a shared zone exists).
6. Memory is admitted per node: the node's memory, minus its share of the
   reserved memory (split in proportion to node size), minus what is
   allocated on it. Exclusive zones' memory is bound to their cores' node;
   shared zones' memory to the node (with CPUs) that has the most free memory,
   reported as ``numa_node=None`` on a single-node host.
7. A refused request changes nothing. ``allocate`` for a zone that already has
   a placement raises ``Conflict``; ``release`` of an unknown zone raises
   ``NotFound``.
8. ``adopt`` records what a restarted daemon found running and never refuses
   for lack of capacity; the resulting overcommitment (a core owned twice,
   memory over a node's capacity, ...) is listed in ``snapshot().warnings``.
   New allocations never use anything an adopted zone owns.
9. The shared pool changes as exclusive zones come and go and CPUs go on and
   offline, so a shared zone's placement is computed when asked for. After any
   change the shell re-pins shared zones to ``placement(zone)``. Exclusive
   pinning never moves: after a CPU of an exclusive zone goes offline the
   placement still names it, the zone keeps the core, and the caller decides
   what to do (``update_topology`` says which zones were hit).

Placements describe pinning per vCPU: ``vcpu_cpus[i]`` is the host cpuset of
vCPU ``i`` (one CPU for exclusive zones, the shared pool for shared zones),
which maps one-to-one onto libvirt's ``<vcpupin vcpu='i' cpuset='...'/>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import get_args

from zoned.errors import (
    ConfigError,
    Conflict,
    InternalError,
    InvalidRequest,
    NoCapacity,
    NotFound,
)
from zoned.protocol import Placement as Policy
from zoned.topology import HostTopology, format_cpulist

POLICIES: tuple[Policy, ...] = get_args(Policy)


@dataclass(frozen=True)
class Placement:
    """Where one zone runs.

    ``vcpu_cpus[i]`` is the host cpuset vCPU ``i`` is pinned to;
    ``emulator_cpus`` the cpuset of QEMU's non-vCPU threads; ``numa_node`` the
    node the zone's memory is bound to (``None``: not bound, single-node host).
    """

    zone: str
    policy: Policy
    vcpu_cpus: tuple[tuple[int, ...], ...]
    emulator_cpus: tuple[int, ...]
    numa_node: int | None
    memory_mib: int

    @property
    def vcpus(self) -> int:
        return len(self.vcpu_cpus)

    @property
    def cpus(self) -> tuple[int, ...]:
        """Every host CPU any vCPU may run on."""
        return tuple(sorted({cpu for cpus in self.vcpu_cpus for cpu in cpus}))


@dataclass(frozen=True)
class NodeMemory:
    total_mib: int
    reserved_mib: int
    allocated_mib: int
    free_mib: int  # never negative; overcommitment shows in the warnings


@dataclass(frozen=True)
class HostSnapshot:
    """The allocator's state for host info; equal snapshots mean equal state."""

    online_cpus: tuple[int, ...]
    offline_cpus: tuple[int, ...]
    reserved_cpus: tuple[int, ...]
    # Threads of whole free cores an exclusive zone could take now.
    free_exclusive_cpus: tuple[int, ...]
    shared_pool: tuple[int, ...]
    # Every CPU of the host -> the exclusive zones owning it (normally 0 or 1).
    cpu_owners: dict[int, tuple[str, ...]]
    exclusive_zones: tuple[str, ...]
    shared_zones: tuple[str, ...]
    memory: dict[int, NodeMemory]
    memory_free_mib: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def cpu_owner(self) -> dict[int, str]:
        """Exclusively owned CPUs -> owning zone (the first, if an adoption doubled it)."""
        return {cpu: names[0] for cpu, names in self.cpu_owners.items() if names}


@dataclass(frozen=True)
class _Zone:
    name: str
    policy: Policy
    vcpus: int
    memory_mib: int
    numa_node: int | None  # as placed / adopted
    memory_node: int  # the node whose memory admission it counts against
    # Exclusive zones only: fixed pinning and every thread of every core owned.
    pinning: tuple[tuple[int, ...], ...] = ()
    owned: frozenset[int] = frozenset()


class Allocator:
    """Places zones on a host; see the module docstring for the rules.

    Raises :class:`~zoned.errors.ConfigError` if a reserved CPU is not in the
    topology or the reserved memory is negative.
    """

    def __init__(
        self,
        topology: HostTopology,
        reserved_cpus: Iterable[int] = (),
        reserved_memory_mib: int = 0,
    ) -> None:
        reserved = frozenset(reserved_cpus)
        unknown = reserved - set(topology.cpu_ids)
        if unknown:
            raise ConfigError(
                f"reserved CPUs {format_cpulist(unknown)} do not exist on this host"
                f" (CPUs: {format_cpulist(topology.cpu_ids)})"
            )
        if reserved_memory_mib < 0:
            raise ConfigError(f"reserved memory must not be negative: {reserved_memory_mib}")
        self._topology = topology
        self._reserved = reserved
        self._reserved_memory_mib = reserved_memory_mib
        self._zones: dict[str, _Zone] = {}

    # -- queries ------------------------------------------------------------

    @property
    def topology(self) -> HostTopology:
        return self._topology

    def __contains__(self, zone: object) -> bool:
        return zone in self._zones

    def placement(self, zone: str) -> Placement:
        """The zone's current placement (shared zones: over the current pool)."""
        record = self._zones.get(zone)
        if record is None:
            raise NotFound(f"zone {zone!r} has no placement")
        return self._render(record)

    def placements(self) -> dict[str, Placement]:
        return {name: self._render(z) for name, z in sorted(self._zones.items())}

    def shared_pool(self) -> tuple[int, ...]:
        owned = self._owned_cpus()
        return tuple(
            cpu.id
            for cpu in self._topology.cpus
            if cpu.online and cpu.id not in self._reserved and cpu.id not in owned
        )

    def snapshot(self) -> HostSnapshot:
        topo = self._topology
        owners: dict[int, list[str]] = {cpu: [] for cpu in topo.cpu_ids}
        for record in self._sorted_zones("exclusive"):
            for cpu in sorted(record.owned):
                owners.setdefault(cpu, []).append(record.name)
        memory = {node.id: self._node_memory(node.id) for node in topo.nodes}
        return HostSnapshot(
            online_cpus=topo.online_cpus(),
            offline_cpus=topo.offline_cpus(),
            reserved_cpus=tuple(sorted(self._reserved)),
            free_exclusive_cpus=tuple(sorted(cpu for group in self._free_cores() for cpu in group)),
            shared_pool=self.shared_pool(),
            cpu_owners={cpu: tuple(names) for cpu, names in sorted(owners.items())},
            exclusive_zones=tuple(z.name for z in self._sorted_zones("exclusive")),
            shared_zones=tuple(z.name for z in self._sorted_zones("shared")),
            memory=memory,
            memory_free_mib=sum(m.free_mib for m in memory.values()),
            warnings=self._warnings(),
        )

    # -- changes ------------------------------------------------------------

    def allocate(self, zone: str, vcpus: int, memory_mib: int, policy: Policy) -> Placement:
        """Place a new zone or raise ``NoCapacity`` (nothing changes then)."""
        if zone in self._zones:
            raise Conflict(f"zone {zone!r} already has a placement")
        if policy not in POLICIES:
            raise InvalidRequest(f"unknown placement policy {policy!r}; use one of {POLICIES}")
        if vcpus < 1:
            raise InvalidRequest(f"a zone needs at least one vCPU, got {vcpus}")
        if memory_mib < 1:
            raise InvalidRequest(f"a zone needs memory, got {memory_mib} MiB")
        if policy == "exclusive":
            record = self._place_exclusive(zone, vcpus, memory_mib)
        else:
            record = self._place_shared(zone, vcpus, memory_mib)
        self._zones[zone] = record
        return self._render(record)

    def release(self, zone: str) -> None:
        if self._zones.pop(zone, None) is None:
            raise NotFound(f"zone {zone!r} has no placement to release")

    def rename(self, zone: str, new_name: str) -> None:
        """The placement of ``zone`` is ``new_name``'s now (a pool zone acquired)."""
        if new_name in self._zones:
            raise Conflict(f"zone {new_name!r} already has a placement")
        record = self._zones.pop(zone, None)
        if record is None:
            raise NotFound(f"zone {zone!r} has no placement to rename")
        self._zones[new_name] = replace(record, name=new_name)

    def adopt(self, placement: Placement) -> None:
        """Record the placement of a zone found running; never refused for capacity."""
        if placement.zone in self._zones:
            raise Conflict(f"zone {placement.zone!r} already has a placement")
        if placement.policy not in POLICIES:
            raise InternalError(f"unknown placement policy {placement.policy!r}")
        if not placement.vcpu_cpus or not all(placement.vcpu_cpus):
            raise InternalError(f"placement of zone {placement.zone!r} pins no CPUs for a vCPU")
        node_ids = {node.id for node in self._topology.nodes}
        if placement.numa_node in node_ids:
            memory_node = placement.numa_node
        else:
            # Unbound (or bound to a node that is gone): count it where it hurts least.
            memory_node = self._nodes_by_free_memory()[0]
        record = _Zone(
            name=placement.zone,
            policy=placement.policy,
            vcpus=placement.vcpus,
            memory_mib=placement.memory_mib,
            numa_node=placement.numa_node,
            memory_node=memory_node,
        )
        if placement.policy == "exclusive":
            pinned = {cpu for cpus in placement.vcpu_cpus for cpu in cpus}
            record = replace(record, pinning=placement.vcpu_cpus, owned=self._whole_cores(pinned))
        self._zones[placement.zone] = record

    def update_topology(self, topology: HostTopology) -> list[str]:
        """Switch to a new topology (CPUs on/offline); return the zones hit, sorted.

        A zone is hit when a CPU that was online and that it used goes offline
        (or disappears): a CPU it owns (exclusive), a shared-pool CPU (shared),
        or an online reserved CPU (every zone: emulator threads). Core ids the
        new topology cannot see (offline CPUs) are kept from the old one.
        """
        topology = topology.fill_unknown_from(self._topology)
        gone = set(self._topology.online_cpus()) - set(topology.online_cpus())
        old_pool = set(self.shared_pool())
        hit: set[str] = set()
        if gone & self._reserved:
            hit.update(self._zones)
        for record in self._zones.values():
            if record.policy == "exclusive" and gone & record.owned:
                hit.add(record.name)
            if record.policy == "shared" and gone & old_pool:
                hit.add(record.name)
        self._topology = topology
        # Siblings learned only now (a CPU that was offline at start) join their core's owner.
        for name, record in list(self._zones.items()):
            if record.policy == "exclusive":
                owned = self._whole_cores(record.owned)
                if owned != record.owned:
                    self._zones[name] = replace(record, owned=owned)
        return sorted(hit)

    # -- placing ---------------------------------------------------------------

    def _place_exclusive(self, zone: str, vcpus: int, memory_mib: int) -> _Zone:
        free_cores = self._free_cores()
        pool_size = len(self.shared_pool())
        shared = self._sorted_zones("shared")
        largest_shared = max((z.vcpus for z in shared), default=0)
        reasons: list[str] = []
        for node_id in self._nodes_by_free_memory():
            free_mib = self._node_memory(node_id).free_mib
            cores = [g for g in free_cores if self._topology.node_of(g[0]) == node_id]
            threads = sum(len(g) for g in cores)
            summary = f"node {node_id}: {len(cores)} free cores ({threads} threads), {free_mib} MiB"
            if free_mib < memory_mib or threads < vcpus:
                reasons.append(summary)
                continue
            chosen: list[tuple[int, ...]] = []
            for core in cores:
                if sum(len(g) for g in chosen) >= vcpus:
                    break
                chosen.append(core)
            taken = sum(len(g) for g in chosen)
            if pool_size - taken < largest_shared:
                biggest = max(shared, key=lambda z: z.vcpus).name
                reasons.append(
                    f"{summary}, but taking {taken} threads would leave the shared pool"
                    f" {pool_size - taken} CPUs, fewer than shared zone {biggest!r}'s"
                    f" {largest_shared} vCPUs"
                )
                continue
            threads_in_order = [cpu for core in chosen for cpu in core]
            return _Zone(
                name=zone,
                policy="exclusive",
                vcpus=vcpus,
                memory_mib=memory_mib,
                numa_node=node_id,
                memory_node=node_id,
                pinning=tuple((cpu,) for cpu in threads_in_order[:vcpus]),
                owned=frozenset(threads_in_order),
            )
        raise NoCapacity(
            f"zone {zone!r} needs {vcpus} exclusive vCPUs (whole cores) and {memory_mib} MiB"
            f" on one NUMA node; free: {'; '.join(reasons)}"
        )

    def _place_shared(self, zone: str, vcpus: int, memory_mib: int) -> _Zone:
        pool = self.shared_pool()
        if vcpus > len(pool):
            raise NoCapacity(
                f"zone {zone!r} needs {vcpus} shared vCPUs but the shared pool has"
                f" {len(pool)} CPUs ({format_cpulist(pool) or 'none'})"
            )
        nodes = [n for n in self._nodes_by_free_memory() if self._topology.node(n).cpus]
        best = nodes[0]
        free_mib = self._node_memory(best).free_mib
        if free_mib < memory_mib:
            free = ", ".join(f"node {n}: {self._node_memory(n).free_mib} MiB" for n in nodes)
            raise NoCapacity(f"zone {zone!r} needs {memory_mib} MiB on one NUMA node; free: {free}")
        single = len(self._topology.nodes) == 1
        return _Zone(
            name=zone,
            policy="shared",
            vcpus=vcpus,
            memory_mib=memory_mib,
            numa_node=None if single else best,
            memory_node=best,
        )

    # -- internals --------------------------------------------------------------

    def _render(self, record: _Zone) -> Placement:
        online = set(self._topology.online_cpus())
        reserved_online = tuple(sorted(self._reserved & online))
        if record.policy == "exclusive":
            own = tuple(sorted(record.owned & online)) or tuple(sorted(record.owned))
            return Placement(
                zone=record.name,
                policy="exclusive",
                vcpu_cpus=record.pinning,
                emulator_cpus=reserved_online or own,
                numa_node=record.numa_node,
                memory_mib=record.memory_mib,
            )
        # Degraded states (pool emptied by hotplug or adoption) still need a valid cpuset.
        pool = (
            self.shared_pool()
            or tuple(sorted(online - self._reserved))
            or tuple(sorted(online))
            or self._topology.cpu_ids
        )
        return Placement(
            zone=record.name,
            policy="shared",
            vcpu_cpus=(pool,) * record.vcpus,
            emulator_cpus=reserved_online or pool,
            numa_node=record.numa_node,
            memory_mib=record.memory_mib,
        )

    def _sorted_zones(self, policy: Policy) -> list[_Zone]:
        return [z for _, z in sorted(self._zones.items()) if z.policy == policy]

    def _owned_cpus(self) -> set[int]:
        return {cpu for z in self._zones.values() for cpu in z.owned}

    def _whole_cores(self, cpus: Iterable[int]) -> frozenset[int]:
        """``cpus`` widened to every thread of their cores (unknown ids kept as they are)."""
        wanted = set(cpus)
        widened = set(wanted)
        for group in self._topology.sibling_groups():
            if wanted.intersection(group):
                widened.update(group)
        return frozenset(widened)

    def _free_cores(self) -> list[tuple[int, ...]]:
        """Cores an exclusive zone may take: all threads online, unreserved, unowned."""
        owned = self._owned_cpus()
        online = set(self._topology.online_cpus())
        return [
            group
            for group in self._topology.sibling_groups()
            if all(
                cpu in online and cpu not in self._reserved and cpu not in owned for cpu in group
            )
        ]

    def _reserved_share(self) -> dict[int, int]:
        """Reserved memory split over nodes in proportion to their size, summing exactly."""
        nodes = self._topology.nodes
        total = sum(n.memory_mib for n in nodes)
        if total == 0:
            return {n.id: 0 for n in nodes}
        shares = {n.id: self._reserved_memory_mib * n.memory_mib // total for n in nodes}
        biggest = max(nodes, key=lambda n: (n.memory_mib, -n.id)).id
        shares[biggest] += self._reserved_memory_mib - sum(shares.values())
        return shares

    def _node_memory(self, node_id: int) -> NodeMemory:
        total = self._topology.node(node_id).memory_mib
        reserved = self._reserved_share()[node_id]
        allocated = sum(z.memory_mib for z in self._zones.values() if z.memory_node == node_id)
        return NodeMemory(
            total_mib=total,
            reserved_mib=reserved,
            allocated_mib=allocated,
            free_mib=max(0, total - reserved - allocated),
        )

    def _nodes_by_free_memory(self) -> list[int]:
        nodes = [n.id for n in self._topology.nodes]
        return sorted(nodes, key=lambda n: (-self._node_memory(n).free_mib, n))

    def _warnings(self) -> tuple[str, ...]:
        """Overcommitment left by adoption or CPU hotplug, in a stable order."""
        warnings: list[str] = []
        online = set(self._topology.online_cpus())
        owners: dict[int, list[str]] = {}
        for record in self._sorted_zones("exclusive"):
            for cpu in sorted(record.owned):
                owners.setdefault(cpu, []).append(record.name)
        for cpu, names in sorted(owners.items()):
            if len(names) > 1:
                warnings.append(f"CPU {cpu} is owned by several exclusive zones: {names}")
            if cpu in self._reserved:
                warnings.append(f"reserved CPU {cpu} is owned by exclusive zone(s) {names}")
            if cpu not in self._topology.cpu_ids:
                warnings.append(f"CPU {cpu} of exclusive zone(s) {names} is not on this host")
            elif cpu not in online:
                warnings.append(f"CPU {cpu} of exclusive zone(s) {names} is offline")
        pool = len(self.shared_pool())
        for record in self._sorted_zones("shared"):
            if record.vcpus > pool:
                warnings.append(
                    f"shared zone {record.name!r} has {record.vcpus} vCPUs but the shared pool"
                    f" has {pool} CPUs"
                )
        for node in self._topology.nodes:
            memory = self._node_memory(node.id)
            capacity = memory.total_mib - memory.reserved_mib
            if memory.allocated_mib > capacity:
                warnings.append(
                    f"node {node.id} memory overcommitted: {memory.allocated_mib} MiB allocated,"
                    f" {capacity} MiB available to zones"
                )
        return tuple(warnings)
