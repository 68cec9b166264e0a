"""The pure parts of the image library: references, platforms, documents, entry policy,
tool command lines, skopeo's errors."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import pytest

from zoned.errors import InvalidRequest
from zoned.images import default, erofs, layers, oci, sources
from zoned.images.errors import ImageAccessDenied, ImageNotFound, InvalidImage
from zoned.images.reference import (
    Platform,
    parse_platform,
    parse_reference,
    platform_for_machine,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "canonical", "familiar"),
    [
        ("alpine", "docker.io/library/alpine:latest", "alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19", "alpine:3.19"),
        ("team/app", "docker.io/team/app:latest", "team/app:latest"),
        (
            "docker.io/library/debian:bookworm",
            "docker.io/library/debian:bookworm",
            "debian:bookworm",
        ),
        ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
        ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
        ("ghcr.io/o/r@" + DIGEST, "ghcr.io/o/r@" + DIGEST, "ghcr.io/o/r@" + DIGEST),
        ("zoned/default:bookworm", "docker.io/zoned/default:bookworm", "zoned/default:bookworm"),
        ("default", "docker.io/library/default:latest", "default:latest"),
    ],
)
def test_references_normalise_as_docker_does(text: str, canonical: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert ref.familiar() == familiar


@pytest.mark.parametrize(
    "text",
    ["", "a/UPPER", "a//b", "a:b:c", "x@sha256:short", "x@md5:" + "a" * 32, " spaced", "a/-b"],
)
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_reference(text)


def test_platforms() -> None:
    assert platform_for_machine("x86_64") == Platform("linux", "amd64")
    assert platform_for_machine("aarch64") == Platform("linux", "arm64")
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64")
    assert str(parse_platform("linux/arm/v7")) == "linux/arm/v7"
    host = Platform("linux", "amd64")
    assert host.accepts(Platform("linux", "amd64"))
    assert host.accepts(Platform("linux", "x86_64"))
    assert not host.accepts(Platform("linux", "arm64"))
    assert not Platform("linux", "arm", "v7").accepts(Platform("linux", "arm", "v6"))
    with pytest.raises(InvalidRequest):
        parse_platform("amd64")


def descriptor(media_type: str, digest: str = DIGEST, size: int = 10) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def manifest_bytes(*, layers: list[dict[str, object]], config_type: str = oci.OCI_CONFIG) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": descriptor(config_type),
            "layers": layers,
        }
    ).encode()


def test_manifests_are_checked() -> None:
    layer = descriptor("application/vnd.oci.image.layer.v1.tar+zstd")
    manifest = oci.parse_manifest(
        "img", manifest_bytes(layers=[layer]), max_layers=4, max_blob_bytes=99
    )
    assert manifest.layers[0].media_type.endswith("zstd")
    cases = [
        (
            manifest_bytes(layers=[layer], config_type="application/vnd.cncf.helm.config"),
            "not a container image",
        ),
        (manifest_bytes(layers=[]), "no layers"),
        (manifest_bytes(layers=[layer] * 5), "5 layers"),
        (manifest_bytes(layers=[descriptor("application/wasm")]), "not a tar layer"),
        (manifest_bytes(layers=[{**layer, "size": 100}]), "claims 100 bytes"),
        (manifest_bytes(layers=[{**layer, "digest": "sha512:" + "a" * 128}]), "only sha256"),
        (b'{"schemaVersion": 1}', "schema version 1"),
        (b"not json", "not valid JSON"),
    ]
    for data, problem in cases:
        with pytest.raises(InvalidImage, match=problem):
            oci.parse_manifest("img", data, max_layers=4, max_blob_bytes=99)


def test_configs_are_checked() -> None:
    good = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [DIGEST]},
        "config": {"Cmd": ["sh"], "Env": ["A=1"]},
    }
    config = oci.parse_config("img", json.dumps(good).encode(), 1)
    assert config.platform == Platform("linux", "amd64")
    with pytest.raises(InvalidImage, match="1 layer digests, the manifest 2"):
        oci.parse_config("img", json.dumps(good).encode(), 2)
    with pytest.raises(InvalidImage, match="NUL"):
        bad = {**good, "config": {"Cmd": ["a\u0000b"]}}
        oci.parse_config("img", json.dumps(bad).encode(), 1)
    with pytest.raises(InvalidImage, match="not a valid image config"):
        oci.parse_config("img", json.dumps({"os": "linux"}).encode(), 1)


def test_index_selects_the_platform_or_says_what_it_has() -> None:
    index = oci.parse_index(
        "img",
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        **descriptor(oci.OCI_MANIFEST),
                        "platform": {"os": "linux", "architecture": "arm64"},
                    },
                    {
                        **descriptor(oci.OCI_MANIFEST, "sha256:" + "cd" * 32),
                        "platform": {"os": "linux", "architecture": "amd64"},
                    },
                ],
            }
        ).encode(),
    )
    assert (
        oci.select_manifest("img", index, Platform("linux", "amd64")).digest
        == "sha256:" + "cd" * 32
    )
    with pytest.raises(InvalidImage, match=r"no linux/s390x image .*linux/amd64, linux/arm64"):
        oci.select_manifest("img", index, Platform("linux", "s390x"))


def test_compression_is_sniffed() -> None:
    assert oci.sniff_compression(b"\x1f\x8b\x08\x00") == "gzip"
    assert oci.sniff_compression(b"\x28\xb5\x2f\xfd") == "zstd"
    assert oci.sniff_compression(b"etc/") == "none"


def member(
    name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", **attrs: int
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("./etc/passwd", ("etc", "passwd")),
        ("/abs/x", ("abs", "x")),
        ("a//b/./c/", ("a", "b", "c")),
        ("./", ()),
    ],
)
def test_entry_paths(name: str, path: tuple[str, ...]) -> None:
    assert layers.entry_path(name) == path


def test_entry_policy() -> None:
    assert layers.plan_entry(member("a/.wh.b")) == layers.Whiteout(("a", "b"))
    assert layers.plan_entry(member("a/.wh..wh..opq")) == layers.Opaque(("a",))
    assert isinstance(layers.plan_entry(member(".wh..wh.plnk/1")), layers.Create)
    assert isinstance(layers.plan_entry(member("x/.wh..wh.aufs")), layers.Ignore)
    assert layers.plan_entry(member("dev/null", tarfile.CHRTYPE)) == layers.Create(
        ("dev", "null"), "char"
    )
    assert layers.plan_entry(member("b", tarfile.LNKTYPE, "/a/x")) == layers.Create(
        ("b",), "hardlink", link_path=("a", "x")
    )
    assert layers.plan_entry(member("l", tarfile.SYMTYPE, "/etc")) == layers.Create(
        ("l",), "symlink", symlink_target="/etc"
    )
    refused = [
        (member("../escape"), "'..'"),
        (member("a/../../b"), "'..'"),
        (member("evil", tarfile.CHRTYPE), "device node outside /dev"),
        (member("dev", tarfile.BLKTYPE), "device node outside /dev"),
        (member("usr/sda", tarfile.BLKTYPE), "device node outside /dev"),
        (member("h", tarfile.LNKTYPE, "../../etc/shadow"), "hard link target"),
        (member("h", tarfile.LNKTYPE, "./"), "hard link to the image's root"),
        (member("s", tarfile.SYMTYPE, ""), "empty target"),
        (member("./", tarfile.SYMTYPE, "x"), "root replaced"),
        (member("v", b"V"), "not a file system object"),
        (member("d/.wh..."), "names no entry"),
        (member(".wh.."), "names no entry"),
        (member("x" * 300), "longer than 255"),
        (member("f", uid=2**32 - 1), "out of range"),
    ]
    for entry, problem in refused:
        with pytest.raises(layers.EntryRefused, match=problem):
            layers.plan_entry(entry)


def test_xattr_policy() -> None:
    limits = layers.LayerLimits()
    kept, dropped = layers.entry_xattrs(
        {
            "SCHILY.xattr.user.a": "1",
            "SCHILY.xattr.security.capability": "\x01\x00\udc80",
            "SCHILY.xattr.trusted.overlay.opaque": "y",
            "SCHILY.xattr.security.selinux": "ctx",
            "LIBARCHIVE.xattr.user.b%20c": "aGk",
            "path": "ignored",
        },
        limits,
    )
    assert kept == {"user.a": b"1", "security.capability": b"\x01\x00\x80", "user.b c": b"hi"}
    assert dropped == 2
    with pytest.raises(layers.EntryRefused, match="holds"):
        layers.entry_xattrs({"SCHILY.xattr.user.big": "x" * 70000}, limits)


def test_skopeo_command_lines() -> None:
    amd64 = Platform("linux", "amd64")
    dest = Path("/s/op/fetched")
    registry = sources.RegistrySource(
        reference="127.0.0.1:5000/a/b:t",
        tls_verify=False,
        auth=sources.RegistryAuth(registry_token="tok"),
    )
    assert sources.skopeo_argv(registry, dest, amd64, Path("/s/op/auth.json")) == [
        "skopeo",
        "copy",
        "--quiet",
        "--remove-signatures",
        "--override-os=linux",
        "--override-arch=amd64",
        "--src-tls-verify=false",
        "--authfile=/s/op/auth.json",
        "--src-registry-token=tok",
        "docker://127.0.0.1:5000/a/b:t",
        "dir:/s/op/fetched",
    ]
    layout = sources.OciLayoutSource(path="/x/layout", reference="v1")
    assert sources.skopeo_argv(layout, dest, Platform("linux", "arm", "v7"), None)[-3:] == [
        "--override-variant=v7",
        "oci:/x/layout:v1",
        "dir:/s/op/fetched",
    ]
    both = sources.RegistrySource(reference=f"h.example/a:v1@{DIGEST}")
    assert sources.skopeo_argv(both, dest, amd64, None)[-2] == f"docker://h.example/a@{DIGEST}"
    archive = sources.DockerArchiveSource(path="/x/a.tar", reference="app:1")
    assert sources.skopeo_argv(archive, dest, amd64, None)[-2] == (
        "docker-archive:/x/a.tar:docker.io/library/app:1"
    )


def test_passwords_go_to_an_auth_file_not_the_command_line(tmp_path: Path) -> None:
    source = sources.RegistrySource(
        reference="reg.example:5000/a/b:1",
        auth=sources.RegistryAuth(username="tester", password="s3cret"),
    )
    authfile = sources.write_authfile(source, tmp_path)
    assert authfile == tmp_path / "auth.json"
    assert oct(authfile.stat().st_mode & 0o777) == "0o600"
    auths = json.loads(authfile.read_text())["auths"]
    assert list(auths) == ["reg.example:5000"]
    assert base64.b64decode(auths["reg.example:5000"]["auth"]) == b"tester:s3cret"
    argv = sources.skopeo_argv(source, tmp_path / "d", Platform("linux", "amd64"), authfile)
    assert not any("s3cret" in arg for arg in argv)
    assert f"--authfile={authfile}" in argv
    with pytest.raises(InvalidRequest, match="user name"):
        sources.write_authfile(
            sources.RegistrySource(
                reference="r.example/a", auth=sources.RegistryAuth(password="x")
            ),
            tmp_path / "other",
        )


def test_sources_are_checked() -> None:
    for bad in (
        sources.OciLayoutSource(path="relative"),
        sources.OciLayoutSource(path="/with:colon"),
        sources.OciLayoutSource(path="/x", reference="bad name"),
        sources.DockerArchiveSource(path="/x", reference="UPPER"),
        sources.RegistrySource(reference="no spaces"),
    ):
        with pytest.raises(InvalidRequest):
            sources.check_source(bad)
    sources.check_source(sources.OciLayoutSource(path="/x", reference="1.0-rc.1"))


def test_skopeo_failures_are_classified() -> None:
    stderr = (
        'time="2026-01-01T00:00:00Z" level=fatal msg="initializing source docker://h/a:b: '
        'reading manifest b in h/a: manifest unknown: manifest unknown"\n'
    )
    message = sources.skopeo_message(stderr)
    assert message.startswith("initializing source docker://h/a:b")
    assert isinstance(sources.classify_skopeo_failure("h/a:b", message), ImageNotFound)
    assert isinstance(
        sources.classify_skopeo_failure(
            "x", "reading manifest: unauthorized: authentication required"
        ),
        ImageAccessDenied,
    )
    mismatch = sources.classify_skopeo_failure("x", "happened during read: Digest did not match")
    assert isinstance(mismatch, InvalidImage)
    assert (
        mismatch.message == "image x: digest mismatch: happened during read: Digest did not match"
    )
    assert sources.skopeo_message('level=fatal msg="say \\"hi\\""') == 'say "hi"'


def test_mkfs_command_line() -> None:
    argv = erofs.mkfs_argv(Path("/t"), Path("/o.erofs"), image_id=DIGEST, chunked=False)
    assert argv[:2] == ["mkfs.erofs", "--quiet"] and argv[-2:] == ["/o.erofs", "/t"]
    assert argv[2].startswith("-U") and "--all-root" not in argv
    assert argv == erofs.mkfs_argv(Path("/t"), Path("/o.erofs"), image_id=DIGEST, chunked=False)
    assert "--chunksize=4096" in erofs.mkfs_argv(
        Path("/t"), Path("/o"), image_id=DIGEST, chunked=True
    )


def test_default_image_documents() -> None:
    config, manifest = default.layout_documents(
        layer_digest=DIGEST,
        layer_size=5,
        diff_id=DIGEST,
        architecture="amd64",
        created="2026-01-01T00:00:00Z",
    )
    parsed_manifest = oci.parse_manifest("d", manifest, max_layers=1, max_blob_bytes=10)
    parsed_config = oci.parse_config("d", config, 1)
    assert parsed_manifest.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert parsed_config.config is not None and parsed_config.config.Cmd == ["/bin/bash"]
    assert default.mmdebstrap_argv(Path("/o.tar"), [Path("/s")], "amd64")[-3:] == [
        "bookworm",
        "/o.tar",
        "/s",
    ]


def test_host_apt_sources_are_the_enabled_ones_for_the_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# deb http://x bookworm main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nSuites: bookworm bookworm-updates\n"
    )
    (tmp_path / "sources.list.d" / "other.list").write_text("deb http://y nodistro main\n")
    (tmp_path / "sources.list.d" / "off.list.disabled").write_text("deb http://z bookworm main\n")
    assert default.host_apt_sources(apt_dir=tmp_path) == [
        tmp_path / "sources.list.d" / "debian.sources"
    ]
