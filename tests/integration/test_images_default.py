"""The default image: Debian bookworm minbase with python3, built by mmdebstrap from
this host's apt sources, imported like any other image; a second call does nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.imagetools import mounted, require_tools
from zoned.images.default import DEFAULT_ALIAS, DEFAULT_TAG, DefaultImage, ensure_default_image
from zoned.images.imageconfig import process_for
from zoned.images.store import ImageStore


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageStore, DefaultImage]:
    require_tools("mmdebstrap", "skopeo", "mkfs.erofs", "zstd")
    store = ImageStore(tmp_path_factory.mktemp("default") / "store")
    result = ensure_default_image(store)
    print(f"default image: {result.timings}, {result.info.record.rootfs.size} bytes")
    return store, result


def test_it_is_built_once_and_tagged(built: tuple[ImageStore, DefaultImage]) -> None:
    store, first = built
    assert first.built
    assert first.info.tags == ["default:latest", "zoned/default:bookworm"]
    again = ensure_default_image(store)
    assert not again.built and again.info.id == first.info.id
    assert store.resolve(DEFAULT_ALIAS).id == store.resolve(DEFAULT_TAG).id == first.info.id
    assert list(store.scratch_dir.iterdir()) == []


def test_it_is_bookworm_with_python3(
    built: tuple[ImageStore, DefaultImage], tmp_path: Path
) -> None:
    store, result = built
    with mounted(Path(result.info.rootfs_path), tmp_path / "mnt") as mnt:
        assert "VERSION_CODENAME=bookworm" in (mnt / "etc/os-release").read_text()
        assert (mnt / "usr/share/doc").is_dir() and not list((mnt / "usr/share/man").glob("man1/*"))
        ran = subprocess.run(
            [
                "/usr/sbin/chroot",
                str(mnt),
                "/usr/bin/python3",
                "-c",
                "import sys, ssl; print(sys.version_info[:2])",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "(3, 11)"
        assert (mnt / "dev/null").is_char_device()  # mmdebstrap's nodes, under /dev
    record = result.info.record
    spec = process_for(DEFAULT_TAG, record.config, record.accounts)
    assert spec.argv == ["/bin/bash"] and spec.cwd == "/" and spec.uid == 0
    assert "LANG=C.UTF-8" in spec.env and "HOME=/root" in spec.env
    nobody = process_for(DEFAULT_TAG, record.config, record.accounts, user="nobody", args=["id"])
    assert (nobody.uid, nobody.gid) == (65534, 65534)
    assert store.verify_rootfs(result.info.id)
