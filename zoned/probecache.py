"""The accelerator probe's verdict, cached per host (pure, plus one reader of the host).

The probe (:func:`zoned.virt.probe_accelerator`) boots a guest for up to its
10 s window at every start where the answer is TCG. Its answer depends on the
host and nothing else the daemon controls, so it is kept in
``state_dir/accelerator.json`` together with the *key* it was found under:
everything that can change the answer. A start whose key equals the cached
one takes the verdict (a restart after a crash, a reboot into the same
kernel); any difference, or a file that does not decode, means a new probe.

The key:

- the host kernel (``uname`` release and version: KVM is the host kernel's);
- the libvirt and QEMU versions (what runs the probe guest);
- ``/dev/kvm``'s identity: absent, or its device number, mode and owner (a
  zone's QEMU runs as a uid of its own without supplementary groups, so the
  mode and owner decide whether it may open the device at all);
- the probe's guest kernel build (a PVM host runs only guest kernels built
  for it: a new build may change the answer).

:func:`verdict_for` and :func:`encode_entry` are pure; :func:`read_kvm_identity`
and :func:`host_kernel` read the host (blocking, cheap).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

import msgspec

from zoned.protocol import Accelerator

#: The file under ``state_dir`` that holds the cached verdict.
CACHE_FILE: Final = "accelerator.json"
KVM_DEVICE: Final = Path("/dev/kvm")


class ProbeKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the probe's answer depends on (see the module docstring)."""

    host_kernel: str
    libvirt: str
    qemu: str
    kvm_device: str
    probe_kernel: str


class CachedVerdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: ProbeKey
    accelerator: Accelerator


_decoder: Final = msgspec.json.Decoder(CachedVerdict)


def verdict_for(cached: bytes | None, key: ProbeKey) -> Accelerator | None:
    """The cached answer if it was found under ``key``, else ``None`` (probe again).

    A missing, corrupt or foreign file is not an error: it only means a probe.
    """
    if cached is None:
        return None
    try:
        entry = _decoder.decode(cached)
    except msgspec.DecodeError:
        return None
    return entry.accelerator if entry.key == key else None


def encode_entry(key: ProbeKey, accelerator: Accelerator) -> bytes:
    """The file contents that cache ``accelerator`` under ``key``."""
    return msgspec.json.encode(CachedVerdict(key=key, accelerator=accelerator)) + b"\n"


def describe_kvm_device(st: os.stat_result | None) -> str:
    """``/dev/kvm``'s identity from its ``stat`` (``None``: the device is absent)."""
    if st is None:
        return "absent"
    if not stat.S_ISCHR(st.st_mode):
        return f"not a character device (mode {st.st_mode:o})"
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return f"char {major}:{minor} mode {stat.S_IMODE(st.st_mode):04o} owner {st.st_uid}:{st.st_gid}"


def read_kvm_identity(device: Path = KVM_DEVICE) -> str:
    """:func:`describe_kvm_device` of the live device (blocking)."""
    try:
        return describe_kvm_device(device.stat())
    except FileNotFoundError:
        return describe_kvm_device(None)


def host_kernel() -> str:
    """The running host kernel: ``uname -r`` and ``uname -v``."""
    uname = os.uname()
    return f"{uname.release} {uname.version}"
