"""Registry pulls from a real docker-registry started here on loopback: anonymous,
basic (htpasswd) and bearer-token auth, by tag and by digest; tampered blobs and
manifests in the registry's storage are refused and leave the store as it was."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.imagetools import Layout, Registry, registry, require_tools, run, skopeo_copy
from zoned.images.errors import ImageAccessDenied, ImageNotFound, InvalidImage
from zoned.images.sources import RegistryAuth, RegistrySource
from zoned.images.store import ImageStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # bcrypt through libxcrypt: docker-registry's htpasswd format

SERVICE = "zoned-test"
ISSUER = "zoned-test-issuer"


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    require_tools("umoci", "skopeo", "docker-registry", "mkfs.erofs", "openssl")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    work = tmp_path_factory.mktemp("layout")
    made = Layout(work / "oci", "v1").create()
    with made.edit() as root:
        (root / "etc").mkdir()
        (root / "etc/hello").write_text("from the registry\n")
    with made.edit() as root:
        (root / "etc/second").write_text("layer two\n")
    made.config("--config.cmd=/bin/true")
    made.gc()
    return made


@pytest.fixture
def anonymous(tmp_path: Path) -> Iterator[Registry]:
    with registry(tmp_path / "registry") as running:
        yield running


def push(layout: Layout, reg: Registry, name: str, *options: str) -> None:
    skopeo_copy(
        f"oci:{layout.image}", f"docker://{reg.address}/{name}", "--dest-tls-verify=false", *options
    )


def registry_manifest(reg: Registry, name: str) -> bytes:
    """The manifest the registry serves for ``name``, as bytes."""
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.address}/{name}"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout


def registry_manifest_digest(reg: Registry, name: str) -> str:
    return f"sha256:{hashlib.sha256(registry_manifest(reg, name)).hexdigest()}"


def assert_store_empty(store: ImageStore) -> None:
    assert store.list_images() == []
    assert list(store.scratch_dir.iterdir()) == []
    assert list(store.roots.iterdir()) == []
    assert list(store.blobs.iterdir()) == []


def assert_pull_refused(tmp_path: Path, reference: str, problem: str) -> None:
    store = ImageStore(tmp_path / "store")
    with pytest.raises(InvalidImage) as caught:
        store.import_image(RegistrySource(reference=reference, tls_verify=False))
    assert caught.value.code == "invalid_request"
    assert caught.value.image == reference
    assert problem in caught.value.problem
    assert_store_empty(store)


def test_anonymous_pull_by_tag_then_by_digest(
    layout: Layout, anonymous: Registry, tmp_path: Path
) -> None:
    push(layout, anonymous, "test/app:v1")
    store = ImageStore(tmp_path / "store")
    reference = f"{anonymous.address}/test/app:v1"
    first = store.import_image(RegistrySource(reference=reference, tls_verify=False))
    assert first.converted
    assert first.info.tags == [reference]
    digest = registry_manifest_digest(anonymous, "test/app:v1")
    assert first.info.record.repo_digests == [f"{anonymous.address}/test/app@{digest}"]
    by_digest = store.import_image(
        RegistrySource(reference=f"{anonymous.address}/test/app@{digest}", tls_verify=False)
    )
    assert not by_digest.converted and by_digest.info.id == first.info.id
    assert store.resolve(f"{anonymous.address}/test/app@{digest}").id == first.info.id
    assert store.verify_rootfs(first.info.id) == store.rootfs_file(first.info.id)


def test_a_tampered_layer_in_the_registry_is_refused(
    layout: Layout, anonymous: Registry, tmp_path: Path
) -> None:
    push(layout, anonymous, "test/app:v1")
    manifest = json.loads(registry_manifest(anonymous, "test/app:v1"))
    data = anonymous.blob_data(manifest["layers"][-1]["digest"])
    tampered = bytearray(data.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    data.write_bytes(bytes(tampered))
    assert_pull_refused(tmp_path, f"{anonymous.address}/test/app:v1", "digest mismatch")


def test_a_manifest_that_does_not_match_its_digest_is_refused(
    layout: Layout, anonymous: Registry, tmp_path: Path
) -> None:
    push(layout, anonymous, "test/app:v1")
    digest = registry_manifest_digest(anonymous, "test/app:v1")
    data = anonymous.blob_data(digest)
    document = json.loads(data.read_bytes())
    document["annotations"] = {"tampered": "yes"}
    data.write_bytes(json.dumps(document).encode())
    assert_pull_refused(tmp_path, f"{anonymous.address}/test/app@{digest}", "digest")


def test_references_that_do_not_resolve(
    layout: Layout, anonymous: Registry, tmp_path: Path
) -> None:
    push(layout, anonymous, "test/app:v1")
    store = ImageStore(tmp_path / "store")
    missing = [
        f"{anonymous.address}/test/app:nope",
        f"{anonymous.address}/test/other:v1",
        f"{anonymous.address}/test/app@sha256:{'0' * 64}",
    ]
    with registry(tmp_path / "closed") as closed:
        closed_address = closed.address
    missing.append(f"{closed_address}/test/app:v1")  # nothing listens there any more
    for reference in missing:
        with pytest.raises(ImageNotFound) as caught:
            store.import_image(RegistrySource(reference=reference, tls_verify=False))
        assert caught.value.code == "not_found"
        assert caught.value.message.startswith(f"image {reference}: does not resolve")
    assert_store_empty(store)
    pulled = store.import_image(
        RegistrySource(reference=f"{anonymous.address}/test/app:v1", tls_verify=False)
    )
    assert pulled.converted  # the store is still fully usable


def test_basic_auth_with_a_user_name_and_password(layout: Layout, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"tester:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    auth = {"htpasswd": {"realm": "zoned-test", "path": str(htpasswd)}}
    with registry(tmp_path / "registry", auth) as reg:
        push(layout, reg, "test/private:v1", "--dest-creds=tester:s3cret")
        store = ImageStore(tmp_path / "store")
        reference = f"{reg.address}/test/private:v1"
        for credentials in (None, RegistryAuth(username="tester", password="wrong")):
            with pytest.raises(ImageAccessDenied) as caught:
                store.import_image(
                    RegistrySource(reference=reference, tls_verify=False, auth=credentials)
                )
            assert caught.value.code == "permission_denied"
        assert_store_empty(store)
        pulled = store.import_image(
            RegistrySource(
                reference=reference,
                tls_verify=False,
                auth=RegistryAuth(username="tester", password="s3cret"),
            )
        )
        assert pulled.info.tags == [reference]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_token(key: Path, cert: Path, repository: str, actions: list[str]) -> str:
    """A registry bearer token (an RS256 JWT with the certificate in x5c), signed by openssl."""
    der = subprocess.run(
        ["openssl", "x509", "-in", cert, "-outform", "DER"], capture_output=True, check=True
    ).stdout
    now = int(time.time())
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
    claims = {
        "iss": ISSUER,
        "sub": "tester",
        "aud": SERVICE,
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 3600,
        "jti": f"zoned-{now}",
        "access": [{"type": "repository", "name": repository, "actions": actions}],
    }
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", key],
        input=signing_input.encode(),
        capture_output=True,
        check=True,
    ).stdout
    return f"{signing_input}.{_b64url(signature)}"


def test_token_auth_with_a_bearer_token(layout: Layout, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    run(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", f"/CN={ISSUER}", "-keyout", key, "-out", cert,
    )  # fmt: skip
    auth = {
        "token": {
            "realm": "http://127.0.0.1:9/token",  # never asked: clients bring their token
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(cert),
        }
    }
    with registry(tmp_path / "registry", auth) as reg:
        writer = mint_token(key, cert, "test/tokened", ["pull", "push"])
        push(layout, reg, "test/tokened:v1", f"--dest-registry-token={writer}")
        store = ImageStore(tmp_path / "store")
        reference = f"{reg.address}/test/tokened:v1"
        other = mint_token(key, cert, "test/other", ["pull"])  # a token for another repository
        with pytest.raises(ImageAccessDenied):
            store.import_image(
                RegistrySource(
                    reference=reference, tls_verify=False, auth=RegistryAuth(registry_token=other)
                )
            )
        reader = mint_token(key, cert, "test/tokened", ["pull"])
        pulled = store.import_image(
            RegistrySource(
                reference=reference, tls_verify=False, auth=RegistryAuth(registry_token=reader)
            )
        )
        assert pulled.converted and pulled.info.tags == [reference]
