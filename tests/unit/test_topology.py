"""Host topology: cpulists, the sysfs parser, recorded fixtures and the real host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zoned.topology import (
    Cpu,
    HostTopology,
    NumaNode,
    format_cpulist,
    parse_cpulist,
    read_host_topology,
    read_topology,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "data" / "topologies"


def load(name: str) -> HostTopology:
    return HostTopology.from_json((FIXTURES / f"{name}.json").read_bytes())


def write_sysfs(
    root: Path,
    topology: HostTopology,
    *,
    node_dirs: bool = True,
    global_online: bool = True,
    offline_topology: bool = False,
) -> Path:
    """Lay ``topology`` out the way Linux does under /sys; returns the root.

    Like the kernel: cpu0 has no ``online`` file, offline CPUs have no
    ``topology/`` directory (unless ``offline_topology``), each CPU links to
    its node.
    """
    cpu_root = root / "devices" / "system" / "cpu"
    cpu_root.mkdir(parents=True)
    if global_online:
        (cpu_root / "online").write_text(format_cpulist(topology.online_cpus()) + "\n")
    for node in topology.nodes if node_dirs else ():
        node_dir = root / "devices" / "system" / "node" / f"node{node.id}"
        node_dir.mkdir(parents=True)
        online_here = [c for c in node.cpus if topology.cpu(c).online]
        (node_dir / "cpulist").write_text(format_cpulist(online_here) + "\n")
        (node_dir / "meminfo").write_text(
            f"Node {node.id} MemTotal:       {node.memory_mib * 1024} kB\n"
            f"Node {node.id} MemFree:        {node.memory_mib * 512} kB\n"
        )
    for cpu in topology.cpus:
        cpu_dir = cpu_root / f"cpu{cpu.id}"
        cpu_dir.mkdir()
        if cpu.id != 0:
            (cpu_dir / "online").write_text("1\n" if cpu.online else "0\n")
        if node_dirs:
            (cpu_dir / f"node{cpu.node}").symlink_to(f"../../node/node{cpu.node}")
        if (cpu.online or offline_topology) and cpu.core_id is not None:
            (cpu_dir / "topology").mkdir()
            (cpu_dir / "topology" / "core_id").write_text(f"{cpu.core_id}\n")
            (cpu_dir / "topology" / "physical_package_id").write_text(f"{cpu.package_id}\n")
    return root


# -- cpulists ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("0-3,8,10-11", (0, 1, 2, 3, 8, 10, 11)),
        ("0\n", (0,)),
        ("", ()),
        ("\n", ()),
        ("5,1-2", (1, 2, 5)),
        ("0-0", (0,)),
    ],
)
def test_parse_cpulist(text: str, ids: tuple[int, ...]) -> None:
    assert parse_cpulist(text) == ids


@pytest.mark.parametrize("text", ["a", "1-", "-1", "3-1", "1,,2", "1 2", "0x1"])
def test_parse_cpulist_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid cpulist"):
        parse_cpulist(text)


def test_format_cpulist() -> None:
    assert format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert format_cpulist([]) == ""
    assert format_cpulist([3, 1, 2, 2]) == "1-3"


@given(st.sets(st.integers(min_value=0, max_value=300)))
def test_cpulist_round_trip(ids: set[int]) -> None:
    assert parse_cpulist(format_cpulist(ids)) == tuple(sorted(ids))


# -- recorded fixtures ---------------------------------------------------------------


def test_two_socket_smt_fixture() -> None:
    topo = load("two_socket_smt")
    assert len(topo.cpus) == 32
    assert topo.packages == (0, 1)
    assert topo.memory_total_mib == 128 * 1024
    assert [n.memory_mib for n in topo.nodes] == [64 * 1024, 64 * 1024]
    groups = topo.sibling_groups()
    assert len(groups) == 16
    assert all(g == (g[0], g[0] + 16) for g in groups)
    assert (5, 21) in groups
    assert topo.node(0).cpus == (*range(0, 8), *range(16, 24))
    assert topo.node_of(8) == 1
    assert topo.node_of(31) == 1
    assert topo.online_cpus() == tuple(range(32))


def test_laptop_fixture() -> None:
    topo = load("laptop")
    assert len(topo.cpus) == 8
    assert topo.sibling_groups() == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert [n.id for n in topo.nodes] == [0]
    assert topo.memory_total_mib == topo.nodes[0].memory_mib == 16 * 1024


def test_this_host_fixture_is_valid() -> None:
    topo = load("this_host")
    assert topo.cpus
    assert topo.memory_total_mib > 0


@pytest.mark.parametrize("name", ["two_socket_smt", "laptop", "this_host"])
def test_json_round_trip(name: str) -> None:
    topo = load(name)
    assert HostTopology.from_json(topo.to_json()) == topo
    assert topo.to_json() == (FIXTURES / f"{name}.json").read_bytes()


@pytest.mark.parametrize("name", ["two_socket_smt", "laptop", "this_host"])
def test_read_topology_parses_a_kernel_style_tree(tmp_path: Path, name: str) -> None:
    topo = load(name)
    root = write_sysfs(tmp_path, topo)
    single = len(topo.nodes) == 1
    assert read_topology(root, topo.memory_total_mib if single else None) == topo


def test_from_json_rejects_inconsistent_topology() -> None:
    bad = (
        b'{"cpus": [{"id": 0, "core_id": 0, "package_id": 0, "node": 1, "online": true}],'
        b' "nodes": [{"id": 0, "cpus": [0], "memory_mib": 1}], "memory_total_mib": 1}'
    )
    with pytest.raises(ValueError, match="node 0 lists CPUs 0"):
        HostTopology.from_json(bad)
    with pytest.raises(ValueError, match="invalid topology JSON"):
        HostTopology.from_json(b'{"cpus": "no"}')
    with pytest.raises(ValueError, match="invalid topology JSON"):
        HostTopology.from_json(b"not json")


def test_topology_validation() -> None:
    cpu = Cpu(id=0, core_id=0, package_id=0, node=0, online=True)
    with pytest.raises(ValueError, match="duplicate CPU"):
        HostTopology((cpu, cpu), (NumaNode(0, (0, 0), 1),), 1)
    with pytest.raises(ValueError, match="distinct NUMA nodes"):
        HostTopology((cpu,), (), 1)
    with pytest.raises(ValueError, match="no known NUMA node"):
        HostTopology((Cpu(0, 0, 0, 3, True),), (NumaNode(0, (), 1),), 1)


# -- parser edge cases --------------------------------------------------------------


def test_offline_cpu_without_topology_dir(tmp_path: Path) -> None:
    topo = load("laptop").with_cpu_online(5, False)
    root = write_sysfs(tmp_path, topo)
    read = read_topology(root, 16 * 1024)
    cpu5 = read.cpu(5)
    assert (cpu5.online, cpu5.core_id, cpu5.package_id, cpu5.node) == (False, None, None, 0)
    assert read.offline_cpus() == (5,)
    # Unknown core: its own group until the core ids are carried over.
    assert (5,) in read.sibling_groups()
    assert (1,) in read.sibling_groups()
    filled = read.fill_unknown_from(load("laptop"))
    assert filled == topo
    assert (1, 5) in filled.sibling_groups()


def test_offline_cpu_keeps_its_node_from_the_cpu_link(tmp_path: Path) -> None:
    # Node cpulists on x86 drop offline CPUs; the cpuN/nodeK link stays.
    topo = load("two_socket_smt").with_cpu_online(24, False)
    root = write_sysfs(tmp_path, topo)
    assert "24" not in (root / "devices/system/node/node1/cpulist").read_text().split(",")
    assert read_topology(root).cpu(24).node == 1


def test_per_cpu_online_files_without_global_list(tmp_path: Path) -> None:
    topo = load("laptop").with_cpu_online(3, False)
    root = write_sysfs(tmp_path, topo, global_online=False, offline_topology=True)
    assert read_topology(root, 16 * 1024) == topo


def test_no_node_directory_is_one_node(tmp_path: Path) -> None:
    topo = load("two_socket_smt")
    root = write_sysfs(tmp_path, topo, node_dirs=False)
    read = read_topology(root, 4096)
    assert read.nodes == (NumaNode(0, tuple(range(32)), 4096),)
    assert read.memory_total_mib == 4096
    assert {c.node for c in read.cpus} == {0}
    assert read.sibling_groups() == topo.sibling_groups()
    assert read_topology(root).nodes[0].memory_mib == 0


def test_single_node_memory_comes_from_the_host_total(tmp_path: Path) -> None:
    # Node meminfo can lag the host total (deferred struct page init, as on this host).
    topo = load("laptop")
    root = write_sysfs(tmp_path, topo)
    assert read_topology(root).nodes[0].memory_mib == 16 * 1024
    assert read_topology(root, 20000).nodes[0].memory_mib == 20000


def test_multi_node_memory_total_is_kept_apart(tmp_path: Path) -> None:
    root = write_sysfs(tmp_path, load("two_socket_smt"))
    read = read_topology(root, 130000)
    assert read.memory_total_mib == 130000
    assert [n.memory_mib for n in read.nodes] == [65536, 65536]


def test_no_cpus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CPUs found"):
        read_topology(tmp_path)


def test_with_cpu_online() -> None:
    topo = load("laptop")
    down = topo.with_cpu_online(6, False)
    assert down.offline_cpus() == (6,)
    assert down.with_cpu_online(6, True) == topo
    with pytest.raises(KeyError):
        topo.with_cpu_online(99, False)


# -- the real host ------------------------------------------------------------------


def test_real_sys_agrees_with_os() -> None:
    topo = read_topology(Path("/sys"))
    assert len(topo.cpus) == os.cpu_count()
    online = topo.online_cpus()
    assert online
    assert set(online) >= os.sched_getaffinity(0)
    assert all(c.core_id is not None for c in topo.cpus if c.online)
    assert sum(len(g) for g in topo.sibling_groups()) == len(topo.cpus)


def test_read_host_topology_memory_is_psutils() -> None:
    topo = read_host_topology()
    assert topo.memory_total_mib == psutil.virtual_memory().total // (1024 * 1024)
    if len(topo.nodes) == 1:
        assert topo.nodes[0].memory_mib == topo.memory_total_mib


def test_record_topology_tool(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "record-topology"), "-o", str(out)], check=True
    )
    assert HostTopology.from_json(out.read_bytes()) == read_host_topology()
    fake = write_sysfs(tmp_path / "sys", load("two_socket_smt"))
    printed = subprocess.run(
        [str(REPO / "tools" / "record-topology"), "--sys-root", str(fake)],
        check=True,
        capture_output=True,
    ).stdout
    assert HostTopology.from_json(printed) == load("two_socket_smt")
