"""Boot the built guest kernel under QEMU and check it from inside.

One boot per profile and machine type (four in all) carries every check: a
busybox init reads back what the hardened kernel and command line promise and
exercises what the round's work needs of the guest, printing ``ZT key=value``
lines on the console, which also proves that init's writes to /dev/console
reach the host on both machine types (a minimal config once left the 8250
UART without its interrupt on microvm). The guest gets the devices a zone can
have: an EROFS image with xattrs (read-only), an ext4 scratch disk, a NIC
configured by ``ip=`` as the daemon gives it, a balloon with free page reporting. Last, init exits,
so the kernel panics: the panic line must reach the console log and the zone
must stop (``panic=-1`` reboots, ``-no-reboot`` ends QEMU).

The kernels come from ``$ZONED_KERNEL_STORE`` (default: the default store).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tmpdirs import short_tmp_dir
from zoned.bareboot import busybox_initramfs, qemu_command, wait_exit
from zoned.hostinfo import host_tsc_khz
from zoned.images.hostfiles import busybox_binary
from zoned.kernel.cmdline import PASSED_TO_INIT, hardened_cmdline
from zoned.kernel.store import DEFAULT_STORE, KernelImage, find_kernel
from zoned.net.addressing import NetPools, kernel_ip_argument, zone_addressing

pytestmark = pytest.mark.integration

KERNEL_STORE = Path(os.environ.get("ZONED_KERNEL_STORE", str(DEFAULT_STORE)))

SYSCTLS = {
    "kernel/kptr_restrict": "2",
    "kernel/dmesg_restrict": "1",
    "kernel/perf_event_paranoid": "3",
    "kernel/yama/ptrace_scope": "2",
    "kernel/randomize_va_space": "2",
    "kernel/warn_limit": "100",
    "dev/tty/ldisc_autoload": "0",
    "dev/tty/legacy_tiocsti": "0",
    "fs/protected_fifos": "2",
    "fs/protected_regular": "2",
    "fs/protected_symlinks": "1",
    "fs/protected_hardlinks": "1",
    "fs/suid_dumpable": "0",
    "vm/mmap_rnd_bits": "32",
    "vm/mmap_min_addr": "65536",
    "net/ipv4/tcp_syncookies": "1",
    "net/core/devconf_inherit_init_net": "1",
    "net/ipv4/conf/all/accept_redirects": "0",
    "net/ipv4/conf/all/accept_source_route": "0",
    "net/ipv6/conf/all/accept_redirects": "0",
}
CONTAINER_SYSCTLS = {
    "kernel/unprivileged_bpf_disabled": "1",
    "net/core/bpf_jit_harden": "2",
}

#: The first zone's addresses, as the daemon gives them (ip= on the command line).
ADDRESSING = zone_addressing(NetPools(), 0)
#: An unprivileged user in the guest, for the ACL and file-capability checks.
UID = 1000
CAP_NET_RAW = 13
#: VIRTIO_BALLOON_F_REPORTING: the driver reports free pages to the host.
BALLOON_F_REPORTING = 5

INIT = r"""
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mkdir -p /etc /mnt/erofs /mnt/ext4 /mnt/upper /mnt/merged /sys/fs/cgroup
echo "zt:x:UID:UID::/:/bin/sh" > /etc/passwd
echo "zt:x:UID:" > /etc/group
echo "ZT-CONSOLE written to /dev/console by init" > /dev/console
say() { echo "ZT $1=$2"; }
bound() { ls /sys/bus/virtio/drivers/$1 2>/dev/null | grep -c virtio; }
say uname "$(uname -r)"
say init_argv "$(tr '\0' ' ' < /proc/1/cmdline)"
say init_env "$(tr '\0' ' ' < /proc/1/environ)"
say cmdline "$(cat /proc/cmdline)"
COMPLAINTS='Unknown kernel command line|Failed to set sysctl|Malformed early option'
COMPLAINTS="$COMPLAINTS|unrecognized|Invalid option string"
say cmdline_complaints "$(dmesg | grep -E "$COMPLAINTS" | sed 's/^\[[ 0-9.]*\] //' | tr '\n' '|')"
say proc_modules "$([ -e /proc/modules ] && echo present || echo absent)"
for s in SYSCTL_LIST; do say "sysctl:$s" "$(cat /proc/sys/$s 2>&1)"; done
say lockdown "$(cat /sys/kernel/security/lockdown 2>&1)"
MCE=/sys/devices/system/machinecheck/machinecheck0
say machinecheck "$([ -d $MCE ] && echo present || echo absent)"
say virtio_console "$(bound virtio_console)"
say virtio_blk "$(bound virtio_blk)"
say virtio_net "$(bound virtio_net)"
say virtio_balloon "$(bound virtio_balloon)"
say virtio_rng "$(bound virtio_rng)"
say balloon_features "$(cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features 2>&1)"
# Namespaces and sandboxing: what the agent starts workloads with.
say namespaces "$(ls /proc/self/ns | tr '\n' ' ')"
say userns "$(unshare -U true 2>/dev/null && echo allowed || echo refused)"
say unshare "$(unshare -m -u -i -n -p -f sh -c 'hostname zt-inner && hostname' 2>&1)"
say seccomp "$(cat /proc/sys/kernel/seccomp/actions_avail 2>&1)"
mount -t cgroup2 none /sys/fs/cgroup
say cgroup_controllers "$(cat /sys/fs/cgroup/cgroup.controllers 2>&1)"
# pivot_root refuses the initramfs (rootfs) as the old root, so first move a
# tmpfs copy over / (as switch_root does), then pivot into another tmpfs.
mkdir /newroot && mount -t tmpfs -o size=8m tmpfs /newroot
mkdir -p /newroot/bin /newroot/proc /newroot/next
cp /bin/busybox /newroot/bin/busybox
say pivot_root "$(unshare -m -p -f /bin/busybox sh -c '
  cd /newroot && mount --move . / && chroot . /bin/busybox sh -c "
    /bin/busybox mount -t tmpfs tmpfs /next && /bin/busybox mkdir /next/old /next/bin &&
    /bin/busybox cp /bin/busybox /next/bin/ && cd /next &&
    /bin/busybox pivot_root . old && cd / && /bin/busybox umount -l /old &&
    /bin/busybox ls /" ' 2>&1 | tr '\n' ' ')"
