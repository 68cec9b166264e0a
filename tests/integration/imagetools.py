"""Images made in the test by real tools (umoci, skopeo, GNU tar, docker-registry),
and a look into a converted root file system through a real read-only mount."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOLS = {
    "umoci": "umoci",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "mkfs.erofs": "erofs-utils",
    "fsck.erofs": "erofs-utils",
    "zstd": "zstd",
    "openssl": "openssl",
    "tar": "tar",
    "mmdebstrap": "mmdebstrap",
}


def require_tools(*names: str) -> None:
    """Fail (never skip) when a tool these tests need is missing."""
    if os.geteuid() != 0:
        pytest.fail("image tests convert as root (owners, device nodes): run them as root")
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        packages = sorted({TOOLS.get(n, n) for n in missing})
        pytest.fail(f"missing {', '.join(missing)}: apt-get install {' '.join(packages)}")


def run(*argv: str | Path, timeout: float = 300, input: bytes | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        timeout=timeout,
        check=False,
        input=input,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
            f"{result.stderr.decode(errors='replace')}"
        )
    return result.stdout.decode(errors="replace")


@dataclass
class Layout:
    """An OCI layout with one tagged image, built with umoci."""

    path: Path
    tag: str = "latest"

    @property
    def image(self) -> str:
        return f"{self.path}:{self.tag}"

    def create(self) -> Layout:
        if not (self.path / "index.json").exists():
            run("umoci", "init", "--layout", self.path)
        run("umoci", "new", "--image", self.image)
        return self

    @contextlib.contextmanager
    def edit(self) -> Iterator[Path]:
        """Unpack the image, let the test change the tree, repack it as a new layer."""
        bundle = self.path.parent / f"bundle-{self.tag}"
        run("umoci", "unpack", "--image", self.image, bundle)
        yield bundle / "rootfs"
        run("umoci", "repack", "--image", self.image, bundle)
        shutil.rmtree(bundle)

    def insert(self, source: Path, target: str, *, opaque: bool = False) -> None:
        run(
            "umoci",
            "insert",
            *(["--opaque"] if opaque else []),
            "--image",
            self.image,
            source,
            target,
        )

    def whiteout(self, target: str) -> None:
        run("umoci", "insert", "--image", self.image, "--whiteout", target)

    def add_raw_layer(self, tar: Path) -> None:
        run("umoci", "raw", "add-layer", "--image", self.image, tar)

    def config(self, *options: str) -> None:
        run("umoci", "config", "--image", self.image, *options)

    def gc(self) -> None:
        run("umoci", "gc", "--layout", self.path)

    def manifest(self) -> dict[str, object]:
        index = json.loads((self.path / "index.json").read_text())
        entry = next(
            m
            for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == self.tag
        )
        return json.loads(self.blob(entry["digest"]).read_text())  # type: ignore[no-any-return]

    def blob(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def layer_digests(self) -> list[str]:
        layers = self.manifest()["layers"]
        assert isinstance(layers, list)
        return [layer["digest"] for layer in layers]


def skopeo_copy(source: str, destination: str, *options: str) -> None:
    run("skopeo", "copy", "--quiet", *options, source, destination)


@contextlib.contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    """``image`` mounted read-only (loop, nosuid, nodev) at ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "erofs", "-o", "ro,loop,nosuid,nodev", image, where)
    try:
        yield where
    finally:
        run("umount", where)


@dataclass(frozen=True)
class Node:
    """What a tree holds at one path, as comparable values."""

    kind: str
    mode: int
    uid: int
    gid: int
    content: str  # sha256 of a file, a symlink's target, a device's numbers
    size: int
    xattrs: tuple[tuple[str, bytes], ...]
    mtime: int


def _xattrs(path: Path, kind: str) -> tuple[tuple[str, bytes], ...]:
    if kind not in ("file", "dir"):
        return ()
    return tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)))


def snapshot(root: Path, *, mtimes: bool = True) -> dict[str, Node]:
    """Every entry under ``root`` (not following links) with its metadata and content."""
    nodes: dict[str, Node] = {}
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                kind, content = "dir", ""
            elif stat.S_ISLNK(st.st_mode):
                kind, content = "symlink", os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                kind = "file"
                content = (
                    hashlib.sha256(path.read_bytes()).hexdigest() if st.st_size < 2**26 else ""
                )
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "char" if stat.S_ISCHR(st.st_mode) else "block"
                content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                kind, content = "fifo", ""
            nodes[rel] = Node(
                kind=kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                content=content,
                size=st.st_size if kind == "file" else 0,
                xattrs=_xattrs(path, kind),
                mtime=int(st.st_mtime) if mtimes and kind != "dir" else 0,
            )
    return nodes


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    """Paths that share an inode, for every inode with more than one path."""
    by_inode: dict[int, set[str]] = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                by_inode.setdefault(st.st_ino, set()).add(str(path.relative_to(root)))
    return {frozenset(paths) for paths in by_inode.values()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    """A real docker-registry on 127.0.0.1, its storage in the test's tmp."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_data(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return (
            self.root
            / "storage/docker/registry/v2/blobs/sha256"
            / hexdigest[:2]
            / hexdigest
            / "data"
        )


@contextlib.contextmanager
def registry(tmp: Path, auth: Mapping[str, object] | None = None) -> Iterator[Registry]:
    """Start docker-registry (``auth``: its config's ``auth`` section), stop it after."""
    port = free_port()
    storage = tmp / "storage"
    storage.mkdir(parents=True)
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "zoned-test"},
    }
    if auth is not None:
        config["auth"] = auth
    config_file = tmp / "config.yml"
    config_file.write_text(json.dumps(config))  # YAML is a superset of JSON
    log = open(tmp / "registry.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config_file)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(200):
            if process.poll() is not None:
                pytest.fail(f"docker-registry exited:\n{(tmp / 'registry.log').read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"docker-registry did not listen on {port} within 10 s")
        yield Registry(tmp, port, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def write_tar(path: Path, entries: Sequence[tuple[object, bytes | None]]) -> Path:
    """A tar of ``(TarInfo, data)`` pairs: how hostile layers are made."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            assert isinstance(info, tarfile.TarInfo)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path
