"""The pure rules of warm pools: matching, fit, back-off."""

from __future__ import annotations

import pytest

from zoned import pooling
from zoned import protocol as p
from zoned.errors import InvalidRequest

LIMITS = pooling.HostLimits(
    max_vcpus=4,
    zone_memory_mib=2048,
    default_image="zoned/default:latest",
    default_machine="microvm",
)
SPEC = p.PoolSpec(memory_mib=256, size=2)


def request(**fields: object) -> p.CreateZone:
    return p.CreateZone(id=1, name="z", **fields)  # type: ignore[arg-type]


def test_a_request_matches_only_exactly_what_the_pool_holds() -> None:
    assert pooling.matches(SPEC, request(), LIMITS)
    # "" is the default image, and the default machine is None or its name.
    assert pooling.matches(SPEC, request(image="zoned/default:latest", machine="microvm"), LIMITS)
    differences: list[dict[str, object]] = [
        {"image": "python:3.12"},
        {"profile": "containers"},
        {"vcpus": 2},
        {"memory_mib": 512},
        {"machine": "q35"},
        {"writable_layer": "disk"},
        {"writable_layer_mib": 64},
        {"placement": "exclusive"},
        {"kernel_args": ["quiet"]},
        {"net": []},
        {"net": ["pypi.org:443"]},
        {"publishes": ["8080:80"]},
    ]
    for different in differences:
        assert not pooling.matches(SPEC, request(**different), LIMITS), different


def test_a_pool_boots_zones_that_match_it() -> None:
    for spec in (
        SPEC,
        p.PoolSpec(image="python:3.12", profile="containers", vcpus=2, memory_mib=512, size=3),
        p.PoolSpec(machine="q35", writable_layer="disk", writable_layer_mib=64),
    ):
        create = pooling.create_request("pool-py-1", spec)
        assert (create.id, create.name) == (0, "pool-py-1")
        assert pooling.matches(spec, create, LIMITS), spec


def test_the_first_matching_pool_by_name_is_taken() -> None:
    pools = {"b": SPEC, "a": SPEC, "c": p.PoolSpec(memory_mib=512)}
    assert pooling.pool_for(pools, request(), LIMITS) == "a"
    assert pooling.pool_for(pools, request(memory_mib=512), LIMITS) == "c"
    assert pooling.pool_for(pools, request(memory_mib=1024), LIMITS) is None


def test_templates_beyond_the_host_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="vcpus=5"):
        pooling.check_fits("x", p.PoolSpec(vcpus=5), {}, LIMITS)
    # All pools together: 2 x 256 here and 6 x 256 there is 2048, one more is too many.
    others = {"y": p.PoolSpec(memory_mib=256, size=6)}
    pooling.check_fits("x", SPEC, others, LIMITS)
    with pytest.raises(InvalidRequest, match="2304 MiB, more than the 2048"):
        pooling.check_fits("x", p.PoolSpec(memory_mib=256, size=3), others, LIMITS)
    # A pool's own old size does not count against its new one.
    pooling.check_fits("y", p.PoolSpec(memory_mib=256, size=8), others, LIMITS)


def test_failed_refills_back_off_and_a_success_resets() -> None:
    assert [pooling.backoff_s(n, 60) for n in range(8)] == [0, 2, 4, 8, 16, 32, 60, 60]
    assert pooling.backoff_s(10_000, 300) == 300
    state = pooling.PoolState()
    state.refill_failed("boot timeout", now=100.0, maximum_backoff=60)
    state.refill_failed("boot timeout", now=102.0, maximum_backoff=60)
    assert (state.refill_failures, state.backoff_until, state.last_failure) == (
        2,
        106.0,
        "boot timeout",
    )
    assert state.waiting(105.0) and not state.waiting(106.0)
    state.refilled()
    assert not state.waiting(105.0) and state.refill_failures == 2
    state.acquired(0.004)
    state.acquired(0.006)
    info = state.info("py", SPEC, ready=1, booting=0)
    assert (info.hits, info.acquire_last_s) == (2, 0.006)
    assert info.acquire_mean_s == pytest.approx(0.005)
