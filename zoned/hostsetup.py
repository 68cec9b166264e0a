"""Prepare a host to run zoned: users, libvirt's qemu.conf, directories, daemons,
the default workload image.

Run as root by ``tools/host-setup`` (which installs the packages and the venv
first) or directly as ``zoned-host-setup``. Every step is idempotent: a second
run changes nothing and says so.

The module has two halves. The pure half (``render_qemu_conf``,
``decide_libvirt_action``, ``zoned_directories``, ``render_default_config``…)
turns measured facts into decisions and file contents and is unit tested. The
shell half (everything from ``probe_host`` down) measures the host and carries
the decisions out.

Hosts without systemd as PID 1 (containers, this project's CI) get libvirtd and
virtlogd under :mod:`zoned.supervisor`, a reaping subreaper; see its docstring
for why that matters.
"""

from __future__ import annotations

import enum
import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from zoned.config import DEFAULT_CONFIG_PATH, Config, load_config
from zoned.errors import ZonedError

QEMU_CONF_PATH = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_BACKUP_PATH = Path("/etc/libvirt/qemu.conf.before-zoned")
MANAGED_MARKER = "# Managed by zoned host-setup (zoned/hostsetup.py)."

QEMU_USER = "libvirt-qemu"
QEMU_GROUP = "kvm"
SYSTEM_GROUPS = ("kvm", "libvirt")

SUPERVISOR_PIDFILE = Path("/run/zoned/supervisor.pid")
SUPERVISOR_LOG = Path("/var/log/zoned/supervisor.log")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
FOREIGN_PIDFILES = (LIBVIRTD_PIDFILE, Path("/run/virtlogd.pid"))
LIBVIRT_URI = "qemu:///system"
# libvirt probes QEMU's capabilities on its first connection (~8 s measured).
LIBVIRT_READY_TIMEOUT_S = 60.0
FOREIGN_STOP_TIMEOUT_S = 15.0

SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_DIR = Path("/etc/sysusers.d")
TMPFILES_DIR = Path("/etc/tmpfiles.d")


# --------------------------------------------------------------------------
# Pure half
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HostFacts:
    """What host setup measured; the input of every decision below."""

    systemd_pid1: bool
    apparmor: bool
    selinux: bool
    mount_namespaces: bool


def render_qemu_conf(facts: HostFacts) -> str:
    """The complete /etc/libvirt/qemu.conf that zoned wants on this host."""

    def yes_no(value: bool) -> str:
        return "yes" if value else "no"

    lines = [
        MANAGED_MARKER,
        "# Local edits are overwritten on the next host setup; change the generator.",
        f"# Rendered for: systemd={yes_no(facts.systemd_pid1)} apparmor={yes_no(facts.apparmor)}"
        f" selinux={yes_no(facts.selinux)} mount-namespaces={yes_no(facts.mount_namespaces)}",
        "",
        "# QEMU never runs as root. Zones' QEMUs run as a uid and gid of their own (a",
        "# static DAC label per domain); this user is for domains that carry none.",
        f'user = "{QEMU_USER}"',
        f'group = "{QEMU_GROUP}"',
        "",
        "# libvirt never hands a domain's files (kernel, initramfs, disks, console log)",
        "# to QEMU's user: every zone boots the same root-owned, read-only kernel and",
        "# images, and a QEMU that could write them would own every later zone. Zones'",
        "# labels say relabel='no' already; this covers domains without one (an older",
        "# zoned's, other tools'), which would hand the shared files to libvirt-qemu.",
        "# Each domain's own directory (/var/lib/libvirt/qemu/domain-*: the master key)",
        "# is still given to its QEMU's uid.",
        "dynamic_ownership = 0",
        "# Nothing to remember: nothing is relabelled. (xattrs left behind by a killed",
        "# libvirtd would make later starts fail with 'already in use'.)",
        "remember_owner = 0",
        "",
        "# QEMU's own seccomp filter: no spawning, no privilege changes.",
        "seccomp_sandbox = 1",
        "",
    ]
    if facts.mount_namespaces:
        lines += [
            "# Each QEMU sees a private /dev holding only the nodes its zone needs.",
            'namespaces = [ "mount" ]',
        ]
    else:
        lines += [
            "# Mount namespaces do not work on this host (probed): QEMU shares /dev.",
            "namespaces = [ ]",
        ]
    lines.append("")
    if not (facts.apparmor or facts.selinux):
        lines += [
            "# Neither AppArmor nor SELinux is available: DAC (the user above) is the only",
            "# security driver. Saying so avoids libvirt probing for absent ones.",
            'security_driver = "none"',
            "",
        ]
    lines += [
        "# QEMU's stdout/stderr go through virtlogd, which rotates and caps the logs.",
        'stdio_handler = "logd"',
        "",
    ]
    return "\n".join(lines)


