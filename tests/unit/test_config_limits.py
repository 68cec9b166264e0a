"""Config values the daemon derives from the host."""

from __future__ import annotations

import msgspec
import pytest

from zoned.config import Config, libvirt_threads


@pytest.mark.parametrize(("cpus", "threads"), [(1, 4), (2, 4), (4, 4), (16, 16), (128, 128)])
def test_libvirt_threads_scale_with_the_hosts_cpus(cpus: int, threads: int) -> None:
    assert libvirt_threads(Config(), cpus) == threads


def test_libvirt_threads_set_are_kept_and_bounded() -> None:
    assert libvirt_threads(Config(libvirt_threads=2), 64) == 2
    for bad in (-1, 1025):
        with pytest.raises(msgspec.ValidationError, match="libvirt_threads"):
            msgspec.convert({"libvirt_threads": bad}, Config)
