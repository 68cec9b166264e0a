"""The lock files agree with pyproject.toml, and this environment was installed from them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCKS = {name: REPO / "requirements" / f"{name}.txt" for name in ("runtime", "mcp", "dev", "build")}
LOCK_TOOL = REPO / "requirements" / "lock-tool.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def _lockstamp() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockstamp", REPO / "tools" / "lockstamp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(lock: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if match := PIN.match(line):
            found[canonicalize_name(match[1])] = match[2]
    return found


def hashed_pins(lock: Path) -> set[str]:
    """Names of the pins that carry at least one sha256 hash."""
    text = lock.read_text()
    return {
        canonicalize_name(match[1])
        for match in re.finditer(
            r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+ \\\n\s+--hash=sha256:", text, re.M
        )
    }


def project() -> dict[str, list[str]]:
    """What each lock must hold: the runtime dependencies; those and the mcp
    extra; those and every extra (--all-extras)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = data["optional-dependencies"]
    runtime = data["dependencies"]
    return {
        "runtime": runtime,
        "mcp": runtime + extras["mcp"],
        "dev": runtime + [req for reqs in extras.values() for req in reqs],
    }


def test_every_lock_carries_the_stamp_of_pyproject() -> None:
    want = _lockstamp().stamp(REPO / "pyproject.toml")
    for name, lock in LOCKS.items():
        header = lock.read_text().splitlines()[:3]
        assert f"# pyproject-stamp: {want}" in header, (
            f"requirements/{name}.txt is out of date with pyproject.toml: run bash tools/lock"
        )


def test_every_dependency_is_pinned_within_its_range() -> None:
    for kind, requirements in project().items():
        lock = pins(LOCKS[kind])
        for text in requirements:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            assert name in lock, f"{requirement.name} is not in requirements/{kind}.txt"
            assert requirement.specifier.contains(lock[name], prereleases=True), (
                f"requirements/{kind}.txt pins {name}=={lock[name]}, outside {requirement}"
            )


def test_every_lock_is_the_dev_lock_s_versions() -> None:
    # What a host installs (runtime, mcp) is what the tests ran on, never other versions.
    dev = pins(LOCKS["dev"])
    for kind in ("runtime", "mcp", "build"):
        differ = {
            name: (version, dev.get(name))
            for name, version in pins(LOCKS[kind]).items()
            if dev.get(name) != version
        }
        assert not differ, f"requirements/{kind}.txt and dev.txt disagree: {differ}"
    assert pins(LOCKS["runtime"]).items() <= pins(LOCKS["mcp"]).items()


def test_every_pin_has_hashes() -> None:
    for name, lock in {**LOCKS, "lock-tool": LOCK_TOOL}.items():
        unhashed = set(pins(lock)) - hashed_pins(lock)
        assert not unhashed, f"requirements/{name}.txt pins without hashes: {sorted(unhashed)}"


def test_this_environment_is_what_the_dev_lock_pins() -> None:
    # tools/host-setup installs from the lock; a drifted environment would
    # make a green run here mean nothing on a fresh machine.
    drifted = {}
    for name, version in pins(LOCKS["dev"]).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            drifted[name] = (version, installed)
    assert not drifted, f"installed packages differ from requirements/dev.txt: {drifted}"