def is_managed(text: str) -> bool:
    """Whether a qemu.conf was written by us (else it is backed up before replacing)."""
    return text.startswith(MANAGED_MARKER)


class LibvirtAction(enum.Enum):
    """What to do about libvirtd/virtlogd; see ``decide_libvirt_action``."""

    NOTHING = "nothing"
    WAIT = "wait for the supervised libvirtd"
    RESTART_SUPERVISED = "restart libvirtd through the supervisor"
    START_SUPERVISOR = "start the supervisor (stopping unsupervised daemons)"
    SYSTEMD_ENABLE = "systemctl enable --now"
    SYSTEMD_RESTART = "systemctl enable --now, then restart libvirtd"


def decide_libvirt_action(
    *,
    systemd_pid1: bool,
    qemu_conf_changed: bool,
    supervisor_alive: bool,
    libvirt_answers: bool,
) -> LibvirtAction:
    """Decide how to get a libvirtd running with the current qemu.conf.

    Under systemd the units do everything. Otherwise a running, answering
    libvirtd is left alone unless qemu.conf changed; a libvirtd we did not
    start (nor our supervisor) is replaced by our supervisor only when it must
    restart anyway or does not answer.
    """
    if systemd_pid1:
        return LibvirtAction.SYSTEMD_RESTART if qemu_conf_changed else LibvirtAction.SYSTEMD_ENABLE
    if supervisor_alive:
        if qemu_conf_changed:
            return LibvirtAction.RESTART_SUPERVISED
        return LibvirtAction.NOTHING if libvirt_answers else LibvirtAction.WAIT
    if libvirt_answers and not qemu_conf_changed:
        return LibvirtAction.NOTHING
    return LibvirtAction.START_SUPERVISOR


@dataclass(frozen=True)
class DirSpec:
    """A directory host setup owns: created if missing, mode and owner enforced."""

    path: Path
    mode: int
    group: str
    why: str
    # False: only create it; its packaging owns mode and owner.
    enforce: bool = True


def zoned_directories(config: Config) -> list[DirSpec]:
    """The directories zoned needs, with the modes the systemd units also use.

    Each zone's QEMU runs as a uid of its own and opens zone files by path (kernel, initramfs),
    so every directory on such a path is traversable by others (``--x``) while
    its listing stays private. The control socket itself is 0660 root:<group>.
    """
    group = config.socket_group
    specs = [
        DirSpec(Path(config.state_dir), 0o751, group, "zone records"),
        DirSpec(Path(config.kernel_store), 0o755, "root", "guest kernel store"),
        DirSpec(Path(config.image_cache), 0o755, "root", "zone boot images"),
        DirSpec(Path(config.image_store), 0o755, "root", "workload images (OCI, converted)"),
        DirSpec(Path(config.scratch_dir), 0o711, "root", "zones' scratch disks"),
        DirSpec(Path(config.runtime_dir), 0o751, group, "control socket, per-zone files"),
        DirSpec(Path(config.log_dir), 0o750, group, "console logs"),
        DirSpec(Path("/var/log/libvirt/qemu"), 0o750, "root", "libvirt's QEMU logs", False),
    ]
    socket_dir = Path(config.socket_path).parent
    if socket_dir not in {s.path for s in specs}:
        specs.append(DirSpec(socket_dir, 0o750, group, "control socket"))
    return specs


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything JSON escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, msgspec.Struct):  # an inline table
        items = msgspec.structs.asdict(value).items()
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in items) + " }"
    raise TypeError(f"no TOML rendering for {type(value).__name__}")


