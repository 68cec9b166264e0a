"""The placement allocator on recorded topologies: rules, refusals, adoption, hotplug."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoned import errors
from zoned.errors import Conflict, InvalidRequest, NoCapacity, NotFound
from zoned.placement import Allocator, Placement
from zoned.protocol import Placement as Policy
from zoned.topology import HostTopology

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "topologies"


def load(name: str) -> HostTopology:
    return HostTopology.from_json((FIXTURES / f"{name}.json").read_bytes())


@pytest.fixture
def two_socket() -> HostTopology:
    return load("two_socket_smt")


@pytest.fixture
def laptop() -> HostTopology:
    return load("laptop")


@pytest.fixture
def this_host() -> HostTopology:
    return load("this_host")


# -- exclusive ----------------------------------------------------------------------


def test_exclusive_takes_sibling_pairs(two_socket: HostTopology) -> None:
    alloc = Allocator(two_socket)
    p = alloc.allocate("a", 4, 1024, "exclusive")
    assert p == Placement(
        zone="a",
        policy="exclusive",
        vcpu_cpus=((0,), (16,), (1,), (17,)),
        emulator_cpus=(0, 1, 16, 17),
        numa_node=0,
        memory_mib=1024,
    )
    assert p.vcpus == 4
    assert p.cpus == (0, 1, 16, 17)
    snap = alloc.snapshot()
    assert snap.cpu_owners[16] == ("a",)
    assert snap.cpu_owner == dict.fromkeys((0, 1, 16, 17), "a")
    assert not set(p.cpus) & set(snap.shared_pool)
    assert not set(p.cpus) & set(snap.free_exclusive_cpus)


def test_exclusive_odd_vcpus_own_the_whole_last_core(laptop: HostTopology) -> None:
    alloc = Allocator(laptop)
    p = alloc.allocate("a", 3, 512, "exclusive")
    assert p.vcpu_cpus == ((0,), (4,), (1,))
    snap = alloc.snapshot()
    assert snap.cpu_owners[5] == ("a",)  # idle sibling still belongs to the zone
    assert snap.shared_pool == (2, 3, 6, 7)
    assert p.emulator_cpus == (0, 1, 4, 5)


def test_exclusive_zones_never_share_a_core(laptop: HostTopology) -> None:
    alloc = Allocator(laptop)
    a = alloc.allocate("a", 1, 512, "exclusive")
    b = alloc.allocate("b", 1, 512, "exclusive")
    assert a.vcpu_cpus == ((0,),)
    assert b.vcpu_cpus == ((1,),)  # not cpu 4, a's sibling
    assert alloc.snapshot().shared_pool == (2, 3, 6, 7)


def test_exhausted_cpus_refused_and_nothing_changes(laptop: HostTopology) -> None:
    alloc = Allocator(laptop)
    alloc.allocate("a", 6, 1024, "exclusive")
    before = alloc.snapshot()
    with pytest.raises(NoCapacity) as excinfo:
        alloc.allocate("b", 4, 1024, "exclusive")
    message = excinfo.value.message
    assert "'b' needs 4 exclusive vCPUs" in message
    assert "1024 MiB" in message
    assert "node 0: 1 free cores (2 threads)" in message
    assert alloc.snapshot() == before
    assert "b" not in alloc
    # What is left still fits.
    assert alloc.allocate("b", 2, 1024, "exclusive").vcpu_cpus == ((3,), (7,))


def test_exhausted_memory_refused_and_nothing_changes(laptop: HostTopology) -> None:
    alloc = Allocator(laptop, reserved_memory_mib=1024)
    alloc.allocate("a", 1, 15000, "shared")
    before = alloc.snapshot()
    assert before.memory[0].free_mib == 16384 - 1024 - 15000
    with pytest.raises(NoCapacity, match=r"needs 500 MiB on one NUMA node; free: node 0: 360 MiB"):
        alloc.allocate("b", 1, 500, "shared")
    with pytest.raises(NoCapacity, match=r"node 0: 4 free cores \(8 threads\), 360 MiB"):
        alloc.allocate("b", 1, 500, "exclusive")
    assert alloc.snapshot() == before


def test_release_restores(two_socket: HostTopology) -> None:
    alloc = Allocator(two_socket, reserved_cpus=[0, 16], reserved_memory_mib=2048)
    initial = alloc.snapshot()
    alloc.allocate("a", 4, 4096, "exclusive")
    alloc.allocate("b", 2, 2048, "shared")
    alloc.allocate("c", 16, 60000, "exclusive")
    assert alloc.snapshot() != initial
    for zone in ("b", "a", "c"):
        alloc.release(zone)
    assert alloc.snapshot() == initial
    assert alloc.placements() == {}


def test_release_unknown_zone_is_not_found(laptop: HostTopology) -> None:
    with pytest.raises(NotFound, match="'ghost'"):
        Allocator(laptop).release("ghost")


def test_allocate_twice_is_a_conflict(laptop: HostTopology) -> None:
    alloc = Allocator(laptop)
    alloc.allocate("a", 1, 64, "shared")
    before = alloc.snapshot()
    with pytest.raises(Conflict, match="'a' already has a placement"):
        alloc.allocate("a", 1, 64, "exclusive")
    assert alloc.snapshot() == before


@pytest.mark.parametrize(
    ("vcpus", "memory", "policy", "match"),
    [
        (0, 64, "shared", "at least one vCPU"),
        (1, 0, "exclusive", "needs memory"),
        (1, 64, "dedicated", "unknown placement policy"),
    ],
)
def test_invalid_requests(
    laptop: HostTopology, vcpus: int, memory: int, policy: Policy, match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match):
        Allocator(laptop).allocate("a", vcpus, memory, policy)


# -- shared ---------------------------------------------------------------------


def test_shared_pool_shrinks_with_exclusive_zones(laptop: HostTopology) -> None:
    alloc = Allocator(laptop)
    s = alloc.allocate("s", 2, 512, "shared")
    assert s.vcpu_cpus == (tuple(range(8)),) * 2
    assert s.emulator_cpus == tuple(range(8))
    assert s.numa_node is None
    alloc.allocate("x", 2, 512, "exclusive")
    assert alloc.snapshot().shared_pool == (1, 2, 3, 5, 6, 7)
    # A shared zone's placement follows the pool: the shell re-pins it.
    assert alloc.placement("s").vcpu_cpus == ((1, 2, 3, 5, 6, 7),) * 2
    alloc.release("x")
    assert alloc.placement("s").vcpu_cpus == (tuple(range(8)),) * 2


def test_shared_vcpus_may_not_exceed_the_pool(laptop: HostTopology) -> None:
    alloc = Allocator(laptop)
    alloc.allocate("x", 6, 512, "exclusive")
    before = alloc.snapshot()
    with pytest.raises(
        NoCapacity, match=r"needs 3 shared vCPUs but the shared pool has 2 CPUs \(3,7\)"
    ):
        alloc.allocate("s", 3, 512, "shared")
    assert alloc.snapshot() == before
    assert alloc.allocate("s", 2, 512, "shared").vcpu_cpus == ((3, 7), (3, 7))


def test_exclusive_keeps_the_pool_big_enough_for_shared_zones(laptop: HostTopology) -> None:
    alloc = Allocator(laptop)
    alloc.allocate("s", 4, 512, "shared")
    alloc.allocate("x", 4, 512, "exclusive")  # pool 8 -> 4, still fits s
    before = alloc.snapshot()
    with pytest.raises(NoCapacity, match="fewer than shared zone 's''s 4 vCPUs"):
        alloc.allocate("y", 1, 512, "exclusive")
    assert alloc.snapshot() == before
    alloc.release("s")
    assert alloc.allocate("y", 4, 512, "exclusive").vcpu_cpus == ((2,), (6,), (3,), (7,))


def test_this_host_never_empties_the_pool_under_a_shared_zone(this_host: HostTopology) -> None:
    alloc = Allocator(this_host)
    n = len(this_host.cpus)
    alloc.allocate("s", 1, 256, "shared")
    alloc.allocate("x", n - 1, 256, "exclusive")
    assert len(alloc.snapshot().shared_pool) == 1
    with pytest.raises(NoCapacity, match="shared pool 0 CPUs"):
        alloc.allocate("y", 1, 256, "exclusive")
    alloc.release("s")
    alloc.allocate("y", 1, 256, "exclusive")
    assert alloc.snapshot().shared_pool == ()
    with pytest.raises(NoCapacity, match="shared pool has 0 CPUs"):
        alloc.allocate("s", 1, 256, "shared")


# -- NUMA -----------------------------------------------------------------------


def test_exclusive_stays_on_one_node(two_socket: HostTopology) -> None:
    alloc = Allocator(two_socket)
    a = alloc.allocate("a", 16, 8192, "exclusive")
    assert a.numa_node == 0
    assert set(a.cpus) == set(two_socket.node(0).cpus)
    # Node 1 now has the most free memory.
    b = alloc.allocate("b", 2, 8192, "exclusive")
    assert b.numa_node == 1
    assert all(two_socket.node_of(c) == 1 for c in b.cpus)


def test_exclusive_is_never_split_across_nodes(two_socket: HostTopology) -> None:
    alloc = Allocator(two_socket)
    with pytest.raises(NoCapacity) as excinfo:
        alloc.allocate("big", 17, 1024, "exclusive")
    assert "on one NUMA node" in excinfo.value.message
    assert "node 0: 8 free cores (16 threads), 65536 MiB" in excinfo.value.message
    assert "node 1: 8 free cores (16 threads), 65536 MiB" in excinfo.value.message
    alloc.allocate("a", 2, 1024, "exclusive")  # node 0
    alloc.allocate("b", 2, 1024, "exclusive")  # node 1 (more free memory)
    with pytest.raises(NoCapacity):
        alloc.allocate("c", 16, 1024, "exclusive")  # 30 threads free, 14 per node


def test_exclusive_goes_where_cores_and_memory_both_fit(two_socket: HostTopology) -> None:
    alloc = Allocator(two_socket)
    alloc.allocate("mem", 1, 60000, "shared")  # node 0 (tie, lowest id): 5536 MiB left
    assert alloc.placement("mem").numa_node == 0
    alloc.allocate("cpu", 16, 1000, "exclusive")  # node 1 has the most free memory
    assert alloc.placement("cpu").numa_node == 1
    # Node 1 has no cores left and node 0 too little memory: refused.
    with pytest.raises(NoCapacity) as excinfo:
        alloc.allocate("x", 2, 6000, "exclusive")
    assert "node 1: 0 free cores (0 threads), 64536 MiB" in excinfo.value.message
    assert "node 0: 8 free cores (16 threads), 5536 MiB" in excinfo.value.message
    x = alloc.allocate("x", 2, 5000, "exclusive")
    assert x.numa_node == 0


def test_shared_memory_goes_to_the_node_with_most_free(two_socket: HostTopology) -> None:
    alloc = Allocator(two_socket)
    assert alloc.allocate("a", 2, 4096, "shared").numa_node == 0
    assert alloc.allocate("b", 2, 1024, "shared").numa_node == 1
    assert alloc.allocate("c", 2, 1024, "shared").numa_node == 1
    mem = alloc.snapshot().memory
    assert (mem[0].allocated_mib, mem[1].allocated_mib) == (4096, 2048)
    # Shared vCPUs still float over both nodes.
    assert alloc.placement("b").vcpu_cpus[0] == tuple(range(32))


def test_reserved_memory_is_split_by_node_size(two_socket: HostTopology) -> None:
    snap = Allocator(two_socket, reserved_memory_mib=3001).snapshot()
    assert snap.memory[0].reserved_mib + snap.memory[1].reserved_mib == 3001
    assert snap.memory_free_mib == 128 * 1024 - 3001


# -- reserved CPUs ------------------------------------------------------------------


def test_reserved_cpus_run_emulators_and_are_never_given(laptop: HostTopology) -> None:
    alloc = Allocator(laptop, reserved_cpus=[0, 4])
    x = alloc.allocate("x", 2, 256, "exclusive")
    s = alloc.allocate("s", 4, 256, "shared")
    assert x.vcpu_cpus == ((1,), (5,))
    assert x.emulator_cpus == (0, 4)
    assert s.vcpu_cpus[0] == (2, 3, 6, 7)
    assert s.emulator_cpus == (0, 4)
    snap = alloc.snapshot()
    assert snap.reserved_cpus == (0, 4)
    assert snap.cpu_owners[0] == ()


def test_a_core_with_a_reserved_thread_is_not_exclusive(laptop: HostTopology) -> None:
    alloc = Allocator(laptop, reserved_cpus=[0])
    snap = alloc.snapshot()
    assert 4 not in snap.free_exclusive_cpus
    assert 4 in snap.shared_pool
    with pytest.raises(NoCapacity, match="3 free cores"):
        alloc.allocate("x", 7, 256, "exclusive")


def test_unknown_reserved_cpu_is_rejected(laptop: HostTopology) -> None:
    with pytest.raises(errors.ConfigError, match="reserved CPUs 8-9 do not exist"):
        Allocator(laptop, reserved_cpus=[8, 9])
    with pytest.raises(errors.ConfigError, match="reserved memory"):
        Allocator(laptop, reserved_memory_mib=-1)


# -- adopt ----------------------------------------------------------------------


def test_adopt_records_and_new_zones_avoid_it(laptop: HostTopology) -> None:
    before = Allocator(laptop)
    running = before.allocate("a", 2, 2048, "exclusive")
    shared = before.allocate("s", 2, 1024, "shared")

    restarted = Allocator(laptop)
    restarted.adopt(running)
    restarted.adopt(shared)
    assert restarted.snapshot() == before.snapshot()
    assert restarted.placement("a") == running
    assert restarted.allocate("b", 2, 512, "exclusive").vcpu_cpus == ((1,), (5,))
    with pytest.raises(Conflict):
        restarted.adopt(running)


def test_adopt_accepts_oversubscription_and_warns(laptop: HostTopology) -> None:
    alloc = Allocator(laptop, reserved_cpus=[3], reserved_memory_mib=1024)
    alloc.allocate("a", 2, 8000, "exclusive")  # core (0, 4)
    clash = Placement("old", "exclusive", ((4,), (2,)), (4, 2), None, 8000)
    alloc.adopt(clash)
    alloc.adopt(Placement("greedy", "shared", ((0, 1, 2, 3, 4, 5, 6, 7),) * 9, (0,), None, 64))
    alloc.adopt(Placement("rsv", "exclusive", ((3,),), (3,), 0, 64))
    snap = alloc.snapshot()
    assert snap.cpu_owners[4] == ("a", "old")
    assert snap.cpu_owners[6] == ("old",)  # whole core of the pinned thread 2
    assert snap.cpu_owners[7] == ("rsv",)
    assert snap.shared_pool == (1, 5)
    assert snap.memory[0].allocated_mib == 16128
    assert snap.memory[0].free_mib == 0
    joined = "\n".join(snap.warnings)
    assert "CPU 4 is owned by several exclusive zones: ['a', 'old']" in joined
    assert "reserved CPU 3 is owned by exclusive zone(s) ['rsv']" in joined
    assert "shared zone 'greedy' has 9 vCPUs but the shared pool has 2 CPUs" in joined
    assert "node 0 memory overcommitted: 16128 MiB allocated, 15360 MiB" in joined
    # Nothing new fits until it is released; then everything is clean again.
    with pytest.raises(NoCapacity):
        alloc.allocate("new", 1, 64, "exclusive")
    for zone in ("old", "greedy", "rsv"):
        alloc.release(zone)
    assert alloc.snapshot().warnings == ()


def test_adopt_unbound_shared_on_multi_node_counts_somewhere(two_socket: HostTopology) -> None:
    alloc = Allocator(two_socket)
    alloc.allocate("a", 1, 10000, "shared")  # node 0
    alloc.adopt(Placement("old", "shared", ((1, 2),), (1, 2), None, 5000))
    alloc.adopt(Placement("gone", "exclusive", ((8,),), (8,), 7, 100))
    assert alloc.placement("old").numa_node is None
    assert alloc.placement("gone").numa_node == 7
    mem = alloc.snapshot().memory
    assert mem[1].allocated_mib == 5100  # both counted on the node with most free memory


def test_adopt_rejects_placements_without_cpus(laptop: HostTopology) -> None:
    with pytest.raises(errors.InternalError, match="pins no CPUs"):
        Allocator(laptop).adopt(Placement("a", "shared", ((),), (), None, 64))
    with pytest.raises(errors.InternalError, match="pins no CPUs"):
        Allocator(laptop).adopt(Placement("a", "shared", (), (), None, 64))


# -- CPU hotplug ------------------------------------------------------------------


def test_offline_cpus_are_never_allocated(laptop: HostTopology) -> None:
    alloc = Allocator(laptop.with_cpu_online(4, False).with_cpu_online(2, False))
    snap = alloc.snapshot()
    assert snap.offline_cpus == (2, 4)
    assert snap.shared_pool == (0, 1, 3, 5, 6, 7)
    assert snap.free_exclusive_cpus == (1, 3, 5, 7)  # cores (0,4) and (2,6) are partial
    x = alloc.allocate("x", 4, 256, "exclusive")
    assert x.cpus == (1, 3, 5, 7)
    with pytest.raises(NoCapacity, match="0 free cores"):
        alloc.allocate("y", 1, 256, "exclusive")
    s = alloc.allocate("s", 2, 256, "shared")
    assert s.vcpu_cpus[0] == (0, 6)


def test_update_topology_reports_zones_hit_by_offline(laptop: HostTopology) -> None:
    alloc = Allocator(laptop, reserved_cpus=[3, 7])
    alloc.allocate("a", 2, 256, "exclusive")  # (0, 4)
    alloc.allocate("b", 2, 256, "exclusive")  # (1, 5)
    alloc.allocate("s", 1, 256, "shared")  # pool (2, 6)

    assert alloc.update_topology(laptop.with_cpu_online(5, False)) == ["b"]
    assert alloc.placement("b").vcpu_cpus == ((1,), (5,))  # pinning does not move
    assert alloc.snapshot().cpu_owners[5] == ("b",)  # the core stays b's
    assert "CPU 5 of exclusive zone(s) ['b'] is offline" in alloc.snapshot().warnings

    topo = laptop.with_cpu_online(5, False).with_cpu_online(6, False)
    assert alloc.update_topology(topo) == ["s"]
    assert alloc.placement("s").vcpu_cpus == ((2,),)

    topo = topo.with_cpu_online(7, False)
    assert alloc.update_topology(topo) == ["a", "b", "s"]  # emulator CPU gone
    assert alloc.placement("a").emulator_cpus == (3,)

    # Coming back online hits nobody; the core is still b's, not the pool's.
    assert alloc.update_topology(laptop) == []
    snap = alloc.snapshot()
    assert snap.cpu_owners[5] == ("b",)
    assert snap.shared_pool == (2, 6)
    assert snap.warnings == ()


def test_emulators_fall_back_when_reserved_cpus_are_offline(laptop: HostTopology) -> None:
    alloc = Allocator(laptop, reserved_cpus=[3])
    alloc.allocate("a", 2, 256, "exclusive")
    alloc.allocate("s", 1, 256, "shared")
    assert alloc.update_topology(laptop.with_cpu_online(3, False)) == ["a", "s"]
    assert alloc.placement("a").emulator_cpus == (0, 4)
    assert alloc.placement("s").emulator_cpus == (1, 2, 5, 6, 7)


def test_sibling_learned_at_online_joins_its_owner(laptop: HostTopology) -> None:
    # Started with cpu 5 offline and its core unknown (no topology/ directory).
    unknown = laptop.with_cpu_online(5, False)
    cpus = tuple(c if c.id != 5 else type(c)(5, None, None, c.node, False) for c in unknown.cpus)
    start = HostTopology(cpus, unknown.nodes, unknown.memory_total_mib)
    alloc = Allocator(start)
    alloc.allocate("a", 2, 256, "exclusive")  # core (0, 4)
    b = alloc.allocate("b", 1, 256, "exclusive")
    assert b.cpus == (1,)  # looks like a one-thread core
    alloc.update_topology(laptop)
    snap = alloc.snapshot()
    assert snap.cpu_owners[5] == ("b",)
    assert 5 not in snap.shared_pool
    # And the other way round: an offline read without core ids keeps the known ones.
    assert alloc.update_topology(start) == ["b"]
    assert alloc.topology.cpu(5).core_id == 1


def test_placement_is_deterministic(two_socket: HostTopology) -> None:
    def run() -> dict[str, Placement]:
        alloc = Allocator(two_socket, reserved_cpus=[0, 16], reserved_memory_mib=4096)
        alloc.allocate("a", 3, 1000, "exclusive")
        alloc.allocate("b", 5, 2000, "shared")
        alloc.allocate("c", 8, 3000, "exclusive")
        alloc.release("a")
        alloc.allocate("d", 2, 500, "exclusive")
        return alloc.placements()

    assert run() == run()


# -- invariants under random sequences ---------------------------------------------------

ZONES = [f"z{i}" for i in range(6)]
SETUPS = [
    ("two_socket_smt", (), 0),
    ("two_socket_smt", (0, 16, 8), 4096),
    ("laptop", (), 1024),
    ("laptop", (0,), 0),
    ("this_host", (), 512),
]

Op = tuple[str, str, int, int, Policy]  # (allocate|release, zone, vcpus, memory_mib, policy)

operations = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "allocate", "release"]),
        st.sampled_from(ZONES),
        st.integers(min_value=1, max_value=12),
        st.integers(min_value=1, max_value=40000),
        st.sampled_from(["shared", "exclusive"]),
    ),
    max_size=25,
)


def check_invariants(alloc: Allocator) -> None:
    topo = alloc.topology
    snap = alloc.snapshot()
    placements = alloc.placements()
    reserved = set(snap.reserved_cpus)
    owned: dict[int, str] = {}
    groups = topo.sibling_groups()
    for name in snap.exclusive_zones:
        p = placements[name]
        mine = {cpu for cpu, owners in snap.cpu_owners.items() if name in owners}
        for cpu in mine:
            assert cpu not in owned, f"CPU {cpu} in {owned[cpu]} and {name}"
            owned[cpu] = name
        assert all(len(cpus) == 1 for cpus in p.vcpu_cpus)
        assert set(p.cpus) <= mine
        assert len(set(p.cpus)) == p.vcpus
        assert all(set(g) <= mine or not set(g) & mine for g in groups)  # whole cores
        assert {topo.node_of(c) for c in mine} == {p.numa_node}
        assert not mine & reserved
    pool = set(snap.shared_pool)
    assert pool == set(topo.online_cpus()) - reserved - set(owned)
    for name in snap.shared_zones:
        p = placements[name]
        assert p.vcpus <= len(pool)
        assert all(set(cpus) == pool for cpus in p.vcpu_cpus)
    for node in snap.memory.values():
        assert node.allocated_mib <= node.total_mib - node.reserved_mib
    assert snap.warnings == ()


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SETUPS), operations)
def test_random_sequences_keep_invariants(
    setup: tuple[str, tuple[int, ...], int],
    ops: list[Op],
) -> None:
    name, reserved, reserved_memory = setup
    alloc = Allocator(load(name), reserved_cpus=reserved, reserved_memory_mib=reserved_memory)
    initial = alloc.snapshot()
    for kind, zone, vcpus, memory, policy in ops:
        before = alloc.snapshot()
        if kind == "allocate":
            try:
                alloc.allocate(zone, vcpus, memory, policy)
            except (NoCapacity, Conflict):
                assert alloc.snapshot() == before
        elif zone in alloc:
            alloc.release(zone)
        else:
            with pytest.raises(NotFound):
                alloc.release(zone)
            assert alloc.snapshot() == before
        check_invariants(alloc)
    for zone in list(alloc.placements()):
        alloc.release(zone)
    assert alloc.snapshot() == initial
