"""The workload root: the filesystem that processes in a zone see.

The zone's boot image (:mod:`zoned.images.bootimage`) holds only the guest agent:
its interpreter, the few modules it imports, and nothing for workloads. What
workloads run in is this separate, read-only EROFS image, attached to every
zone as a virtio disk. The agent mounts it under a tmpfs overlay (writes go
to guest RAM and vanish with the zone) and starts every process in it, in
its sandbox (:mod:`zoned.agent.sandbox`).

Zones run OCI images now (the default is a Debian image, docs/images.md);
this root stays as the image a zone can name ``builtin``: a small, fast
fallback that needs no image store, and the benchmarks' baseline
(``tools/bench-images``). Its run settings are :data:`BUILTIN_CONFIG`.

Contents (built on the host, once, cached by content):

- Debian's static busybox at ``/bin/busybox`` with a symlink for each applet
  (``/bin/sh``, ``/bin/ls``, ``/usr/bin/env``...);
- the host's base Python interpreter at its own path, its shared-library
  closure (and that of every extension module) at the paths ``ldd`` found,
  ``/usr/bin/python3`` and ``/usr/bin/python3.11`` pointing at it, and its
  whole standard library minus the parts no sandboxed program needs (tests,
  IDLE, Tk, ensurepip, lib2to3), precompiled with unchecked-hash ``.pyc``
  files so that a read-only root costs no compilation at import;
- ``/etc/passwd``, ``/etc/group``, ``/etc/hosts``, ``/etc/os-release``, and
  empty mount points (``/proc``, ``/sys``, ``/dev``, ``/tmp``, ``/root``...).

The image is ``<cache_dir>/workload-<key>.erofs``, its sha256 recorded in
``workload-<key>.erofs.sha256`` (checked at every zone start, see
:mod:`zoned.images.integrity`; an image without one is rebuilt); ``<key>`` hashes
:data:`ROOTFS_VERSION`, this module's source, busybox's and the
interpreter's bytes and the stdlib's file list with sizes and mtimes.
Uncompressed EROFS: under TCG decompression costs more than it saves, and
the host's page cache shares the image between all zones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zoned.images import hostfiles
from zoned.images.hostfiles import (
    BUSYBOX,
    ImageBuildError,
    base_interpreter,
    busybox_applets,
    busybox_binary,
    shared_libraries,
    stdlib_dir,
)
from zoned.images.imageconfig import DEFAULT_PATH, Accounts, ImageConfig, parse_group, parse_passwd
from zoned.images.integrity import read_recorded_sha256, sha256_of, write_recorded_sha256

#: Bump when the image's layout changes in a way the inputs do not show.
ROOTFS_VERSION = 1
MKFS_EROFS = "mkfs.erofs"
#: Stdlib directories left out: tests and tools that have no use in a zone.
STDLIB_EXCLUDE = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "site-packages",
        "__pycache__",
        "pydoc_data",
    }
)
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "run", "root", "home", "mnt", "var/tmp")
ETC_FILES = {
    "etc/passwd": (
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    ),
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "etc/os-release": 'NAME="zoned workload root"\nID=zoned\n',
}


#: How the built-in root runs when named as an image (``builtin``): busybox's sh.
BUILTIN_CONFIG = ImageConfig(env=[f"PATH={DEFAULT_PATH}"], cmd=["/bin/sh"], working_dir="/")


def builtin_accounts() -> Accounts:
    """The users and groups of the built-in root (its /etc/passwd and /etc/group)."""
    return Accounts(
        users=parse_passwd(ETC_FILES["etc/passwd"]), groups=parse_group(ETC_FILES["etc/group"])
    )


def _stdlib_files(stdlib: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(stdlib):
        rel = Path(root).relative_to(stdlib)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in STDLIB_EXCLUDE and not (rel == Path(".") and d.startswith("config-"))
        )
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo", ".exe")):
                continue
            yield Path(root) / name


def cache_key(interpreter: Path) -> str:
    digest = hashlib.sha256()
    digest.update(f"rootfs-{ROOTFS_VERSION}\n".encode())
    digest.update(Path(__file__).read_bytes())
    digest.update(Path(hostfiles.__file__).read_bytes())
    for binary in (BUSYBOX, interpreter):
        digest.update(str(binary).encode() + b"\0" + binary.read_bytes())
    stdlib = stdlib_dir(interpreter)
    for path in _stdlib_files(stdlib):
        st = path.stat()
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def build_workload_root(cache_dir: Path) -> Path:
    """The workload root image, built into ``cache_dir`` unless already there."""
    busybox_binary()
    if shutil.which(MKFS_EROFS) is None:
        raise ImageBuildError(f"{MKFS_EROFS} is missing: install Debian's erofs-utils")
    interpreter = base_interpreter()
    image = cache_dir / f"workload-{cache_key(interpreter)}.erofs"
    if image.exists() and read_recorded_sha256(image) is not None:
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zoned-rootfs-", dir=cache_dir) as tmp:
        staging = Path(tmp) / "root"
        staging.mkdir()
        _stage(staging, interpreter)
        partial = Path(tmp) / "image.erofs"
        result = subprocess.run(
            [MKFS_EROFS, "--quiet", "--all-root", "-T0", str(partial), str(staging)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ImageBuildError(f"mkfs.erofs failed: {result.stderr.strip()}")
        partial.chmod(0o644)
        # The hash every zone start checks the image against (zoned.images.integrity).
        write_recorded_sha256(image, sha256_of(partial))
        os.replace(partial, image)
    return image


def _copy(source: Path, staging: Path) -> Path:
    """Copy ``source`` to the same absolute path under ``staging``."""
    dest = staging / source.relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest)
    return dest


def _symlink(staging: Path, link: str, target: str) -> None:
    path = staging / link.lstrip("/")
    if path.exists() or path.is_symlink():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def _stage(staging: Path, interpreter: Path) -> None:
    # busybox and its applets.
    _copy(BUSYBOX, staging)
    for applet in busybox_applets(BUSYBOX):
        _symlink(staging, applet, str(BUSYBOX))

    # Python: interpreter, stdlib (compiled), extension modules, libraries.
    real = interpreter.resolve()
    _copy(real, staging)
    for name in ("usr/bin/python3", "usr/bin/python3.11", "usr/bin/python"):
        _symlink(staging, name, str(real))
    stdlib = stdlib_dir(interpreter)
    binaries = [real]
    for source in _stdlib_files(stdlib):
        dest = _copy(source, staging)
        if source.suffix == ".py":
            cfile = py_compile.PycInvalidationMode.UNCHECKED_HASH
            target = Path(
                dest.parent, "__pycache__", f"{dest.stem}.{sys.implementation.cache_tag}.pyc"
            )
            # A file that does not compile (a deliberately bad one) stays source-only.
            with contextlib.suppress(py_compile.PyCompileError):
                py_compile.compile(
                    str(dest),
                    cfile=str(target),
                    dfile=str(source),
                    doraise=True,
                    invalidation_mode=cfile,
                )
        elif source.suffix == ".so":
            binaries.append(source)
    for library in shared_libraries(binaries):
        if not (staging / library.relative_to("/")).exists():
            _copy(library, staging)  # the file itself, at the path the loader asks for
    # The landmark the interpreter finds its prefix by is the stdlib's os.py: shipped.
    for directory in MOUNT_POINTS:
        (staging / directory).mkdir(parents=True, exist_ok=True)
    (staging / "tmp").chmod(0o1777)
    (staging / "var/tmp").chmod(0o1777)
    for name, text in ETC_FILES.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