def render_default_config() -> str:
    """A zoned.toml listing every setting at its default, commented out.

    Commented out so that the defaults of a newer zoned apply unless the admin
    chose a value; the file still documents every knob.
    """
    defaults = msgspec.structs.asdict(Config())
    lines = [
        "# zoned configuration. Every setting is shown at its default, commented out;",
        "# uncomment and change what this host needs. Unknown keys are an error.",
        "",
    ]
    tables = {name: value for name, value in defaults.items() if isinstance(value, msgspec.Struct)}
    # Tables of named entries, empty by default (pools): said in a comment.
    named = {name for name, value in defaults.items() if isinstance(value, dict)}
    lines += [
        f"# {name} = {_toml_value(value)}"
        for name, value in defaults.items()
        if name not in tables and name not in named
    ]
    for name in sorted(named):
        # Its header is not commented out: the table is empty.
        lines += ["", f"[{name}]", f"# [{name}.NAME] tables: none by default (docs/fast-start.md)"]
    for name, table in tables.items():
        # A table's header is not commented out: it holds only defaults.
        fields = msgspec.structs.asdict(table)
        subtables = {key: value for key, value in fields.items() if isinstance(value, dict)}
        lines += ["", f"[{name}]"]
        lines += [
            f"# {key} = {_toml_value(value)}"
            for key, value in fields.items()
            if key not in subtables
        ]
        for key, entries in subtables.items():
            for entry_name, entry in entries.items():
                lines += ["", f"[{name}.{key}.{entry_name}]"]
                lines += [
                    # TOML has no null: a field unset by default is named only.
                    f"# {field} (not set)" if value is None else f"# {field} = {_toml_value(value)}"
                    for field, value in msgspec.structs.asdict(entry).items()
                ]
    return "\n".join(lines) + "\n"


#: /dev/kvm as zones need it: group kvm, and read/write for everybody.
KVM_DEVICE_MODE = 0o666


def kvm_device_needs_fix(mode: int, gid: int, kvm_gid: int) -> bool:
    """Whether /dev/kvm is not ``root:kvm`` 0666.

    Each zone's QEMU runs as a uid and gid of its own with no supplementary
    groups (a static DAC label carries none), so group kvm cannot open the
    device for it: others must (upstream systemd's default mode, 0666; KVM
    is built to be opened by unprivileged users, every open a VM of its own).
    Group kvm stays for libvirt's capability probe: without udev
    (containers) /dev/kvm stays root:root 0600, libvirt then finds KVM
    unusable for QEMU's user while its root-run probe found it usable,
    declares its capability cache stale, and re-probes QEMU on *every* domain
    start: measured here, 14 s per start instead of 0.7 s.
    """
    return gid != kvm_gid or (mode & 0o666) != KVM_DEVICE_MODE


# --------------------------------------------------------------------------
# Shell half
# --------------------------------------------------------------------------


class Report:
    """The summary printed at the end: one line per thing looked at."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, message: str) -> None:
        self.lines.append(message)
        print(f"host-setup: {message}", flush=True)


class SetupError(Exception):
    """A step failed; host setup stops with this message."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise SetupError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def probe_systemd_pid1() -> bool:
    try:
        comm = Path("/proc/1/comm").read_text().strip()
    except OSError:
        return False
    return comm == "systemd" and Path("/run/systemd/system").is_dir()


def probe_apparmor() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


def probe_selinux() -> bool:
    return Path("/sys/fs/selinux/enforce").exists()


