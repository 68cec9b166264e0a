"""Host setup's pure decisions: qemu.conf, what to do about libvirtd, directories."""

from __future__ import annotations

import itertools
import re
import tomllib

import msgspec
import pytest

from zoned.config import Config
from zoned.hostsetup import (
    MANAGED_MARKER,
    HostFacts,
    LibvirtAction,
    decide_libvirt_action,
    domains_dir_mode,
    is_managed,
    kvm_device_needs_fix,
    qemu_conf_settings,
    render_default_config,
    render_qemu_conf,
    zoned_directories,
)

ALL_FACTS = [HostFacts(*combo) for combo in itertools.product([False, True], repeat=4)]
_SETTING = re.compile(r'^(\w+) = ("[^"]*"|\d+|\[[^\]]*\])$')


def parse_qemu_conf(text: str) -> dict[str, object]:
    """Parse the subset of libvirt's conf syntax we write; anything else fails the test."""
    settings: dict[str, object] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SETTING.match(line)
        assert match is not None, f"unexpected line in qemu.conf: {line!r}"
        key, raw = match.groups()
        assert key not in settings, f"{key} set twice"
        # The subset (strings, integers, lists of strings) reads the same as TOML.
        settings[key] = tomllib.loads(f"v = {raw}")["v"]
    return settings


@pytest.mark.parametrize("facts", ALL_FACTS, ids=repr)
def test_qemu_conf_always_runs_qemu_unprivileged(facts: HostFacts) -> None:
    text = render_qemu_conf(facts)
    assert is_managed(text)
    settings = parse_qemu_conf(text)
    assert settings["user"] == "libvirt-qemu"
    assert settings["group"] == "kvm"
    # Nothing of a zone is ever handed to QEMU's uid (zoned.domain).
    assert settings["dynamic_ownership"] == 0
    assert settings["remember_owner"] == 0
    assert settings["seccomp_sandbox"] == 1
    assert settings["stdio_handler"] == "logd"


@pytest.mark.parametrize("facts", ALL_FACTS, ids=repr)
def test_qemu_conf_follows_the_host(facts: HostFacts) -> None:
    settings = parse_qemu_conf(render_qemu_conf(facts))
    assert settings["namespaces"] == (["mount"] if facts.mount_namespaces else [])
    if facts.apparmor or facts.selinux:
        assert "security_driver" not in settings  # libvirt picks the LSM driver
    else:
        assert settings["security_driver"] == "none"


def test_qemu_conf_rendering_is_deterministic() -> None:
    facts = HostFacts(systemd_pid1=False, apparmor=False, selinux=False, mount_namespaces=True)
    assert render_qemu_conf(facts) == render_qemu_conf(facts)


def test_only_our_qemu_conf_counts_as_managed() -> None:
    assert is_managed(MANAGED_MARKER + "\nuser = 'x'\n")
    assert not is_managed("# Master configuration file for the QEMU driver.\n")
    assert not is_managed("\n" + MANAGED_MARKER)


@pytest.mark.parametrize(
    ("systemd_pid1", "changed", "supervised", "answers", "expected"),
    [
        # Without systemd: (changed, supervised, answers) decide.
        (False, False, False, True, LibvirtAction.NOTHING),
        (False, False, False, False, LibvirtAction.START_SUPERVISOR),
        (False, True, False, True, LibvirtAction.START_SUPERVISOR),
        (False, True, False, False, LibvirtAction.START_SUPERVISOR),
        (False, False, True, True, LibvirtAction.NOTHING),
        (False, False, True, False, LibvirtAction.WAIT),
        (False, True, True, True, LibvirtAction.RESTART_SUPERVISED),
        (False, True, True, False, LibvirtAction.RESTART_SUPERVISED),
        # Under systemd it is left to systemd, whatever runs or answers.
        *[
            (True, changed, supervised, answers, expected)
            for changed, expected in [
                (False, LibvirtAction.SYSTEMD_ENABLE),
                (True, LibvirtAction.SYSTEMD_RESTART),
            ]
            for supervised, answers in itertools.product([False, True], repeat=2)
        ],
    ],
)
def test_libvirt_action(
    systemd_pid1: bool, changed: bool, supervised: bool, answers: bool, expected: LibvirtAction
) -> None:
    action = decide_libvirt_action(
        systemd_pid1=systemd_pid1,
        qemu_conf_changed=changed,
        supervisor_alive=supervised,
        libvirt_answers=answers,
    )
    assert action is expected


