"""The accelerator verdict cache: a verdict holds only under the key it was found under."""

from __future__ import annotations

import os
import stat

import msgspec
import pytest

from zoned import probecache
from zoned.probecache import ProbeKey

KEY = ProbeKey(
    host_kernel="6.1.0-28-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1",
    libvirt="9.0.0",
    qemu="QEMU 7.2.22",
    kvm_device="char 10:232 mode 0666 owner 0:104",
    probe_kernel="/var/lib/zoned/kernels/strict-cbff4c677e376911",
)


def test_a_verdict_round_trips_under_its_key() -> None:
    for accelerator in ("kvm", "tcg"):
        entry = probecache.encode_entry(KEY, accelerator)
        assert probecache.verdict_for(entry, KEY) == accelerator


@pytest.mark.parametrize("field", [f for f in ProbeKey.__struct_fields__])
def test_any_change_of_the_key_means_a_new_probe(field: str) -> None:
    entry = probecache.encode_entry(KEY, "kvm")
    changed = msgspec.structs.replace(KEY, **{field: getattr(KEY, field) + " changed"})
    assert probecache.verdict_for(entry, changed) is None


@pytest.mark.parametrize(
    "cached",
    [
        None,
        b"",
        b"kvm\n",  # the unkeyed cache of earlier versions
        b"{}",
        b'{"key": {}, "accelerator": "kvm"}',
        probecache.encode_entry(KEY, "tcg").replace(b'"tcg"', b'"hvf"'),
        b"\xff" * 64,
    ],
)
def test_a_missing_or_foreign_file_means_a_new_probe(cached: bytes | None) -> None:
    assert probecache.verdict_for(cached, KEY) is None


def _with_rdev(mode: int, rdev: int, uid: int, gid: int) -> os.stat_result:
    # st_rdev is not among the 10 sequence fields; it comes from the dict part.
    return os.stat_result((mode, 1, 5, 1, uid, gid, 0, 0, 0, 0), {"st_rdev": rdev})


def test_the_kvm_device_identity_names_number_mode_and_owner() -> None:
    device = _with_rdev(stat.S_IFCHR | 0o660, os.makedev(10, 232), 0, 104)
    assert probecache.describe_kvm_device(device) == "char 10:232 mode 0660 owner 0:104"
    opened = _with_rdev(stat.S_IFCHR | 0o666, os.makedev(10, 232), 0, 104)
    assert probecache.describe_kvm_device(opened) != probecache.describe_kvm_device(device)
    assert probecache.describe_kvm_device(None) == "absent"
    regular = _with_rdev(stat.S_IFREG | 0o644, 0, 0, 0)
    assert probecache.describe_kvm_device(regular).startswith("not a character device")


def test_the_live_readers_answer() -> None:
    assert probecache.read_kvm_identity(probecache.KVM_DEVICE.with_name("no-such-kvm")) == "absent"
    assert os.uname().release in probecache.host_kernel()