def probe_mount_namespaces() -> bool:
    """Whether libvirt's per-QEMU mount namespace can work: unshare, then mount on /dev."""
    if shutil.which("unshare") is None:
        return False
    argv = ["unshare", "--mount", "--propagation", "slave", "--"]
    argv += ["mount", "-t", "tmpfs", "-o", "size=64k", "zoned-probe", "/dev"]
    return _run(argv, check=False).returncode == 0


def probe_host() -> HostFacts:
    return HostFacts(
        systemd_pid1=probe_systemd_pid1(),
        apparmor=probe_apparmor(),
        selinux=probe_selinux(),
        mount_namespaces=probe_mount_namespaces(),
    )


def ensure_users(report: Report, socket_group: str) -> None:
    for group in (*SYSTEM_GROUPS, socket_group):
        try:
            grp.getgrnam(group)
        except KeyError:
            _run(["groupadd", "--system", group])
            report.note(f"created system group {group}")
    try:
        user = pwd.getpwnam(QEMU_USER)
    except KeyError:
        _run(
            [
                "useradd", "--system", "--gid", QEMU_GROUP, "--no-create-home",
                "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin",
                "--comment", "Libvirt Qemu", QEMU_USER,
            ]
        )  # fmt: skip
        report.note(f"created system user {QEMU_USER} (group {QEMU_GROUP})")
        return
    kvm = grp.getgrnam(QEMU_GROUP)
    if user.pw_gid != kvm.gr_gid and QEMU_USER not in kvm.gr_mem:
        _run(["usermod", "--append", "--groups", QEMU_GROUP, QEMU_USER])
        report.note(f"added {QEMU_USER} to group {QEMU_GROUP}")
    names = ", ".join((*SYSTEM_GROUPS, socket_group, QEMU_USER))
    report.note(f"users and groups present: {names}")


#: Keeps /dev/kvm as zones need it across reboots on hosts with udev.
KVM_UDEV_RULE_PATH = Path("/etc/udev/rules.d/65-zoned-kvm.rules")
KVM_UDEV_RULE = (
    "# Installed by zoned host setup: each zone's QEMU runs as a uid of its own with\n"
    "# no supplementary groups, so /dev/kvm must be open to others (systemd's default).\n"
    'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"\n'
)


def ensure_kvm_device(report: Report) -> None:
    if Path("/etc/udev").is_dir():
        try:
            current = KVM_UDEV_RULE_PATH.read_text()
        except FileNotFoundError:
            current = None
        if current != KVM_UDEV_RULE:
            _atomic_write(KVM_UDEV_RULE_PATH, KVM_UDEV_RULE, 0o644)
            report.note(f"installed {KVM_UDEV_RULE_PATH} (/dev/kvm 0666)")
    kvm_dev = Path("/dev/kvm")
    try:
        st = kvm_dev.stat()
    except FileNotFoundError:
        report.note("/dev/kvm absent: zones will use TCG")
        return
    kvm_gid = grp.getgrnam(QEMU_GROUP).gr_gid
    if kvm_device_needs_fix(st.st_mode, st.st_gid, kvm_gid):
        os.chown(kvm_dev, -1, kvm_gid)
        os.chmod(kvm_dev, stat.S_IMODE(st.st_mode) | KVM_DEVICE_MODE)
        report.note("/dev/kvm: set group kvm, mode 0666 (zones' QEMUs have no kvm group)")
    else:
        report.note("/dev/kvm: zones' QEMUs can open it (0666)")


#: libvirt's per-domain directories (``domain-<id>-<name>``, the master key
#: QEMU reads) live here, each given to its domain's QEMU uid; a zone's QEMU
#: runs as a uid of its own, so it must be able to traverse the parent.
LIBVIRT_DOMAINS_DIR = Path("/var/lib/libvirt/qemu")


def domains_dir_mode(mode: int) -> int:
    """The mode libvirt's domain directory needs: traversable by others, writable by none."""
    return (mode | 0o001) & ~0o002


