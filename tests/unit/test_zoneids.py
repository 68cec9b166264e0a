"""QEMU uid ranges: clashes with the host's accounts, allocation, a full range."""

from __future__ import annotations

import msgspec
import pytest

from zoned.config import Config
from zoned.errors import Conflict, NoCapacity
from zoned.zoneids import (
    HostAccounts,
    IdRange,
    QemuIdAllocator,
    SubordinateRange,
    parse_subordinate_ids,
    range_clashes,
    read_host_accounts,
)

ACCOUNTS = HostAccounts(
    users={0: "root", 1000: "ada", 64055: "libvirt-qemu", 65534: "nobody"},
    groups={0: "root", 107: "kvm", 995: "zoned", 65534: "nogroup"},
    subuids=(SubordinateRange("ada", 100000, 65536),),
    subgids=(SubordinateRange("ada", 100000, 65536),),
)


def test_the_default_range_is_clear_of_this_hosts_accounts() -> None:
    config = Config()
    ids = IdRange(config.zone_uid_base, config.zone_uid_count)
    assert range_clashes(ids, read_host_accounts()) == []
    assert range_clashes(ids, ACCOUNTS) == []


@pytest.mark.parametrize(
    ("ids", "clashes"),
    [
        (IdRange(64000, 100), ["user libvirt-qemu (64055)"]),
        (IdRange(65500, 100), ["user nobody (65534)", "group nogroup (65534)"]),
        (IdRange(900, 200), ["user ada (1000)", "group zoned (995)"]),
        (
            IdRange(165000, 1000),
            ["subuid range of ada (100000-165535)", "subgid range of ada (100000-165535)"],
        ),
        (IdRange(165536, 1000), []),  # just past the subordinate ranges
        (IdRange(99000, 1000), []),  # just before them
    ],
)
def test_a_range_overlapping_an_account_is_named(ids: IdRange, clashes: list[str]) -> None:
    assert range_clashes(ids, ACCOUNTS) == clashes


def test_many_clashes_are_summed_up() -> None:
    crowded = HostAccounts(users={uid: f"u{uid}" for uid in range(2000, 2020)})
    clashes = range_clashes(IdRange(2000, 100), crowded)
    assert clashes[-1] == "and 15 more" and len(clashes) == 6


def test_subordinate_id_files_parse_as_shadow_utils_reads_them() -> None:
    text = "ada:100000:65536\n# a comment\nbroken line\nbob:x:1\n\ncarl:231072:65536\n"
    assert parse_subordinate_ids(text) == (
        SubordinateRange("ada", 100000, 65536),
        SubordinateRange("carl", 231072, 65536),
    )


@pytest.mark.parametrize(
    "raw",
    [
        {"zone_uid_base": 2**31 - 10, "zone_uid_count": 100},  # past 2^31 - 2
        {"zone_uid_base": 999},  # system accounts' range
        {"zone_uid_count": 1},  # the probe's id and nothing for zones
    ],
)
def test_config_refuses_a_range_no_zone_could_use(raw: dict[str, int]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(raw, Config)


def test_zones_get_the_lowest_free_id_after_the_probes() -> None:
    ids = IdRange(5000, 5)
    allocator = QemuIdAllocator(ids)
    assert ids.probe_id == 5000
    assert allocator.allocate("a") == 5001
    # An id a live process runs as is skipped (another daemon's zone, say).
    assert allocator.allocate("b", busy={5002}) == 5003
    assert allocator.allocate("c") == 5002
    allocator.release("a")
    assert allocator.allocate("d") == 5001
    assert allocator.held() == {"b": 5003, "c": 5002, "d": 5001}


def test_a_full_range_is_no_capacity_and_changes_nothing() -> None:
    allocator = QemuIdAllocator(IdRange(5000, 3))
    allocator.allocate("a")
    with pytest.raises(NoCapacity, match=r"no free QEMU uid left in 5000-5002"):
        allocator.allocate("b", busy={5002})
    assert allocator.held() == {"a": 5001}
    with pytest.raises(Conflict, match="already has QEMU id 5001"):
        allocator.allocate("a")


def test_adoption_keeps_ids_and_refuses_one_held_twice() -> None:
    allocator = QemuIdAllocator(IdRange(5000, 10))
    allocator.adopt("old", 5007)
    assert allocator.allocate("new") == 5001
    with pytest.raises(Conflict, match="already zone 'old'"):
        allocator.adopt("copy", 5007)
    allocator.adopt("old", 5007)  # the same zone again is fine
    assert allocator.held() == {"old": 5007, "new": 5001}
