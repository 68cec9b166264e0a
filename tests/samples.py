"""Sample wire values that several test modules build the same way."""

from __future__ import annotations

from zoned import protocol as p


def minimal_zone(
    name: str = "web",
    *,
    state: p.ZoneState = "ready",
    labels: dict[str, str] | None = None,
    created_at: float = 0.0,
) -> p.ZoneInfo:
    """A zone with only the fields ZoneInfo requires, at their plainest values
    (everything with a default keeps it); ``msgspec.structs.replace`` for the rest."""
    return p.ZoneInfo(
        name=name,
        uuid="u",
        state=state,
        vcpus=1,
        memory_mib=256,
        profile="strict",
        machine="microvm",
        accelerator="tcg",
        placement="shared",
        cpus=[],
        emulator_cpus=[],
        numa_node=None,
        labels={} if labels is None else labels,
        created_at=created_at,
        ready_at=None,
        guest_boot_s=None,
        console_log="",
    )
