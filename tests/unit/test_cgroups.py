"""Which pids controller zoned uses, and where it writes the limit (zoned.cgroups).

Fake cgroup trees in a temporary directory; the real hierarchy (with a real
QEMU) is exercised in tests/integration/test_host_isolation.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from zoned import cgroups


def test_a_v2_host_with_pids_enabled(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cgroups.pids_controller(tmp_path) == "cgroup v2 pids"
    # This process's own cgroup stands in for libvirt's domain cgroup.
    line = next(
        line
        for line in Path(f"/proc/{os.getpid()}/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )
    own = tmp_path / line[3:].lstrip("/")
    own.mkdir(parents=True, exist_ok=True)
    applied = cgroups.limit_tasks(tmp_path, "zoned-a", os.getpid(), 99)
    assert applied == cgroups.TaskLimit(99, own, ours=False)
    assert (own / "pids.max").read_text() == "99\n"


def test_a_v2_host_without_pids_and_a_host_without_cgroups_get_no_limit(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    assert cgroups.pids_controller(tmp_path) == ""
    assert cgroups.limit_tasks(tmp_path, "zoned-a", os.getpid(), 99) is None
    assert cgroups.pids_controller(tmp_path / "nothing") == ""


def test_a_v1_host_with_a_pids_hierarchy(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "cgroup.procs").write_text("")
    assert cgroups.pids_controller(tmp_path) == "cgroup v1 pids"
    applied = cgroups.limit_tasks(tmp_path, "zoned-a", 4242, 64)
    cgroup = tmp_path / "pids" / "zoned" / "zoned-a"
    assert applied == cgroups.TaskLimit(64, cgroup, ours=True)
    assert (cgroup / "pids.max").read_text() == "64\n"
    assert (cgroup / "cgroup.procs").read_text() == "4242\n"


def test_stale_cgroups_of_this_daemons_domains_only_are_removed(tmp_path: Path) -> None:
    parent = tmp_path / "pids" / "zoned"
    for name in ("zoned-gone", "zoned-kept", "other-x"):
        (parent / name).mkdir(parents=True)
    assert cgroups.remove_stale_cgroups(tmp_path, "zoned-", {"zoned-kept"}) == ["zoned-gone"]
    assert sorted(p.name for p in parent.iterdir()) == ["other-x", "zoned-kept"]
    assert cgroups.remove_stale_cgroups(tmp_path / "none", "zoned-", set()) == []
