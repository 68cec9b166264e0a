"""Facts about the host that zone boots depend on.

:func:`host_tsc_khz` gives the host's TSC frequency. Under TCG the guest's TSC
is the host's TSC (QEMU reads it with ``rdtsc``), and on the microvm machine
the guest kernel cannot calibrate it reliably, so the daemon passes it on the
command line as ``tsc_early_khz=``.

Where it comes from, first that works:

1. ``/sys/devices/system/cpu/cpu0/tsc_freq_khz`` (exact; only some kernels have it);
2. ``cpu MHz`` in ``/proc/cpuinfo`` when the CPU has no ``aperfmperf`` flag:
   the kernel then reports its boot-time calibration (``cpu_khz``, which is
   the TSC frequency on any x86 with an invariant TSC, and in virtual
   machines); with ``aperfmperf`` it is the current, scaled frequency instead;
3. the nominal frequency in ``model name`` (``... @ 2.20GHz``, Intel), which
   is the TSC frequency on CPUs with an invariant TSC;
4. ``cpu MHz`` anyway, as an approximation: a TSC a few percent off makes the
   guest clock drift, no ``tsc_early_khz`` at all makes microvm boots hang.

``dmesg`` ("tsc: Detected ... MHz") would be exact but is not readable
without privileges on hardened hosts and is lost when the ring buffer wraps.
"""

from __future__ import annotations

import re
from pathlib import Path

SYSFS_TSC_KHZ = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
PROC_CPUINFO = Path("/proc/cpuinfo")

_MODEL_GHZ = re.compile(r"@\s*([0-9]+(?:\.[0-9]+)?)\s*GHz")


def _first_cpu(cpuinfo: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _mhz_to_khz(text: str) -> int | None:
    try:
        khz = round(float(text) * 1000)
    except ValueError:
        return None
    return khz if khz > 0 else None


def tsc_khz_from_cpuinfo(cpuinfo: str) -> int | None:
    """The TSC frequency (kHz) that ``/proc/cpuinfo`` text implies, or None (pure)."""
    cpu = _first_cpu(cpuinfo)
    flags = cpu.get("flags", "").split()
    if "tsc" not in flags:
        return None
    mhz = cpu.get("cpu MHz")
    if mhz is not None and "aperfmperf" not in flags and (khz := _mhz_to_khz(mhz)):
        return khz
    match = _MODEL_GHZ.search(cpu.get("model name", ""))
    if match and (khz := _mhz_to_khz(str(float(match.group(1)) * 1000))):
        return khz
    if mhz is not None:
        return _mhz_to_khz(mhz)
    return None


def host_tsc_khz(sysfs_path: Path = SYSFS_TSC_KHZ, cpuinfo_path: Path = PROC_CPUINFO) -> int | None:
    """The host's TSC frequency in kHz, or None if it cannot be told (see the module doc)."""
    try:
        khz = int(sysfs_path.read_text().strip())
    except (OSError, ValueError):
        pass
    else:
        if khz > 0:
            return khz
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        return None
    return tsc_khz_from_cpuinfo(cpuinfo)
