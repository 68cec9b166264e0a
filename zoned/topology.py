"""Host topology: CPUs, physical cores, NUMA nodes and memory, as plain data.

:func:`read_topology` is a pure parser of a sysfs-like tree (pass a temporary
directory in tests); :func:`read_host_topology` is the only function that
looks at the live host, adding psutil's memory total.

What the parser reads, and why:

- ``devices/system/cpu/cpuN/`` lists the CPUs that are *present*. Online state
  comes from ``devices/system/cpu/online`` (a cpulist); a host without it falls
  back to each ``cpuN/online`` file, and a CPU without that file (cpu0 is
  often not hot-pluggable) is online.
- ``cpuN/topology/{core_id,physical_package_id}`` name the physical core. The
  kernel removes ``topology/`` while a CPU is offline, so an offline CPU may
  have ``core_id``/``package_id`` of ``None``; :meth:`HostTopology.fill_unknown_from`
  carries the values over from a topology read while the CPU was online.
- ``devices/system/node/nodeN/{cpulist,meminfo}`` give NUMA nodes. A CPU's node
  is taken from its ``cpuN/nodeK`` link (kept while offline), else from the
  cpulists. A host without ``devices/system/node`` is one node 0 with all CPUs.
- Memory: each node's ``MemTotal``. On a single-node host the node's memory is
  the host total when one is given (psutil's), because the per-node counter
  can lag behind: with deferred struct-page initialisation (this development
  host boots with ``deferred_init=lazy``) node0 reported 6.3 GiB of 23.5 GiB.
  On multi-node hosts per-node values are used as read (an under-count only
  makes admission more conservative).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import msgspec

_CPU_DIR = re.compile(r"^cpu(\d+)$")
_NODE_DIR = re.compile(r"^node(\d+)$")
_MEMTOTAL = re.compile(r"^Node\s+\d+\s+MemTotal:\s+(\d+)\s*kB\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Cpu:
    """One logical CPU (a hardware thread).

    ``core_id`` and ``package_id`` are ``None`` when the kernel does not expose
    them (an offline CPU has no ``topology/`` directory).
    """

    id: int
    core_id: int | None
    package_id: int | None
    node: int
    online: bool


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    memory_mib: int


@dataclass(frozen=True)
class HostTopology:
    """CPUs sorted by id, nodes sorted by id; each CPU's node lists it.

    ``memory_total_mib`` is informational (host info); admission uses the
    per-node ``memory_mib``.
    """

    cpus: tuple[Cpu, ...]
    nodes: tuple[NumaNode, ...]
    memory_total_mib: int

    def __post_init__(self) -> None:
        cpus = tuple(sorted(self.cpus, key=lambda c: c.id))
        nodes = tuple(sorted(self.nodes, key=lambda n: n.id))
        object.__setattr__(self, "cpus", cpus)
        object.__setattr__(self, "nodes", nodes)
        cpu_ids = [c.id for c in cpus]
        if len(set(cpu_ids)) != len(cpu_ids):
            raise ValueError(f"duplicate CPU ids in topology: {cpu_ids}")
        node_ids = [n.id for n in nodes]
        if not nodes or len(set(node_ids)) != len(node_ids):
            raise ValueError(f"topology needs distinct NUMA nodes, got {node_ids}")
        for node in nodes:
            expected = tuple(c.id for c in cpus if c.node == node.id)
            if tuple(sorted(node.cpus)) != expected:
                raise ValueError(
                    f"node {node.id} lists CPUs {format_cpulist(node.cpus) or 'none'} but the"
                    f" CPUs on it are {format_cpulist(expected) or 'none'}"
                )
            if node.memory_mib < 0:
                raise ValueError(f"node {node.id} has negative memory {node.memory_mib}")
        stray = [c.id for c in cpus if c.node not in node_ids]
        if stray:
            raise ValueError(f"CPUs {format_cpulist(stray)} are on no known NUMA node")
        if self.memory_total_mib < 0:
            raise ValueError(f"negative memory total {self.memory_total_mib}")

    # -- queries ----------------------------------------------------------

    @property
    def cpu_ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.cpus)

    @cached_property
    def _cpus_by_id(self) -> dict[int, Cpu]:
        return {c.id: c for c in self.cpus}

    @cached_property
    def _nodes_by_id(self) -> dict[int, NumaNode]:
        return {n.id: n for n in self.nodes}

    def cpu(self, cpu_id: int) -> Cpu:
        try:
            return self._cpus_by_id[cpu_id]
        except KeyError:
            raise KeyError(f"no CPU {cpu_id} in topology") from None

    def node(self, node_id: int) -> NumaNode:
        try:
            return self._nodes_by_id[node_id]
        except KeyError:
            raise KeyError(f"no NUMA node {node_id} in topology") from None

    def node_of(self, cpu_id: int) -> int:
        return self.cpu(cpu_id).node

    def online_cpus(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.cpus if c.online)

    def offline_cpus(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.cpus if not c.online)

    @cached_property
    def _sibling_groups(self) -> tuple[tuple[int, ...], ...]:
        groups: dict[tuple[int, int] | int, list[int]] = {}
        for cpu in self.cpus:
            key: tuple[int, int] | int
            if cpu.core_id is None or cpu.package_id is None:
                key = cpu.id
            else:
                key = (cpu.package_id, cpu.core_id)
            groups.setdefault(key, []).append(cpu.id)
        return tuple(sorted((tuple(g) for g in groups.values()), key=lambda g: g[0]))

    def sibling_groups(self) -> tuple[tuple[int, ...], ...]:
        """Threads of each physical core, keyed by (package_id, core_id).

        Groups are sorted by their lowest CPU id; offline CPUs are included. A
        CPU whose core is unknown forms a group of its own.
        """
        return self._sibling_groups

    @property
    def packages(self) -> tuple[int, ...]:
        return tuple(sorted({c.package_id for c in self.cpus if c.package_id is not None}))

    # -- derived topologies -------------------------------------------------

    def with_cpu_online(self, cpu_id: int, online: bool) -> HostTopology:
        """This topology with one CPU's online state changed (a hotplug event)."""
        cpu = self.cpu(cpu_id)
        cpus = tuple(replace(c, online=online) if c.id == cpu.id else c for c in self.cpus)
        return replace(self, cpus=cpus)

    def fill_unknown_from(self, previous: HostTopology) -> HostTopology:
        """Carry core/package ids that this read could not see over from ``previous``.

        Only CPUs whose ids are unknown here and known there are changed.
        """
        known = {c.id: c for c in previous.cpus}
        cpus: list[Cpu] = []
        for cpu in self.cpus:
            old = known.get(cpu.id)
            if old is not None and (cpu.core_id is None or cpu.package_id is None):
                cpu = replace(
                    cpu,
                    core_id=cpu.core_id if cpu.core_id is not None else old.core_id,
                    package_id=cpu.package_id if cpu.package_id is not None else old.package_id,
                )
            cpus.append(cpu)
        return replace(self, cpus=tuple(cpus))

    # -- JSON ------------------------------------------------------------

    def to_json(self) -> bytes:
        """JSON with one CPU or node per line: stable and diffable for recorded fixtures."""
        cpus = ",\n".join("    " + msgspec.json.encode(c).decode() for c in self.cpus)
        nodes = ",\n".join("    " + msgspec.json.encode(n).decode() for n in self.nodes)
        text = (
            f'{{\n  "cpus": [\n{cpus}\n  ],\n  "nodes": [\n{nodes}\n  ],\n'
            f'  "memory_total_mib": {self.memory_total_mib}\n}}\n'
        )
        return text.encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> HostTopology:
        """Decode and validate; raises ``ValueError`` on a malformed document."""
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as exc:
            raise ValueError(f"invalid topology JSON: {exc}") from exc