def ensure_libvirt_domains_dir(report: Report) -> None:
    """/var/lib/libvirt/qemu with ``o+x``, kept across package upgrades.

    Debian's libvirt-daemon-system makes it 0750 ``libvirt-qemu`` and resets
    that on every configure unless dpkg has a stat override for it, so the
    override is registered too. Without ``o+x`` a zone's QEMU fails on its
    own ``master-key.aes`` ("Permission denied").
    """
    try:
        info = LIBVIRT_DOMAINS_DIR.stat()
    except FileNotFoundError:
        report.note(f"{LIBVIRT_DOMAINS_DIR}: absent (libvirt makes it traversable)")
        return
    wanted = domains_dir_mode(stat.S_IMODE(info.st_mode))
    if shutil.which("dpkg-statoverride") is not None:
        listed = _run(["dpkg-statoverride", "--list", str(LIBVIRT_DOMAINS_DIR)], check=False)
        if listed.returncode != 0:
            owner = pwd.getpwuid(info.st_uid).pw_name
            group = grp.getgrgid(info.st_gid).gr_name
            _run(
                [
                    "dpkg-statoverride", "--add", owner, group, f"{wanted:o}",
                    str(LIBVIRT_DOMAINS_DIR),
                ]
            )  # fmt: skip
            report.note(f"{LIBVIRT_DOMAINS_DIR}: dpkg stat override {owner}:{group} {wanted:o}")
    if stat.S_IMODE(info.st_mode) != wanted:
        os.chmod(LIBVIRT_DOMAINS_DIR, wanted)
        report.note(f"{LIBVIRT_DOMAINS_DIR}: mode {wanted:o} (zones' QEMUs reach their own dirs)")
    else:
        report.note(f"{LIBVIRT_DOMAINS_DIR}: traversable by zones' QEMUs")


