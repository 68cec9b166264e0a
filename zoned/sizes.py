"""The smallest zone each profile and machine can boot (pure).

Measured by ``tools/min-memory`` with real boots (docs/benchmarks.md): below
these sizes the guest kernel runs out of memory while it unpacks the boot
image or the agent starts, and panics, every time. zoned refuses them up
front (``invalid_request`` naming the minimum) instead of booting a zone
that cannot live.
"""

from __future__ import annotations

from typing import Final

#: What zoned adds to the measured size: boots are not all alike (the page
#: allocator is shuffled, the kernel's layout randomised) and a zone that
#: just boots has no room left to run anything.
MIN_MEMORY_MARGIN_MIB: Final = 32

#: The smallest guest memory (MiB) in which every measured boot of the
#: profile's kernel on the machine reached the agent and ran Python from the
#: default workload root.
MEASURED_BOOT_MIB: Final[dict[tuple[str, str], int]] = {
    ("strict", "microvm"): 96,
    ("strict", "q35"): 96,
    ("containers", "microvm"): 96,
    ("containers", "q35"): 96,
}

#: For a profile or machine not measured: the largest measured size.
_UNMEASURED_MIB: Final = max(MEASURED_BOOT_MIB.values())


def minimum_memory_mib(profile: str, machine: str) -> int:
    """The smallest memory zoned accepts for a zone of ``profile`` on ``machine``."""
    measured = MEASURED_BOOT_MIB.get((profile, machine), _UNMEASURED_MIB)
    return measured + MIN_MEMORY_MARGIN_MIB


#: The smallest memory any zone may have: the protocol's static bound.
SMALLEST_MEMORY_MIB: Final = min(MEASURED_BOOT_MIB.values()) + MIN_MEMORY_MARGIN_MIB