# Network: ip= configured eth0 before init; loopback comes up on request.
say netdevs "$(ls /sys/class/net | tr '\n' ' ')"
say eth0_addr "$(ip -4 -o addr show dev eth0 2>&1 | grep -o 'inet [0-9./]*')"
say default_route "$(ip -4 route show default 2>&1)"
say pnp "$([ -e /proc/net/pnp ] && echo present || echo absent)"
ip link set lo up
say ping_lo "$(ping -c 1 -W 5 127.0.0.1 >/dev/null 2>&1 && echo ok || echo failed)"
say ping_lo6 "$(ping6 -c 1 -W 5 ::1 >/dev/null 2>&1 && echo ok || echo failed)"
# Disks: the read-only EROFS image and the writable ext4 scratch disk.
for d in /sys/block/vd*; do
  if [ "$(cat $d/ro)" = 1 ]; then EROFS=/dev/${d##*/}; else EXT4=/dev/${d##*/}; fi
done
say erofs_mount "$(mount -t erofs -o ro $EROFS /mnt/erofs 2>&1 && echo ok)"
say erofs_acl "$(su -s /bin/sh -c 'cat /mnt/erofs/acl-file' zt 2>&1)"
say erofs_cap "$(su -s /bin/sh -c '/mnt/erofs/cap/busybox grep CapPrm /proc/self/status' zt 2>&1)"
say ext4_mount "$(mount -t ext4 $EXT4 /mnt/ext4 2>&1 && echo ok)"
echo written > /mnt/ext4/file && sync && umount /mnt/ext4 && mount -t ext4 $EXT4 /mnt/ext4
say ext4_file "$(cat /mnt/ext4/file 2>&1)"
OVL=/sys/module/overlay/parameters
say overlay_params "$(for p in redirect_dir index xino_auto metacopy; do
  printf '%s:%s ' $p $(cat $OVL/$p); done)"
