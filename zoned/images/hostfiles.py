"""What the image builders take from this host: busybox, the base interpreter, libraries.

Both images a zone boots with are made of host files: the agent's boot
image (:mod:`zoned.images.bootimage`) and the built-in workload root
(:mod:`zoned.images.workloadroot`). This module finds those files and their
shared-library closure, the same way for both. It runs host tools
(``busybox --list-full``, ``ldd``, the interpreter itself): call it from a
worker thread in the daemon.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from zoned.errors import InternalError

#: The workload's tools: a static busybox (Debian's ``busybox-static``).
BUSYBOX = Path("/bin/busybox")


class ImageBuildError(InternalError):
    """An image cannot be built on this host: a tool or file is missing or fails.

    A host setup mistake, not the caller's: it carries the ``internal`` code.
    """


def base_interpreter() -> Path:
    """The real file of the daemon's base interpreter (outside any venv)."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    return Path(os.path.realpath(executable))


def stdlib_dir(interpreter: Path) -> Path:
    """The standard library directory of ``interpreter``, as it reports it."""
    result = subprocess.run(
        [
            str(interpreter),
            "-I",
            "-S",
            "-c",
            "import sysconfig; print(sysconfig.get_path('stdlib'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(f"{interpreter} cannot name its stdlib: {result.stderr.strip()}")
    return Path(result.stdout.strip())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def busybox_binary(busybox: Path = BUSYBOX) -> Path:
    """The host's static busybox; :class:`ImageBuildError` if it is missing."""
    if not busybox.is_file():
        raise ImageBuildError(
            f"{busybox} is missing: install Debian's busybox-static (the zones' shell and tools)"
        )
    return busybox


def busybox_applets(busybox: Path) -> list[str]:
    """The applet paths ``busybox --list-full`` names, relative (``bin/sh``, ``usr/bin/env``)."""
    result = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, check=False, env={"LC_ALL": "C"}
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"{busybox} --list-full failed: {result.stderr.decode(errors='replace').strip()}"
        )
    applets = []
    for line in result.stdout.decode().splitlines():
        path = line.strip().strip("/")
        parts = path.split("/")
        if not path or any(part in ("", ".", "..") for part in parts):
            raise ImageBuildError(f"{busybox} --list-full: unexpected applet path {line!r}")
        applets.append(path)
    return applets


def shared_libraries(binaries: Iterable[Path]) -> list[Path]:
    """The shared-library closure of ``binaries`` (dynamic loader included), by ``ldd``."""
    binaries = list(binaries)
    result = subprocess.run(
        ["ldd", *map(str, binaries)], capture_output=True, check=False, env={"LC_ALL": "C"}
    )
    if result.returncode != 0:
        raise ImageBuildError(f"ldd failed: {result.stderr.decode(errors='replace').strip()}")
    return parse_ldd(result.stdout.decode())


def parse_ldd(output: str) -> list[Path]:
    """Library paths in ``ldd`` output (one or several binaries), without duplicates (pure)."""
    libraries: dict[str, None] = {}
    for raw_line in output.splitlines():
        line = raw_line.strip()
        if not line or line.endswith(":") or "statically linked" in line:
            continue
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.strip()
            if target.startswith("not found"):
                raise ImageBuildError(f"shared library {name.strip()} not found")
            path = target.split(" (", 1)[0].strip()
        else:
            path = line.split(" (", 1)[0].strip()
        if path.startswith("/"):
            libraries[path] = None
    return [Path(p) for p in libraries]