def test_directories_qemu_opens_files_under_are_traversable_but_not_listable() -> None:
    config = Config()
    specs = {str(spec.path): spec for spec in zoned_directories(config)}
    for path in (config.state_dir, config.kernel_store, config.image_cache, config.runtime_dir):
        assert specs[path].mode & 0o001, f"QEMU (libvirt-qemu) cannot traverse {path}"
    for path in (config.state_dir, config.runtime_dir, config.log_dir):
        assert not specs[path].mode & 0o006, f"{path} is listable or writable by anybody"
        assert specs[path].group == config.socket_group
    assert specs[config.log_dir].mode == 0o750


def test_directories_follow_the_config() -> None:
    config = Config(
        state_dir="/srv/z",
        kernel_store="/srv/z/k",
        image_cache="/srv/z/i",
        runtime_dir="/run/z",
        log_dir="/srv/log",
        socket_path="/run/zsock/zoned.sock",
        socket_group="ops",
    )
    paths = {str(spec.path): spec for spec in zoned_directories(config)}
    assert {"/srv/z", "/srv/z/k", "/srv/z/i", "/run/z", "/srv/log", "/run/zsock"} <= set(paths)
    assert paths["/run/zsock"].group == "ops"


def test_default_config_file_parses_to_the_defaults() -> None:
    text = render_default_config()
    assert msgspec.convert(tomllib.loads(text), Config) == Config()
    # Every setting is listed; uncommenting all of them changes nothing.
    uncommented = "\n".join(
        line[2:] if re.match(r"# \w+ = ", line) else line for line in text.splitlines()
    )
    raw = tomllib.loads(uncommented)
    assert set(raw) == set(Config.__struct_fields__)
    assert msgspec.convert(raw, Config) == Config()


@pytest.mark.parametrize(
    ("mode", "gid", "needs_fix"),
    [
        (0o020600, 0, True),  # container default: root:root 0600
        (0o020600, 107, True),  # right group, no group access
        (0o020660, 107, True),  # Debian's udev rule: zones' QEMUs have no group kvm
        (0o020666, 107, False),  # systemd's upstream default
        (0o020666, 0, True),
    ],
)
def test_kvm_device_access(mode: int, gid: int, needs_fix: bool) -> None:
    assert kvm_device_needs_fix(mode, gid, kvm_gid=107) is needs_fix


@pytest.mark.parametrize(
    ("mode", "wanted"),
    [(0o750, 0o751), (0o755, 0o755), (0o700, 0o701), (0o2750, 0o2751), (0o777, 0o775)],
)
def test_libvirts_domain_directory_becomes_traversable_by_others(mode: int, wanted: int) -> None:
    """Debian's 0750 keeps a zone's uid from its own master key; others may not write."""
    assert domains_dir_mode(mode) == wanted


def test_only_a_changed_setting_restarts_libvirtd() -> None:
    """qemu.conf comments change with zoned's wording; libvirtd need not restart for them."""
    text = render_qemu_conf(ALL_FACTS[0])
    reworded = text.replace("# QEMU never runs as root.", "# QEMU does not run as root.")
    assert reworded != text
    assert qemu_conf_settings(reworded) == qemu_conf_settings(text)
    changed = text.replace("dynamic_ownership = 0", "dynamic_ownership = 1")
    assert qemu_conf_settings(changed) != qemu_conf_settings(text)