# Overlay over the image, upper layer on tmpfs (the default) then on ext4.
overlay() {
  mkdir -p $1/upper $1/work
  mount -t overlay overlay -o lowerdir=/mnt/erofs,upperdir=$1/upper,workdir=$1/work \
    /mnt/merged || return
  rm /mnt/merged/lower/gone && rm -r /mnt/merged/lower/opaque && mkdir /mnt/merged/lower/opaque &&
  mv /mnt/merged/lower/renamed /mnt/merged/lower/moved && echo new > /mnt/merged/lower/new &&
  M=/mnt/merged/lower
  echo "$(ls $M | tr '\n' ,) $(ls $M/opaque | wc -l) $(cat $M/moved/inside)"
  umount /mnt/merged
}
mount -t tmpfs tmpfs /mnt/upper
say overlay_tmpfs "$(overlay /mnt/upper 2>&1)"
say overlay_ext4 "$(overlay /mnt/ext4 2>&1)"
# A guest-wide out-of-memory kill: what the console log shows.
tail /dev/zero
say oom_exit "$?"
echo ZT-END
# init returns: the kernel panics, and the zone must end with the reason on its console.
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with short_tmp_dir("zt-kboot-") as path:
        yield path


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """``system.posix_acl_access`` in the kernel's xattr format (version 2)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def file_capability(cap: int) -> bytes:
    """``security.capability`` (VFS_CAP_REVISION_2, effective): ``cap`` permitted."""
    return struct.pack("<IIIII", 0x02000000 | 1, 1 << cap, 0, 0, 0)


@pytest.fixture(scope="module")
def erofs_image(workdir: Path) -> Path:
    """An EROFS image made by mkfs.erofs from a tree carrying the xattrs images do."""
    tree = workdir / "tree"
    lower = tree / "lower"
    for directory in (lower / "opaque", lower / "renamed"):
        directory.mkdir(parents=True)
    (lower / "keep").write_text("keep\n")
    (lower / "gone").write_text("gone\n")
    (lower / "opaque" / "hidden").write_text("hidden\n")
    (lower / "renamed" / "inside").write_text("inside\n")
    tree.chmod(0o755)
    acl_file = tree / "acl-file"
    acl_file.write_text("acl-ok\n")
    acl_file.chmod(0o600)
    # user::rw- user:UID:r-- group::--- mask::r-- other::---
    everyone = 0xFFFFFFFF
    os.setxattr(
        acl_file,
        "system.posix_acl_access",
        posix_acl(
            [
                (0x01, 6, everyone),
                (0x02, 4, UID),
                (0x04, 0, everyone),
                (0x10, 4, everyone),
                (0x20, 0, everyone),
            ]
        ),
    )
    # A copy of busybox (named so, or it does not know which applet to run)
    # that is given CAP_NET_RAW by its file capability, as Debian's ping is.
    (tree / "cap").mkdir()
    capbb = tree / "cap" / "busybox"
    shutil.copyfile(busybox_binary(), capbb)
    capbb.chmod(0o755)
    os.setxattr(capbb, "security.capability", file_capability(CAP_NET_RAW))
    image = workdir / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True)
    return image


def kernel_for(profile: str) -> KernelImage:
    try:
        return find_kernel(KERNEL_STORE, profile)
    except Exception as exc:  # a missing kernel fails the test, loudly
        pytest.fail(f"guest kernel {profile!r} is not built: {exc}")


def boot_and_report(
    profile: str, machine: str, workdir: Path, erofs_image: Path
) -> tuple[dict[str, str], str]:
    kernel = kernel_for(profile)
    sysctls = {**SYSCTLS, **(CONTAINER_SYSCTLS if profile == "containers" else {})}
    init = INIT.replace("SYSCTL_LIST", " ".join(sysctls)).replace("UID", str(UID))
    initrd = busybox_initramfs(init, workdir / f"init-{profile}.cpio")
    scratch = workdir / f"scratch-{profile}-{machine}.ext4"
    with scratch.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(scratch)], check=True)
    serial = workdir / f"serial-{profile}-{machine}.log"
    tsc = host_tsc_khz() if machine == "microvm" else None
    cmdline = [*hardened_cmdline(profile, machine, tsc), kernel_ip_argument(ADDRESSING)]
    argv = qemu_command(
        kernel=kernel.image,
        initrd=initrd,
        cmdline=cmdline,
        machine=machine,
        serial_log=serial,
        agent_socket=workdir / f"agent-{profile}-{machine}.sock",
        disk=erofs_image,
    )
    bus = "device" if machine == "microvm" else "pci"
    argv += [
        "-drive",
        f"file={scratch},if=none,id=scratch0,format=raw",
        "-device",
        f"virtio-blk-{bus},drive=scratch0",
        "-netdev",
        "user,id=net0,restrict=on",
        "-device",
        f"virtio-net-{bus},netdev=net0",
        "-device",
        f"virtio-balloon-{bus},free-page-reporting=on",
    ]
    result = wait_exit(argv, serial, timeout=180)
    console = result.console.decode(errors="replace")
    assert result.seen, f"the guest did not stop by itself (QEMU killed):\n{console[-4000:]}"
    assert "ZT-END" in console, f"the guest never reached the end of its checks:\n{console[-4000:]}"
    facts = dict(re.findall(r"^ZT ([^=\s]+)=(.*?)\r?$", console, flags=re.MULTILINE))
    return facts, console


@pytest.mark.parametrize("machine", ["microvm", "q35"])
@pytest.mark.parametrize("profile", ["strict", "containers"])
def test_guest_kernel_inside_view(
    profile: str, machine: str, workdir: Path, erofs_image: Path
) -> None:
    facts, console = boot_and_report(profile, machine, workdir, erofs_image)
    kernel = kernel_for(profile)
    problems = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    check("ZT-CONSOLE written to /dev/console by init" in console, "init's console write")
    check(facts["uname"] == kernel.manifest.kernel_release, f"uname {facts['uname']}")
    # Nothing of the command line reaches init but the two arguments 6.12
    # reads without registering them: no argument, no other environment
    # variable (the kernel's own HOME and TERM), no other complaint.
    check(facts["init_argv"].split() == ["/bin/busybox", "sh", "/init"], facts["init_argv"])
    env = {"HOME=/", "TERM=linux", *PASSED_TO_INIT}
    check(set(facts["init_env"].split()) == env, f"init's environment {facts['init_env']}")
    unknown = f'Unknown kernel command line parameters "{" ".join(PASSED_TO_INIT)}", '
    check(
        facts["cmdline_complaints"] == unknown + "will be passed to user space.|",
        f"kernel complaints: {facts['cmdline_complaints']}",
    )
    check("mitigations=auto,nosmt" in facts["cmdline"], facts["cmdline"])
    check(facts["proc_modules"] == "absent", "loadable modules must be compiled out")
    sysctls = {**SYSCTLS, **(CONTAINER_SYSCTLS if profile == "containers" else {})}
    for name, value in sysctls.items():
        check(facts[f"sysctl:{name}"] == value, f"sysctl {name}={facts[f'sysctl:{name}']}")
    check("[confidentiality]" in facts["lockdown"], facts["lockdown"])
    check(facts["machinecheck"] == "present", "no machine-check support")
    check(facts["virtio_console"] == "1", "the agent's virtio-serial device is not bound")
    check(facts["virtio_blk"] == "2", f"virtio_blk bound {facts['virtio_blk']} disks")
    check(facts["virtio_net"] == "1", "virtio_net not bound")
    check(facts["virtio_rng"] == "1", "virtio_rng not bound")
    check(facts["virtio_balloon"] == "1", "virtio_balloon not bound")
    features = facts["balloon_features"]
    check(features[BALLOON_F_REPORTING : BALLOON_F_REPORTING + 1] == "1", f"balloon {features}")
    # Sandboxing: every namespace but user (strict) and time; seccomp; cgroups.
    namespaces = set(facts["namespaces"].split())
    expected = {"cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "uts"}
    check(expected <= namespaces, f"namespaces {namespaces}")
    check(("user" in namespaces) == (profile == "containers"), f"namespaces {namespaces}")
    check(facts["userns"] == ("allowed" if profile == "containers" else "refused"), "userns")
    check(facts["unshare"] == "zt-inner", f"unshare: {facts['unshare']}")
    check(
        {"kill_process", "errno", "user_notif", "allow"} <= set(facts["seccomp"].split()),
        f"seccomp: {facts['seccomp']}",
    )
    check(
        {"cpu", "memory", "pids"} <= set(facts["cgroup_controllers"].split()),
        f"cgroup controllers: {facts['cgroup_controllers']}",
    )
    check(facts["pivot_root"].split() == ["bin", "old"], f"pivot_root: {facts['pivot_root']}")
    # Network: the NIC, configured by ip= before init; loopback.
    check(set(facts["netdevs"].split()) == {"eth0", "lo"}, f"netdevs {facts['netdevs']}")
    check(
        facts["eth0_addr"] == f"inet {ADDRESSING.guest_v4}/{ADDRESSING.prefix_v4}",
        f"eth0 {facts['eth0_addr']}",
    )
    check(
        facts["default_route"].startswith(f"default via {ADDRESSING.host_v4} dev eth0"),
        f"route {facts['default_route']}",
    )
    check(facts["pnp"] == "present", "/proc/net/pnp")
    check(facts["ping_lo"] == "ok" and facts["ping_lo6"] == "ok", "loopback")
    # Disks: EROFS with its ACL and file capability honoured; ext4 writable.
    check(facts["erofs_mount"] == "ok", f"erofs: {facts['erofs_mount']}")
    check(facts["erofs_acl"] == "acl-ok", f"erofs ACL: {facts['erofs_acl']}")
    check(
        facts["erofs_cap"].split() == ["CapPrm:", f"{1 << CAP_NET_RAW:016x}"],
        f"erofs file capability: {facts['erofs_cap']}",
    )
    check(facts["ext4_mount"] == "ok" and facts["ext4_file"] == "written", "ext4")
    check(
        facts["overlay_params"].split()
        == ["redirect_dir:Y", "index:N", "xino_auto:Y", "metacopy:N"],
        f"overlay {facts['overlay_params']}",
    )
    for upper in ("tmpfs", "ext4"):
        check(
            facts[f"overlay_{upper}"] == "keep,moved,new,opaque, 0 inside",
            f"overlay on {upper}: {facts[f'overlay_{upper}']}",
        )
    # Why a zone died reaches its console log.
    check(facts["oom_exit"] == "137", f"tail /dev/zero exited {facts['oom_exit']}")
    check(
        re.search(r"Out of memory: Killed process \d+ \(tail\)", console) is not None,
        "no OOM kill line on the console",
    )
    check(
        "Kernel panic - not syncing: Attempted to kill init!" in console,
        "no panic line on the console",
    )
    assert problems == [], f"{profile} on {machine}: {problems}\n{console[-3000:]}"
