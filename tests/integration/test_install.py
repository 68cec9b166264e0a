"""A host's install from the lock alone (tools/install-locked, as docs/host-setup.md
says for /opt/zoned/venv): a fresh venv gets exactly the lock's pins, hashes
checked, and zoned itself installed (not the checkout) whose commands run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_lock import LOCKS, pins
from zoned import __version__

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "tools" / "install-locked"
#: pip with a warm cache takes ~10 s; a cold one fetches from PyPI and builds libvirt-python.
INSTALL_TIMEOUT_S = 900


def install(venv: Path, lock: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), str(venv), lock],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )


def installed(venv: Path) -> dict[str, str]:
    done = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = {}
    for line in done.stdout.splitlines():
        name, _, version = line.partition("==")
        found[name.lower().replace("_", "-")] = version
    return found


def run_outside(venv: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``venv``'s ``command`` run away from the checkout (another directory, no
    PYTHONPATH), so that only what is installed in the venv can be imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [venv / "bin" / command, *args],
        capture_output=True,
        text=True,
        cwd=venv.parent,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("lock", "command"), [("runtime", "zoned"), ("mcp", "zoned-mcp")])
def test_a_host_install_is_the_lock_and_nothing_else(
    tmp_path: Path, lock: str, command: str
) -> None:
    venv = tmp_path / "venv"
    first = install(venv, lock)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = pins(LOCKS[lock]) | pins(LOCKS["build"]) | {"zoned": __version__}
    got = installed(venv)
    got.pop("pip")  # the venv's own, from python3 -m venv
    assert got == expected

    # The installed copy, not the checkout, is what runs.
    where = run_outside(
        venv, "python", "-c", "import zoned.daemon, zoned.cli; print(zoned.__file__)"
    )
    assert where.returncode == 0 and where.stdout.startswith(str(venv)), where
    for name in (command, "zonectl"):
        usage = run_outside(venv, name, "--help")
        assert usage.returncode == 0 and "usage:" in usage.stdout, usage

    # Again with the locks unchanged: pip is not asked for them, but zoned's copy
    # is made anew from the checkout (which may have moved on at the same version).
    copy = Path(where.stdout.strip()).parent / "cli" / "__init__.py"
    copy.write_text("raise SystemExit('the old copy')\n")
    again = install(venv, lock)
    assert again.returncode == 0 and "is up to date" in again.stdout, again
    assert copy.read_text() == (REPO / "zoned" / "cli" / "__init__.py").read_text()


def test_a_lock_it_does_not_know_is_refused_and_nothing_is_made(tmp_path: Path) -> None:
    done = install(tmp_path / "venv", "newest")
    assert done.returncode == 2 and "usage:" in done.stderr, done
    assert not (tmp_path / "venv").exists()