# -- cpulists -----------------------------------------------------------------


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a kernel cpulist such as ``"0-3,8,10-11"`` into sorted ids.

    An empty (or whitespace) list is empty. Raises ``ValueError`` on anything
    else that is not a list of ids and ascending ranges.
    """
    ids: set[int] = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"invalid cpulist {text!r}: bad element {part!r}")
        first = int(lo)
        last = int(hi) if sep else first
        if last < first:
            raise ValueError(f"invalid cpulist {text!r}: descending range {part!r}")
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def format_cpulist(cpu_ids: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpulist`: ``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    ids = sorted(set(cpu_ids))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


# -- parsing a sysfs tree -------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError as exc:
        raise ValueError(f"{path}: expected an integer, got {text.strip()!r}") from exc


def _numbered_dirs(parent: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    if not parent.is_dir():
        return {}
    found: dict[int, Path] = {}
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match is not None and entry.is_dir():
            found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def _node_memory_mib(node_dir: Path) -> int:
    text = _read_text(node_dir / "meminfo")
    if text is None:
        return 0
    match = _MEMTOTAL.search(text)
    if match is None:
        raise ValueError(f"{node_dir / 'meminfo'}: no MemTotal line")
    return int(match.group(1)) // 1024


def read_topology(
    sys_root: Path = Path("/sys"), memory_total_mib: int | None = None
) -> HostTopology:
    """Parse the topology under ``sys_root`` (``/sys`` or a recorded copy).

    ``memory_total_mib`` is the host's memory total (psutil's in production);
    without it the total is the sum of the nodes' ``MemTotal``, and a host
    without node directories has 0 MiB (nothing will be admitted).
    """
    cpu_root = sys_root / "devices" / "system" / "cpu"
    node_root = sys_root / "devices" / "system" / "node"
    cpu_dirs = _numbered_dirs(cpu_root, _CPU_DIR)
    if not cpu_dirs:
        raise ValueError(f"no CPUs found under {cpu_root}")

    online_list = _read_text(cpu_root / "online")
    online_ids = set(parse_cpulist(online_list)) if online_list is not None else None

    node_dirs = _numbered_dirs(node_root, _NODE_DIR)
    node_of_cpu: dict[int, int] = {}
    for node_id, node_dir in node_dirs.items():
        cpulist = _read_text(node_dir / "cpulist")
        for cpu_id in parse_cpulist(cpulist or ""):
            node_of_cpu.setdefault(cpu_id, node_id)

    cpus: list[Cpu] = []
    for cpu_id, cpu_dir in cpu_dirs.items():
        if online_ids is not None:
            online = cpu_id in online_ids
        else:
            flag = _read_int(cpu_dir / "online")
            online = flag is None or flag == 1
        linked = sorted(
            node_id
            for e in cpu_dir.iterdir()
            if (m := _NODE_DIR.match(e.name)) is not None
            and (node_id := int(m.group(1))) in node_dirs
        )
        if not node_dirs:
            node = 0
        elif linked:
            node = linked[0]
        elif cpu_id in node_of_cpu:
            node = node_of_cpu[cpu_id]
        else:
            node = min(node_dirs)
        cpus.append(
            Cpu(
                id=cpu_id,
                core_id=_read_int(cpu_dir / "topology" / "core_id"),
                package_id=_read_int(cpu_dir / "topology" / "physical_package_id"),
                node=node,
                online=online,
            )
        )

    if node_dirs:
        memory = {node_id: _node_memory_mib(d) for node_id, d in node_dirs.items()}
    else:
        memory = {0: 0}
    if len(memory) == 1 and memory_total_mib is not None:
        memory = dict.fromkeys(memory, memory_total_mib)
    nodes = tuple(
        NumaNode(
            id=node_id,
            cpus=tuple(c.id for c in cpus if c.node == node_id),
            memory_mib=mib,
        )
        for node_id, mib in memory.items()
    )
    total = memory_total_mib if memory_total_mib is not None else sum(memory.values())
    return HostTopology(cpus=tuple(cpus), nodes=nodes, memory_total_mib=total)


def read_host_topology(sys_root: Path = Path("/sys")) -> HostTopology:
    """The live host's topology, memory total from psutil (IO: reads the host)."""
    import psutil

    return read_topology(sys_root, memory_total_mib=psutil.virtual_memory().total // (1024 * 1024))
