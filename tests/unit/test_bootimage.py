"""The boot image builder: contents, caching, determinism, and a chroot run of its interpreter."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.chroot import chroot
from zoned.images.bootimage import AGENT_LIB_DIR, build_boot_image, cache_key
from zoned.images.hostfiles import (
    BUSYBOX,
    ImageBuildError,
    base_interpreter,
    busybox_applets,
    parse_ldd,
)

LDD_OUTPUT = """\
/usr/bin/python3.11:
\tlinux-vdso.so.1 (0x00007ffd)
\tlibpython3.11.so.1.0 => /opt/py/lib/libpython3.11.so.1.0 (0x00007f9c)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f9c)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f9c)
/opt/py/lib/python3.11/lib-dynload/_ctypes.so:
\tlinux-vdso.so.1 (0x00007ffd)
\tlibffi.so.8 => /lib/x86_64-linux-gnu/libffi.so.8 (0x00007f40)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f40)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f40)
/opt/static:
\tstatically linked
"""


def test_parse_ldd_collects_each_library_once() -> None:
    assert parse_ldd(LDD_OUTPUT) == [
        Path("/opt/py/lib/libpython3.11.so.1.0"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib64/ld-linux-x86-64.so.2"),
        Path("/lib/x86_64-linux-gnu/libffi.so.8"),
    ]


def test_parse_ldd_refuses_missing_libraries() -> None:
    with pytest.raises(ImageBuildError, match=r"libfoo\.so\.1 not found"):
        parse_ldd("\tlibfoo.so.1 => not found\n")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_boot_image(tmp_path_factory.mktemp("cache"))


def _listing(image: Path) -> list[str]:
    result = subprocess.run(
        ["cpio", "-itv", "--quiet"], stdin=image.open("rb"), capture_output=True, check=True
    )
    return result.stdout.decode().splitlines()


def _names(image: Path) -> set[str]:
    result = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=image.open("rb"), capture_output=True, check=True
    )
    return set(result.stdout.decode().splitlines())


def test_image_holds_what_the_guest_needs(image: Path) -> None:
    assert image.name.startswith("agent-")
    assert image.suffix == ".cpio"
    names = _names(image)
    interpreter = base_interpreter()
    stdlib = f"{interpreter.parent.parent}/lib/python3.11".lstrip("/")
    agent = AGENT_LIB_DIR.lstrip("/")
    for required in [
        "init",
        "dev/console",
        "dev/null",
        "dev/urandom",
        "proc",
        "sys",
        "sys/fs/cgroup",
        "tmp",
        "run",
        "usr/bin/python3",
        str(interpreter).lstrip("/"),
        "lib64/ld-linux-x86-64.so.2",
        f"{stdlib}/os.py",  # the landmark
        f"{stdlib}/encodings/__init__.pyc",
        f"{stdlib}/encodings/utf_8.pyc",
        f"{stdlib}/lib-dynload",
        f"{agent}/zoned/__init__.pyc",
        f"{agent}/zoned/errors.pyc",
        f"{agent}/zoned/protocol.pyc",
        f"{agent}/zoned/agent/__init__.pyc",
        f"{agent}/zoned/agent/init.pyc",
        f"{agent}/zoned/agent/execs.pyc",
        f"{agent}/msgspec/__init__.pyc",
        "bin/busybox",
        "bin/sh",
        "usr/bin/env",
        "usr/bin/sha256sum",
    ]:
        assert required in names, required
    assert any(n.startswith(f"{agent}/msgspec/_core.") and n.endswith(".so") for n in names)
    assert any(n.startswith(f"{stdlib}/lib-dynload/_ctypes.") for n in names)
    # What a process with a terminal needs (imported only then: see LATE_IMPORTS).
    assert any(n.startswith(f"{stdlib}/lib-dynload/fcntl.") for n in names)
    assert any(n.startswith(f"{stdlib}/lib-dynload/termios.") for n in names)
    assert any("libffi.so" in n for n in names)
    assert any("libpython3.11.so" in n for n in names)

    # Sourceless: no source but the empty landmark, and nothing frozen into the interpreter.
    sources = [n for n in names if n.endswith(".py")]
    assert sources == [f"{stdlib}/os.py"]
    for frozen in ("os", "codecs", "abc", "io", "stat", "posixpath", "site"):
        assert f"{stdlib}/{frozen}.pyc" not in names
    # Nothing from outside the agent's own dependencies.
    assert not any("typing_extensions" in n or "site-packages" in n for n in names)


def test_device_nodes_and_init(image: Path) -> None:
    entries = {line.split()[-1]: line for line in _listing(image) if " -> " not in line}
    assert entries["dev/console"].startswith("crw-------")
    assert "5,   1" in entries["dev/console"] or "5, 1" in entries["dev/console"]
    assert entries["dev/null"].startswith("crw-rw-rw-")
    assert entries["init"].startswith("-rwxr-xr-x")
    links = [line for line in _listing(image) if " -> " in line]
    assert any(line.endswith(f"usr/bin/python3 -> {base_interpreter()}") for line in links)


def test_busybox_is_the_workloads_root_and_never_replaces_the_agents_files(
    image: Path,
) -> None:
    entries = {line.split()[8]: line for line in _listing(image)}
    assert entries["bin/busybox"].startswith("-rwxr-xr-x")
    applets = busybox_applets(BUSYBOX)
    assert "bin/sh" in applets and "usr/bin/env" in applets
    links = {
        line.split()[8]: line.split(" -> ", 1)[1] for line in _listing(image) if " -> " in line
    }
    for applet in applets:
        if applet in ("init", "usr/bin/python3", "bin/busybox"):
            continue
        assert links.get(applet) == "/bin/busybox", applet
    # /init stays the agent, /usr/bin/python3 its interpreter.
    assert entries["init"].startswith("-rwxr-xr-x")
    assert links["usr/bin/python3"] == str(base_interpreter())


def test_the_cache_key_covers_busybox(tmp_path: Path) -> None:
    other = tmp_path / "busybox"
    other.write_bytes(BUSYBOX.read_bytes() + b"\0")
    interpreter = base_interpreter()
    assert cache_key(interpreter, BUSYBOX) == cache_key(interpreter, BUSYBOX)
    assert cache_key(interpreter, BUSYBOX) != cache_key(interpreter, other)


def test_second_call_reuses_the_cached_image(image: Path) -> None:
    before = image.stat()
    again = build_boot_image(image.parent)
    assert again == image
    assert (image.stat().st_ino, image.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_changed_input_file_rebuilds(tmp_path: Path) -> None:
    first = build_boot_image(tmp_path)
    manifest_path = first.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text())
    # Pretend one shipped host file (say libc) changed since the build.
    manifest["files"][0][1][0] += 1
    manifest_path.write_text(json.dumps(manifest))
    inode = first.stat().st_ino

    second = build_boot_image(tmp_path)
    assert second == first
    assert second.stat().st_ino != inode
    assert json.loads(manifest_path.read_text())["files"][0][1][0] != manifest["files"][0][1][0]


def test_builds_are_reproducible(image: Path, tmp_path: Path) -> None:
    assert build_boot_image(tmp_path).read_bytes() == image.read_bytes()


def test_the_images_interpreter_runs_the_agent_in_a_chroot(image: Path, tmp_path: Path) -> None:
    """Everything the agent imports resolves inside the image alone, from sourceless bytecode."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (chroot)", pytrace=False)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=image.open("rb"), cwd=root, check=True)
    init = (root / "init").read_text()
    assert init.startswith("#!/usr/bin/python3 -S\n")
    sys_path_line = next(line for line in init.splitlines() if line.startswith("sys.path[:]"))
    probe = (
        f"import sys\n{sys_path_line}\n"
        "import zoned.agent.init as agent\n"
        "agent.warm_up()\n"
        "for name in agent.LATE_IMPORTS: __import__(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('zoned', 'msgspec'))))\n"
        "print(agent.__spec__.origin)\n"
    )
    result = chroot(root, "/usr/bin/python3", "-S", "-c", probe, env={"HOME": "/", "TERM": "linux"})
    assert result.returncode == 0, result.stderr
    modules, origin = result.stdout.splitlines()
    assert "'zoned.protocol'" in modules
    assert "'zoned.agent.execs'" in modules
    assert "'msgspec'" in modules
    assert origin == f"{AGENT_LIB_DIR}/zoned/agent/init.pyc"

    # The workload's root: busybox's shell and tools, and python3 with its site module.
    workload = chroot(
        root,
        "/usr/bin/env",
        "-i",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "sh",
        "-c",
        "echo $((6 * 7)); printf abc | sha256sum; python3 -c 'print(2 + 2)'",
    )
    assert workload.returncode == 0, workload.stderr
    assert workload.stdout.splitlines() == [
        "42",
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -",
        "4",
    ]
