"""A task limit for each zone's QEMU, in a cgroup (the memory limit is libvirt's).

libvirt already gives every QEMU cgroups of its own; its memtune
``hard_limit`` caps the memory one (set live after the start,
:meth:`zoned.virt.Hypervisor.set_memory_hard_limit`). libvirt 9.0 does not
use the pids controller, so the task limit is zoned's, set right after the
start, before the guest can have done anything:

- **cgroup v1** with a ``pids`` hierarchy (this project's CI host): zoned
  makes ``<root>/pids/zoned/<domain>``, writes ``pids.max`` and moves QEMU
  (its whole thread group) in. QEMU's threads count (a 1-vCPU zone under
  TCG runs about 5, more while it does disk IO); the guest's own processes
  are the guest kernel's, not the host's. The directory is removed when the
  zone is destroyed, and leftovers of zones that are gone at start-up.
- **cgroup v2** (``<root>/cgroup.controllers`` exists): ``pids.max`` of the
  cgroup libvirt made for the domain (the parent of the ``emulator`` and
  ``vcpuN`` cgroups QEMU's threads are in), when the pids controller is
  enabled there. Not exercised on the CI host (v1).
- neither, or a hierarchy zoned may not write (the shipped systemd unit's
  ``ProtectControlGroups=yes``): no task limit; the daemon warns at start and
  each zone says so (``pids_limit`` unset). Where the controller is usable,
  failing to apply the limit fails the zone's creation.

Blocking (file IO): call from worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

log = logging.getLogger(__name__)

#: Where zoned's own pids cgroups live on a v1 host, under the pids hierarchy.
V1_PARENT: Final = "zoned"

PidsController = Literal["cgroup v1 pids", "cgroup v2 pids", ""]


def pids_controller(root: Path) -> PidsController:
    """Which pids controller this host offers zoned (``""``: none, or none zoned may write:
    systemd's ``ProtectControlGroups=yes`` mounts the hierarchy read-only)."""
    if (root / "cgroup.controllers").is_file():
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError:
            return ""
        usable = "pids" in controllers and os.access(root, os.W_OK)
        return "cgroup v2 pids" if usable else ""
    if (root / "pids" / "cgroup.procs").is_file() and os.access(root / "pids", os.W_OK):
        return "cgroup v1 pids"
    return ""


@dataclass(frozen=True)
class TaskLimit:
    """A task limit applied to one QEMU: its cgroup, and whether zoned made it."""

    limit: int
    cgroup: Path
    ours: bool


def limit_tasks(root: Path, domain: str, pid: int, limit: int) -> TaskLimit | None:
    """Put QEMU ``pid`` of ``domain`` under a limit of ``limit`` tasks; None if
    this host has no pids controller. Raises OSError if it has one and the limit
    could not be applied."""
    match pids_controller(root):
        case "cgroup v1 pids":
            cgroup = root / "pids" / V1_PARENT / domain
            cgroup.mkdir(parents=True, exist_ok=True)
            (cgroup / "pids.max").write_text(f"{limit}\n")
            (cgroup / "cgroup.procs").write_text(f"{pid}\n")
            return TaskLimit(limit, cgroup, ours=True)
        case "cgroup v2 pids":
            cgroup = _v2_domain_cgroup(root, pid)
            (cgroup / "pids.max").write_text(f"{limit}\n")
            return TaskLimit(limit, cgroup, ours=False)
        case _:
            return None


def _v2_domain_cgroup(root: Path, pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            cgroup = root / line[3:].lstrip("/")
            # libvirt puts QEMU's threads in <domain>/emulator and <domain>/vcpuN.
            return cgroup.parent if cgroup.name == "emulator" else cgroup
    raise OSError(errno.ENOENT, f"process {pid} is in no cgroup v2 group")


def task_count(cgroup: Path) -> int:
    return int((cgroup / "pids.current").read_text())


def remove_cgroup(cgroup: Path) -> None:
    """Remove a cgroup zoned made (once its QEMU is gone); a missing one is fine."""
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove cgroup %s: %s", cgroup, exc)


def remove_stale_cgroups(root: Path, domain_prefix: str, keep: set[str]) -> list[str]:
    """Remove zoned's v1 pids cgroups of this daemon's domains not in ``keep``
    (zones that are gone); the names removed."""
    parent = root / "pids" / V1_PARENT
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.is_dir() and entry.name.startswith(domain_prefix) and entry.name not in keep:
            remove_cgroup(Path(entry.path))
            removed.append(entry.name)
    return removed
