"""Host TSC frequency detection."""

from __future__ import annotations

from pathlib import Path

from zoned.hostinfo import host_tsc_khz, tsc_khz_from_cpuinfo

AMD_VM = """\
processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2445.430
flags\t\t: fpu tsc msr constant_tsc nonstop_tsc tsc_known_freq

processor\t: 1
cpu MHz\t\t: 1.000
"""
INTEL_SCALING = """\
processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2650 v4 @ 2.20GHz
cpu MHz\t\t: 1199.982
flags\t\t: fpu tsc constant_tsc aperfmperf
"""


def test_cpu_mhz_is_used_without_aperfmperf() -> None:
    assert tsc_khz_from_cpuinfo(AMD_VM) == 2445430


def test_nominal_frequency_wins_over_a_scaled_cpu_mhz() -> None:
    assert tsc_khz_from_cpuinfo(INTEL_SCALING) == 2200000


def test_scaled_cpu_mhz_is_the_last_resort() -> None:
    text = INTEL_SCALING.replace(" @ 2.20GHz", "")
    assert tsc_khz_from_cpuinfo(text) == 1199982


def test_no_tsc_no_answer() -> None:
    assert tsc_khz_from_cpuinfo("processor\t: 0\nflags\t\t: fpu\n") is None
    assert tsc_khz_from_cpuinfo("") is None


def test_sysfs_is_preferred(tmp_path: Path) -> None:
    sysfs = tmp_path / "tsc_freq_khz"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(AMD_VM)
    assert host_tsc_khz(sysfs, cpuinfo) == 2445430
    sysfs.write_text("2445000\n")
    assert host_tsc_khz(sysfs, cpuinfo) == 2445000
    assert host_tsc_khz(tmp_path / "none", tmp_path / "none") is None
