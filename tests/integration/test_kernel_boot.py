"""Boot the built guest kernel under QEMU and check it from inside.

A busybox init reads back what the hardened kernel and command line promise
and prints it on the console, which is also the proof that init's writes to
/dev/console reach the host on both machine types (a minimal config once left
the 8250 UART without its interrupt on microvm, so every write failed).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from zoned.bareboot import boot_until, busybox_initramfs, qemu_command
from zoned.hostinfo import host_tsc_khz
from zoned.kernel.cmdline import hardened_cmdline
from zoned.kernel.store import DEFAULT_STORE, KernelImage, find_kernel

pytestmark = pytest.mark.integration

SYSCTLS = {
    "kernel/kptr_restrict": "2",
    "kernel/dmesg_restrict": "1",
    "kernel/perf_event_paranoid": "3",
    "kernel/yama/ptrace_scope": "2",
    "fs/protected_fifos": "2",
    "fs/protected_regular": "2",
    "fs/protected_symlinks": "1",
    "fs/protected_hardlinks": "1",
    "net/ipv4/conf/all/accept_redirects": "0",
    "net/ipv4/conf/all/accept_source_route": "0",
    "net/ipv6/conf/all/accept_redirects": "0",
}
CONTAINER_SYSCTLS = {
    "kernel/unprivileged_bpf_disabled": "1",
    "net/core/bpf_jit_harden": "2",
}

INIT = r"""
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
echo "ZT-CONSOLE written to /dev/console by init" > /dev/console
say() { echo "ZT $1=$2"; }
say uname "$(uname -r)"
say proc_modules "$([ -e /proc/modules ] && echo present || echo absent)"
for s in SYSCTL_LIST; do say "sysctl:$s" "$(cat /proc/sys/$s 2>&1)"; done
say virtio_console "$(ls /sys/bus/virtio/drivers/virtio_console 2>/dev/null | grep -c virtio)"
say virtio_blk "$(ls /sys/bus/virtio/drivers/virtio_blk 2>/dev/null | grep -c virtio)"
say vda "$([ -e /sys/block/vda ] && echo present || echo absent)"
say lockdown "$(cat /sys/kernel/security/lockdown 2>&1)"
say userns "$(unshare -U true 2>/dev/null && echo allowed || echo refused)"
say cmdline "$(cat /proc/cmdline)"
echo ZT-END
sleep 1000
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="zt-kboot-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def kernel_for(profile: str) -> KernelImage:
    try:
        return find_kernel(DEFAULT_STORE, profile)
    except Exception as exc:  # a missing kernel fails the test, loudly
        pytest.fail(f"guest kernel {profile!r} is not built: {exc}")


def boot_and_report(profile: str, machine: str, workdir: Path) -> tuple[dict[str, str], str]:
    kernel = kernel_for(profile)
    sysctls = {**SYSCTLS, **(CONTAINER_SYSCTLS if profile == "containers" else {})}
    init = INIT.replace("SYSCTL_LIST", " ".join(sysctls))
    initrd = busybox_initramfs(init, workdir / f"init-{profile}.cpio")
    disk = workdir / "disk.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    serial = workdir / f"serial-{profile}-{machine}.log"
    tsc = host_tsc_khz() if machine == "microvm" else None
    argv = qemu_command(
        kernel=kernel.image,
        initrd=initrd,
        cmdline=hardened_cmdline(profile, machine, tsc),
        machine=machine,
        serial_log=serial,
        agent_socket=workdir / f"agent-{profile}-{machine}.sock",
        disk=disk,
    )
    result = boot_until(argv, serial, b"ZT-END", timeout=90)
    console = result.console.decode(errors="replace")
    assert result.seen, f"the guest never reached the end of its checks:\n{console[-4000:]}"
    facts = dict(re.findall(r"^ZT ([^=\s]+)=(.*?)\r?$", console, flags=re.MULTILINE))
    return facts, console


@pytest.mark.parametrize("machine", ["microvm", "q35"])
@pytest.mark.parametrize("profile", ["strict", "containers"])
def test_guest_kernel_inside_view(profile: str, machine: str, workdir: Path) -> None:
    facts, console = boot_and_report(profile, machine, workdir)
    kernel = kernel_for(profile)
    assert "ZT-CONSOLE written to /dev/console by init" in console
    assert facts["uname"] == kernel.manifest.kernel_release
    assert facts["proc_modules"] == "absent", "loadable modules must be compiled out"
    sysctls = {**SYSCTLS, **(CONTAINER_SYSCTLS if profile == "containers" else {})}
    for name, value in sysctls.items():
        assert facts[f"sysctl:{name}"] == value, (name, facts[f"sysctl:{name}"])
    assert facts["virtio_console"] == "1", "the agent's virtio-serial device is not bound"
    assert facts["virtio_blk"] == "1" and facts["vda"] == "present"
    assert "[confidentiality]" in facts["lockdown"]
    assert facts["userns"] == ("allowed" if profile == "containers" else "refused")
    assert "mitigations=auto,nosmt" in facts["cmdline"]
