"""The workload root: what processes in a zone see, built from this host.

The staging tree is checked by really running its programs (chrooted, as
the agent will), and the image by fsck.erofs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.chroot import chroot
from zoned.images import workloadroot
from zoned.images.hostfiles import base_interpreter


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workloadroot") / "root"
    root.mkdir()
    workloadroot._stage(root, base_interpreter())
    return root


def test_python_with_its_standard_library_runs_in_the_root(staged: Path) -> None:
    script = (
        "import json, sqlite3, hashlib, ssl, subprocess, asyncio, zlib, ctypes, decimal, csv;"
        "print(json.dumps({'sum': 2 + 2}), sqlite3.sqlite_version_info >= (3,), "
        "hashlib.sha256(b'').hexdigest()[:8])"
    )
    result = chroot(staged, "/usr/bin/python3", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['{"sum":', "4}", "True", "e3b0c442"]


def test_stdlib_is_precompiled_and_trimmed(staged: Path) -> None:
    stdlib = next(staged.glob("**/lib/python3.*/os.py")).parent
    assert list((stdlib / "json" / "__pycache__").glob("*.pyc"))
    for excluded in ("test", "idlelib", "tkinter", "ensurepip", "site-packages"):
        assert not (stdlib / excluded).exists(), excluded


def test_a_posix_shell_and_the_usual_utilities(staged: Path) -> None:
    result = chroot(
        staged, "/bin/sh", "-c", "echo hi | tr a-z A-Z; id -un; ls /etc | sort | head -3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["HI", "root", "group", "hosts", "os-release"]
    for applet in ("bin/sh", "bin/ls", "usr/bin/env", "bin/tar", "usr/bin/sha256sum"):
        assert (staged / applet).is_symlink(), applet


def test_image_builds_once_and_checks_clean(tmp_path: Path) -> None:
    image = workloadroot.build_workload_root(tmp_path)
    assert image.name.startswith("workload-") and image.suffix == ".erofs"
    assert workloadroot.build_workload_root(tmp_path) == image  # cached by key
    assert oct(image.stat().st_mode & 0o777) == "0o644"
    check = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    listing = subprocess.run(
        ["dump.erofs", "--path=/usr/bin/python3", "-s", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
