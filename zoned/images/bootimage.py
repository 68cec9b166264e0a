"""The zone's boot image: an uncompressed cpio initramfs whose /init is the guest agent.

:func:`build_boot_image` assembles it from the host: the daemon's own base
Python interpreter and its shared-library closure, the few stdlib modules the
agent imports (as sourceless ``.pyc``), the extension modules among them,
msgspec, the zoned sources the agent runs, and Debian's static busybox as the
workload's tools. Every zone boots it, so it is
kept small (it is copied into guest RAM and unpacked on every boot) and it is
uncompressed (under TCG gzip costs ~250 ms to unpack, plain cpio ~90 ms).
Binaries are shipped stripped of symbols no one links against.

Layout of the image
-------------------
- The interpreter keeps its host path (its ``RUNPATH`` then still finds
  libpython, and its prefix search still finds the stdlib beside it);
  ``/usr/bin/python3`` is a symlink to it.
- Every shared library keeps the path ``ldd`` resolved it to, the dynamic
  loader included.
- Stdlib modules keep their host path, ``.py`` replaced by ``.pyc``; the stdlib
  directory holds an empty ``os.py`` as the prefix landmark (``os`` itself, like
  every module frozen into the interpreter, is not shipped).
- msgspec and the zoned package live in :data:`AGENT_LIB_DIR`.
- ``/init`` is a Python script run with ``-S`` that sets ``sys.path`` and calls
  :func:`zoned.agent.init.main`.
- ``/dev/console`` (5, 1), ``/dev/null`` (1, 3) and ``/dev/urandom`` (1, 9)
  nodes: without a console node the kernel starts init without stdio; without
  urandom Python cannot start while the guest's CRNG is not yet ready. Empty
  mount points for the agent.
- busybox (static, from Debian's ``busybox-static``) at
  ``/bin/busybox``, and a symlink to it for every applet that
  ``busybox --list-full`` names (``bin/sh``, ``usr/bin/env``...), except
  where the image already has that path (``/init``, ``/usr/bin/python3`` and
  the agent's files always win).

The agent's files and the workload's root
-----------------------------------------
Two things share this one root today. **The agent's** files are what PID 1
runs: ``/init``, the interpreter at its host path with its shared libraries,
the stdlib modules under the interpreter's prefix, :data:`AGENT_LIB_DIR`
(msgspec and zoned), the device nodes and mount points. **The workload's
root** is what the processes started through the agent see as their
system: the busybox binary and applet symlinks, and ``/usr/bin/python3``
(which is also what the /init shebang names; workloads get the agent's
interpreter, with only the stdlib modules the agent itself needs). A real
workload image can later replace the workload's root (mounted over it, or
the agent switching into it) without touching the agent's files.

Which modules
-------------
The base interpreter is run in a subprocess with the same flags and
environment the kernel gives init, with a ``sys.path`` holding only the
stdlib, msgspec and zoned; it imports :mod:`zoned.agent.init`, the modules in
its :data:`~zoned.agent.init.LATE_IMPORTS`, runs its ``warm_up()`` and reports
``sys.modules``. Whatever that loaded from files is shipped; built-in and
frozen modules are not. Optional dependencies absent from that path
(``typing_extensions`` for msgspec) are absent in the guest too.

Caching
-------
The image is ``<cache_dir>/agent-<key>.cpio``; ``<key>`` hashes what decides
the image's contents: :data:`BUILDER_VERSION` and this module's source, the
interpreter (path and bytes), busybox (path and bytes), msgspec's files
(path, size, mtime), and the contents of the zoned sources the agent runs. Beside the image,
``agent-<key>.json`` lists every host file that went into it with its size and
mtime; the image is reused only while all of them are unchanged (a libc
security update rebuilds it). A cache hit costs a few hundred ``stat`` calls.
``agent-<key>.cpio.sha256`` records the image's own hash, which every zone
start checks (:mod:`zoned.images.integrity`); an image without one is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

import zoned
from zoned.agent import AGENT_BUSYBOX
from zoned.cpio import CpioWriter
from zoned.images import hostfiles
from zoned.images.hostfiles import (
    ImageBuildError,
    base_interpreter,
    busybox_applets,
    busybox_binary,
    sha256_file,
    shared_libraries,
)
from zoned.images.integrity import read_recorded_sha256, write_recorded_sha256

#: Bump when the image's layout changes in a way the inputs do not show.
BUILDER_VERSION = 2
#: Where msgspec and the zoned package live in the guest.
AGENT_LIB_DIR = "/usr/lib/zoned-agent"
#: The symlink the /init shebang names.
GUEST_PYTHON = "/usr/bin/python3"
#: The agent's entry module.
AGENT_MODULE = "zoned.agent.init"
#: Encodings Python may need at start-up whatever the trace's locale was.
STARTUP_MODULES = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
)
#: Empty directories of the image (mount points and scratch).
EMPTY_DIRS = ("proc", "sys", "sys/fs/cgroup", "dev", "run", "root", "etc")
#: The environment the kernel gives init (besides what the command line adds).
INIT_ENVIRONMENT = {"HOME": "/", "TERM": "linux"}
#: Where busybox lives in the guest (its applets are symlinks to it): the agent's own tools.
GUEST_BUSYBOX = AGENT_BUSYBOX

_ZONED_ROOT = Path(zoned.__file__).resolve().parent
_MSGSPEC_ROOT = Path(msgspec.__file__).resolve().parent

# Run by the base interpreter with -I -S: report every module that importing
# the agent loads. Modules loaded by start-up itself (encodings...) count too:
# the guest's start-up loads them as well. Nothing may be imported before the
# snapshot, hence __import__ and no json until after it.
_TRACE_SCRIPT = """\
import sys
sys.path[:0] = [sys.argv[1]]
for name in sys.argv[2].split(","):
    __import__(name)