def qemu_conf_settings(text: str) -> list[str]:
    """What libvirtd reads of a qemu.conf: its lines without comments and blanks."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def write_qemu_conf(report: Report, content: str) -> bool:
    """Install qemu.conf; True when a setting changed (a changed comment restarts nothing)."""
    try:
        current = QEMU_CONF_PATH.read_text()
    except FileNotFoundError:
        current = None
    if current == content:
        report.note(f"{QEMU_CONF_PATH}: unchanged")
        return False
    if current is not None and not is_managed(current) and not QEMU_CONF_BACKUP_PATH.exists():
        shutil.copy2(QEMU_CONF_PATH, QEMU_CONF_BACKUP_PATH)
        report.note(f"saved the previous qemu.conf as {QEMU_CONF_BACKUP_PATH}")
    _atomic_write(QEMU_CONF_PATH, content, 0o600)
    if current is not None and qemu_conf_settings(current) == qemu_conf_settings(content):
        report.note(f"{QEMU_CONF_PATH}: comments rewritten, settings unchanged")
        return False
    report.note(f"{QEMU_CONF_PATH}: written")
    return True


def _atomic_write(path: Path, content: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.zoned-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(tmp, mode)
    tmp.replace(path)


def ensure_config(report: Report) -> Config:
    if DEFAULT_CONFIG_PATH.exists():
        report.note(f"{DEFAULT_CONFIG_PATH}: present, left as is")
    else:
        _atomic_write(DEFAULT_CONFIG_PATH, render_default_config(), 0o644)
        report.note(f"{DEFAULT_CONFIG_PATH}: written with defaults")
    return load_config(DEFAULT_CONFIG_PATH)


def ensure_directories(report: Report, specs: Sequence[DirSpec]) -> None:
    for spec in specs:
        gid = grp.getgrnam(spec.group).gr_gid
        if not spec.path.exists():
            spec.path.mkdir(parents=True, mode=spec.mode)
            os.chown(spec.path, 0, gid)
            os.chmod(spec.path, spec.mode)
            report.note(f"created {spec.path} ({spec.mode:o} root:{spec.group}; {spec.why})")
            continue
        st = spec.path.stat()
        if spec.enforce and (
            stat.S_IMODE(st.st_mode) != spec.mode or (st.st_uid, st.st_gid) != (0, gid)
        ):
            os.chown(spec.path, 0, gid)
            os.chmod(spec.path, spec.mode)
            report.note(f"fixed {spec.path} to {spec.mode:o} root:{spec.group}")
    report.note("directories in place: " + " ".join(str(s.path) for s in specs))


def libvirt_answers() -> bool:
    try:
        result = subprocess.run(
            ["virsh", "-c", LIBVIRT_URI, "version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def supervisor_pid() -> int | None:
    pid = _read_pid(SUPERVISOR_PIDFILE)
    if pid is None or not _pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"zoned.supervisor" in cmdline else None


def wait_for_libvirt(report: Report, what: str) -> None:
    start = time.monotonic()
    while time.monotonic() - start < LIBVIRT_READY_TIMEOUT_S:
        if libvirt_answers():
            report.note(
                f"libvirt answers on {LIBVIRT_URI} ({what}, {time.monotonic() - start:.1f} s)"
            )
            return
        time.sleep(0.5)
    raise SetupError(
        f"libvirtd did not answer on {LIBVIRT_URI} within {LIBVIRT_READY_TIMEOUT_S:.0f} s "
        f"({what}); see {SUPERVISOR_LOG}"
    )


def wait_for_new_libvirtd(old_pid: int | None) -> None:
    """Wait until the libvirtd that read the old qemu.conf is gone (so we do not ask it)."""
    deadline = time.monotonic() + FOREIGN_STOP_TIMEOUT_S
    while old_pid is not None and _pid_alive(old_pid):
        if time.monotonic() > deadline:
            raise SetupError(f"libvirtd (pid {old_pid}) did not stop for its restart")
        time.sleep(0.1)


def stop_foreign_daemons(report: Report) -> None:
    """Stop a libvirtd/virtlogd that our supervisor did not start (by their pidfiles)."""
    for pidfile in FOREIGN_PIDFILES:
        pid = _read_pid(pidfile)
        if pid is None or not _pid_alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + FOREIGN_STOP_TIMEOUT_S
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        report.note(f"stopped unsupervised {pidfile.stem} (pid {pid})")


def start_supervisor(report: Report) -> int:
    SUPERVISOR_LOG.parent.mkdir(parents=True, exist_ok=True)
    with SUPERVISOR_LOG.open("a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zoned.supervisor", "--pidfile", str(SUPERVISOR_PIDFILE)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
        )
    report.note(f"started zoned.supervisor (pid {proc.pid}, log {SUPERVISOR_LOG})")
    return proc.pid


def install_systemd_units(report: Report) -> None:
    """Copy our units into /etc and apply sysusers/tmpfiles (systemd hosts only)."""
    source = Path(__file__).resolve().parent.parent / "systemd"
    targets = {
        source / "zoned.service": SYSTEMD_UNIT_DIR / "zoned.service",
        source / "zoned-image-helper.socket": SYSTEMD_UNIT_DIR / "zoned-image-helper.socket",
        source / "zoned-image-helper@.service": SYSTEMD_UNIT_DIR / "zoned-image-helper@.service",
        source / "zoned.sysusers.conf": SYSUSERS_DIR / "zoned.conf",
        source / "zoned.tmpfiles.conf": TMPFILES_DIR / "zoned.conf",
    }
    if not all(src.exists() for src in targets):
        report.note(f"systemd units not found under {source}; not installed")
        return
    changed = False
    for src, dst in targets.items():
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            _atomic_write(dst, src.read_text(), 0o644)
            changed = True
            report.note(f"installed {dst}")
    _run(["systemd-sysusers", str(targets[source / "zoned.sysusers.conf"])])
    _run(["systemd-tmpfiles", "--create", str(targets[source / "zoned.tmpfiles.conf"])])
    if changed:
        _run(["systemctl", "daemon-reload"])
    report.note(
        "zoned.service and zoned-image-helper.socket installed"
        " (enable both once /opt/zoned/venv holds zoned)"
    )


def ensure_libvirt(report: Report, facts: HostFacts, qemu_conf_changed: bool) -> None:
    sup_pid = supervisor_pid()
    action = decide_libvirt_action(
        systemd_pid1=facts.systemd_pid1,
        qemu_conf_changed=qemu_conf_changed,
        supervisor_alive=sup_pid is not None,
        # Under systemd the answer does not change the decision: skip the probe.
        libvirt_answers=not facts.systemd_pid1 and libvirt_answers(),
    )
    report.note(f"libvirt: {action.value}")
    if action is LibvirtAction.NOTHING and sup_pid is None:
        report.note(
            "note: libvirtd runs outside zoned.supervisor; if its reaper is slow, zone "
            "destroys are slow. Stop it and re-run host setup to supervise it."
        )
    if action in (LibvirtAction.SYSTEMD_ENABLE, LibvirtAction.SYSTEMD_RESTART):
        _run(["systemctl", "enable", "--now", "virtlogd.socket", "libvirtd.socket", "libvirtd"])
        if action is LibvirtAction.SYSTEMD_RESTART:
            _run(["systemctl", "restart", "libvirtd"])
        install_systemd_units(report)
        wait_for_libvirt(report, "systemd")
    elif action is LibvirtAction.RESTART_SUPERVISED:
        assert sup_pid is not None
        old_libvirtd = _read_pid(LIBVIRTD_PIDFILE)
        os.kill(sup_pid, signal.SIGHUP)
        wait_for_new_libvirtd(old_libvirtd)
        wait_for_libvirt(report, f"restarted by supervisor pid {sup_pid}")
    elif action is LibvirtAction.WAIT:
        wait_for_libvirt(report, f"supervisor pid {sup_pid}")
    elif action is LibvirtAction.START_SUPERVISOR:
        stop_foreign_daemons(report)
        pid = start_supervisor(report)
        wait_for_libvirt(report, f"supervisor pid {pid}")


def setup(report: Report) -> None:
    """Every step, in order; each is idempotent."""
    if os.geteuid() != 0:
        raise SetupError("host setup must run as root")
    config = ensure_config(report)
    ensure_users(report, config.socket_group)
    ensure_kvm_device(report)
    facts = probe_host()
    report.note(
        f"host: systemd={facts.systemd_pid1} apparmor={facts.apparmor} "
        f"selinux={facts.selinux} mount-namespaces={facts.mount_namespaces}"
    )
    ensure_directories(report, zoned_directories(config))
    ensure_libvirt_domains_dir(report)
    changed = write_qemu_conf(report, render_qemu_conf(facts))
    ensure_libvirt(report, facts, changed)
    ensure_default_image_in_store(report, config)


def ensure_default_image_in_store(report: Report, config: Config) -> None:
    """The default workload image (Debian bookworm with python3) in the image store.

    Built once with mmdebstrap from the host's apt sources (about 25 s on an
    idle host, minutes on a busy one) and kept: later runs find it and do
    nothing. A zone that names no image runs it.
    """
    from zoned.images.default import ensure_default_image
    from zoned.images.helper import store_for

    if config.default_image != "default":
        report.note(f"default image: the config names {config.default_image!r}; not built")
        return
    store = store_for(Path(config.image_store), config.max_image_mib)
    started = time.monotonic()
    result = ensure_default_image(store)
    info = result.info
    size = info.record.rootfs.size / 1e6
    if result.built:
        report.note(
            f"default image: built {', '.join(info.tags)} ({info.id[:19]}, {size:.0f} MB)"
            f" in {time.monotonic() - started:.0f} s"
        )
    else:
        report.note(f"default image: {', '.join(info.tags)} ({info.id[:19]}) already in place")


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # no options yet; the config file carries the paths
    report = Report()
    try:
        setup(report)
    except (SetupError, OSError, ZonedError) as exc:
        print(f"host-setup: FAILED: {exc}", file=sys.stderr)
        return 1
    print("host-setup: done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
