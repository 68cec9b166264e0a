"""The smallest zone each profile and machine can boot (pure).

Measured by ``tools/min-memory`` with real boots (docs/benchmarks.md): below
these sizes the guest kernel cannot unpack the agent's boot image ("Initramfs
unpacking failed: write error", then "No working init found") or runs out of
memory before the agent starts ("System is deadlocked on memory"), and the
zone never comes up. zoned refuses them up front (``invalid_request`` naming
the minimum) instead of booting a zone that cannot live.

The figures are those of this project's kernels (zoned-kernel's profiles),
boot image and workload root: a host with other kernels measures again
(``tools/min-memory``) and may raise the floor with ``min_memory_mib``.
"""

from __future__ import annotations

from typing import Final

#: The smallest guest memory (MiB) in which every one of 4 boots of the
#: profile's kernel on the machine reached the agent and ran Python from the
#: built-in workload root (tools/min-memory, 1-2 MiB steps, TCG, 6.12.117;
#: zones of the default image boot and run Python at these minimums too:
#: tests/integration/test_failures.py).
MEASURED_BOOT_MIB: Final[dict[tuple[str, str], int]] = {
    ("strict", "microvm"): 69,
    ("strict", "q35"): 62,
    ("containers", "microvm"): 72,
    ("containers", "q35"): 63,
}

#: What zoned adds to the measured size before rounding up to a multiple of
#: :data:`ROUND_MIB`: boots are not all alike (the page allocator is
#: shuffled, the kernel's layout randomised), and a zone that only just
#: boots has no room left to run anything.
MIN_MEMORY_MARGIN_MIB: Final = 32
ROUND_MIB: Final = 16

#: For a profile or machine not measured: the largest measured size.
_UNMEASURED_MIB: Final = max(MEASURED_BOOT_MIB.values())


def with_margin(measured: int) -> int:
    """The minimum zoned enforces for a measured boot size."""
    return -(-(measured + MIN_MEMORY_MARGIN_MIB) // ROUND_MIB) * ROUND_MIB


def minimum_memory_mib(profile: str, machine: str) -> int:
    """The smallest memory zoned accepts for a zone of ``profile`` on ``machine``."""
    return with_margin(MEASURED_BOOT_MIB.get((profile, machine), _UNMEASURED_MIB))


#: The smallest memory any zone may have (the protocol's static bound,
#: ``zoned.protocol.MIN_MEMORY_MIB``, is this number).
SMALLEST_MEMORY_MIB: Final = min(with_margin(mib) for mib in MEASURED_BOOT_MIB.values())