sys.modules[sys.argv[3]].warm_up()
found = []
for name, module in list(sys.modules.items()):
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if name == "__main__" or origin in (None, "built-in", "frozen"):
        continue
    found.append([name, origin])
import importlib.util, json
print(json.dumps({
    "modules": found,
    "stdlib": sys._stdlib_dir,
    "magic": importlib.util.MAGIC_NUMBER.hex(),
    "version": sys.version,
}))
"""


def _stat_fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _agent_sources() -> list[Path]:
    """The zoned sources the agent runs (the trace may add more; the manifest covers those)."""
    fixed = [_ZONED_ROOT / name for name in ("__init__.py", "errors.py", "protocol.py")]
    return fixed + sorted((_ZONED_ROOT / "agent").glob("*.py"))


def cache_key(interpreter: Path, busybox: Path) -> str:
    """The hash naming the image built from this host's current inputs."""
    inputs: dict[str, object] = {
        "builder": [
            BUILDER_VERSION,
            sha256_file(Path(__file__)),
            sha256_file(Path(hostfiles.__file__)),
        ],
        "interpreter": [str(interpreter), sha256_file(interpreter)],
        "busybox": [str(busybox), sha256_file(busybox)],
        "msgspec": sorted(
            [str(p.relative_to(_MSGSPEC_ROOT)), *_stat_fingerprint(p)]
            for p in _MSGSPEC_ROOT.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ),
        "zoned": [
            [str(p.relative_to(_ZONED_ROOT)), sha256_file(p)]
            for p in _agent_sources()
            if p.exists()
        ],
    }
    encoded = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def _manifest_is_current(manifest_path: Path) -> bool:
    try:
        manifest = json.loads(manifest_path.read_text())
        return all(
            _stat_fingerprint(Path(path)) == fingerprint for path, fingerprint in manifest["files"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_boot_image(cache_dir: Path) -> Path:
    """The boot image for this host's agent, built into ``cache_dir`` unless already there.

    Returns ``<cache_dir>/agent-<key>.cpio``. Safe to call concurrently: files
    are written under temporary names and renamed into place.
    """
    interpreter = base_interpreter()
    busybox = busybox_binary()
    key = cache_key(interpreter, busybox)
    image_path = cache_dir / f"agent-{key}.cpio"
    manifest_path = cache_dir / f"agent-{key}.json"
    if (
        image_path.exists()
        and _manifest_is_current(manifest_path)
        and read_recorded_sha256(image_path) is not None
    ):
        return image_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    image, sources = _build(interpreter, busybox)
    manifest = {
        "builder": BUILDER_VERSION,
        "files": [[str(path), _stat_fingerprint(path)] for path in sorted(set(sources))],
    }
    # The hash every zone start checks the image against (zoned.images.integrity).
    write_recorded_sha256(image_path, hashlib.sha256(image).hexdigest())
    _write_atomically(image_path, image)
    _write_atomically(manifest_path, json.dumps(manifest, indent=1).encode())
    return image_path


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


class _Trace(msgspec.Struct, frozen=True):
    modules: list[tuple[str, str]]
    stdlib: str
    magic: str
    version: str


def trace_agent_modules(interpreter: Path, staging: Path) -> _Trace:
    """Run the interpreter as the guest will and report the modules the agent loads.

    ``staging`` holds only ``msgspec`` and ``zoned`` (as symlinks), so that
    nothing else on the host's paths can leak into the image.
    """
    imports = [*STARTUP_MODULES, AGENT_MODULE]
    from zoned.agent.init import LATE_IMPORTS

    imports.extend(LATE_IMPORTS)
    result = subprocess.run(
        [
            str(interpreter),
            "-I",
            "-S",
            "-c",
            _TRACE_SCRIPT,
            str(staging),
            ",".join(imports),
            AGENT_MODULE,
        ],
        env=INIT_ENVIRONMENT,
        cwd="/",
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"tracing the agent's imports with {interpreter} failed:"
            f" {result.stderr.decode(errors='replace').strip()}"
        )
    try:
        return msgspec.json.decode(result.stdout, type=_Trace)
    except msgspec.DecodeError as exc:
        raise ImageBuildError(f"tracing the agent's imports: unreadable report: {exc}") from None


def _compile(source: Path, guest_path: str, scratch: Path) -> bytes:
    """Sourceless bytecode of ``source``, naming ``guest_path`` in tracebacks."""
    cfile = scratch / "module.pyc"
    try:
        py_compile.compile(
            str(source),
            cfile=str(cfile),
            dfile=guest_path,
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
    except py_compile.PyCompileError as exc:
        raise ImageBuildError(f"cannot compile {source}: {exc.msg}") from None
    return cfile.read_bytes()


def _elf(path: Path, scratch: Path) -> bytes:
    """A binary's bytes without symbols nothing links against (libpython: 23 MB -> 6 MB).

    Uses binutils' ``strip`` when the host has it, else ships the file as it is.
    """
    strip = shutil.which("strip")
    if strip is None:
        return path.read_bytes()
    stripped = scratch / "stripped"
    result = subprocess.run(
        [strip, "--strip-unneeded", "-o", str(stripped), str(path)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"strip {path} failed: {result.stderr.decode(errors='replace').strip()}"
        )
    return stripped.read_bytes()


def _init_script(sys_path: list[str]) -> bytes:
    return f"""\
#!{GUEST_PYTHON} -S
# zoned guest agent: PID 1 of a zone. Generated by zoned.images.bootimage; do not edit.
import sys
import time

python_started = time.monotonic()

sys.path[:] = {sys_path!r}
try:
    from {AGENT_MODULE} import main
except BaseException as exc:
    import os

    os.write(1, ("zoned-agent: cannot start: %r\\n" % (exc,)).encode(errors="replace"))
    while True:  # PID 1 must never exit: the kernel would panic.
        time.sleep(3600)
main(python_started)
""".encode()


def _build(interpreter: Path, busybox: Path) -> tuple[bytes, list[Path]]:
    """The image's bytes and every host file it was made from."""
    files: dict[str, tuple[bytes, int]] = {}  # guest path -> (data, mode)
    sources: list[Path] = [interpreter, busybox]
    with tempfile.TemporaryDirectory(prefix="zoned-bootimage-") as tmp:
        scratch = Path(tmp)
        staging = scratch / "path"
        staging.mkdir()
        (staging / "msgspec").symlink_to(_MSGSPEC_ROOT)
        (staging / "zoned").symlink_to(_ZONED_ROOT)
        trace = trace_agent_modules(interpreter, staging)
        if bytes.fromhex(trace.magic) != importlib.util.MAGIC_NUMBER:
            raise ImageBuildError(
                f"{interpreter} ({trace.version}) is not the Python running the daemon"
                f" ({sys.version}): cannot compile its bytecode here"
            )
        stdlib = Path(trace.stdlib)
        extensions: list[Path] = []
        for name, origin in sorted(trace.modules):
            origin_path = Path(origin)
            if origin_path.is_relative_to(staging):
                guest = f"{AGENT_LIB_DIR}/{origin_path.relative_to(staging)}"
            elif origin_path.is_relative_to(stdlib):
                guest = origin
            else:
                raise ImageBuildError(
                    f"module {name} comes from {origin}, outside the image's path"
                )
            host = origin_path.resolve()
            sources.append(host)
            if guest.endswith(".py"):
                files[guest + "c"] = (_compile(host, guest, scratch), 0o644)
            else:
                files[guest] = (_elf(host, scratch), 0o755)
                extensions.append(host)
        for library in shared_libraries([interpreter, *extensions]):
            host = library.resolve()
            sources.append(host)
            files[str(library)] = (_elf(host, scratch), 0o755)
        files[str(interpreter)] = (_elf(interpreter, scratch), 0o755)
        # The prefix landmark; os itself is frozen into the interpreter.
        files.setdefault(str(stdlib / "os.py"), (b"", 0o644))
        dynload = stdlib / "lib-dynload"
        sys_path = [AGENT_LIB_DIR, str(stdlib), str(dynload)]
        files["/init"] = (_init_script(sys_path), 0o755)
    # The workload's root. Static: no libraries; stripped by Debian already.
    files.setdefault(GUEST_BUSYBOX, (busybox.read_bytes(), 0o755))
    applets = busybox_applets(busybox)

    out = io.BytesIO()
    archive = CpioWriter(out)
    for directory in EMPTY_DIRS:
        archive.directory(directory)
    archive.directory("tmp", mode=0o1777)
    archive.directory(str(dynload))
    archive.char_device("dev/console", 5, 1, mode=0o600)
    archive.char_device("dev/null", 1, 3, mode=0o666)
    # Python seeds its hash randomisation at start-up, before the agent can
    # mount devtmpfs: getrandom() fails with EAGAIN until the guest CRNG is
    # ready (TCG has no RDRAND), and then Python reads /dev/urandom or dies.
    archive.char_device("dev/urandom", 1, 9, mode=0o666)
    for path, (data, mode) in sorted(files.items()):
        archive.file(path, data, mode=mode)
    archive.symlink(GUEST_PYTHON, str(interpreter))
    taken = {p.strip("/") for p in [*files, *EMPTY_DIRS, "tmp", str(dynload), GUEST_PYTHON]}
    taken |= {"dev/console", "dev/null", "dev/urandom"}
    # A path under one of the image's files cannot be created (ENOTDIR).
    files_taken = {p.strip("/") for p in [*files, GUEST_PYTHON]}
    for applet in sorted(set(applets)):
        parents = {"/".join(applet.split("/")[:n]) for n in range(1, applet.count("/") + 1)}
        if applet in taken or parents & files_taken:
            continue
        archive.symlink(applet, GUEST_BUSYBOX)
    archive.finish()
    return out.getvalue(), sources
