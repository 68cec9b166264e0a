"""The e2b SDK's network options on real zones, against the tests' own internet.

One private zoned with its E2B endpoint on a loopback port and one
template, ``web``, whose network is an allow-list (``allowed.test:80,443``);
the internet is the tests' own (namespaces joined to the host,
tests/integration/networld.py: web servers, DNS for their names). One
sandbox, created with ``allow_internet_access=True``, is shared: it reaches
the allowed name and is refused another; requests that would widen the
template are refused with the SDK's exception and create nothing.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2b import Sandbox, SandboxException
from e2b.sandbox.network import ALL_TRAFFIC

from tests.integration.conftest import private_zoned
from tests.integration.networld import HostInternet, internet_on_host
from tests.integration.test_e2b import KEY_A, _free_port, _sha, sdk_pointed_at, zones_of
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

CA_PATH = "/tmp/test-ca.pem"
# Each attempt prints "ok <body>" or the error's name.
FETCH = """
import json, ssl, sys, urllib.request
def get(url):
    ctx = ssl.create_default_context(cafile="/tmp/test-ca.pem")
    try:
        body = urllib.request.urlopen(url, timeout=10, context=ctx).read().decode().strip()
        return "ok " + body
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
print(json.dumps({url: get(url) for url in sys.argv[1:]}))
"""


@dataclass(frozen=True)
class NetEndpoint:
    daemon: LocalDaemon
    internet: HostInternet


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetEndpoint]:
    port = _free_port()
    with internet_on_host(tmp_path_factory.mktemp("internet")) as internet:
        root = Path(tempfile.mkdtemp(prefix="zoned-", dir="/tmp"))
        extra = f"""
net_upstream_dns = ["{internet.dns}"]
agent_silence_s = 120.0

[e2b]
enabled = true
listen = "127.0.0.1:{port}"

[e2b.templates.web]
net = ["allowed.test:80,443"]

[e2b.templates.sealed]

[[e2b.keys]]
name = "a"
key_sha256 = "{_sha(KEY_A)}"
owner = "nobody"
"""
        with (
            sdk_pointed_at(f"http://127.0.0.1:{port}"),
            private_zoned("e2bn-", root, extra_config=extra) as daemon,
        ):
            yield NetEndpoint(daemon, internet)


@pytest.fixture(scope="module")
def sandbox(endpoint: NetEndpoint) -> Iterator[Sandbox]:
    sbx = Sandbox.create(template="web", timeout=900, allow_internet_access=True, api_key=KEY_A)
    try:
        sbx.files.write(CA_PATH, endpoint.internet.ca.read_bytes())
        yield sbx
    finally:
        Sandbox.kill(sbx.sandbox_id, api_key=KEY_A)


def fetch(sandbox: Sandbox, *urls: str) -> dict[str, str]:
    sandbox.files.write("/tmp/fetch.py", FETCH)
    result = sandbox.commands.run("python3 /tmp/fetch.py " + " ".join(urls), timeout=120)
    answer = json.loads(result.stdout)
    assert isinstance(answer, dict)
    return answer


def test_allow_internet_access_reaches_what_the_template_allows_and_nothing_else(
    sandbox: Sandbox, endpoint: NetEndpoint
) -> None:
    web_a = endpoint.internet.web_a
    answer = fetch(
        sandbox,
        "https://allowed.test/e2b",
        "http://allowed.test/plain",
        "https://blocked.test/",
        "http://allowed.test:8443/",
        f"http://{web_a}/",
    )
    assert answer["https://allowed.test/e2b"] == f"ok {web_a} allowed.test /e2b", answer
    assert answer["http://allowed.test/plain"] == f"ok {web_a} allowed.test /plain", answer
    # Off the list: the name is not resolved, the port and the bare address refused.
    assert "Name or service not known" in answer["https://blocked.test/"], answer
    for refused in ("http://allowed.test:8443/", f"http://{web_a}/"):
        assert not answer[refused].startswith("ok"), answer


def test_get_info_reports_the_network(sandbox: Sandbox) -> None:
    info = sandbox.get_info()
    assert info.allow_internet_access is True
    assert info.network == {"allow_out": ["allowed.test:80,443"], "deny_out": [ALL_TRAFFIC]}


def test_requests_that_widen_the_template_are_refused_and_create_nothing(
    sandbox: Sandbox, endpoint: NetEndpoint
) -> None:
    zones = zones_of(endpoint.daemon)
    with pytest.raises(
        SandboxException, match=re.escape("'blocked.test' is outside what template 'web'")
    ):
        Sandbox.create(
            template="web",
            network={"allow_out": ["blocked.test"], "deny_out": [ALL_TRAFFIC]},
            api_key=KEY_A,
        )
    with pytest.raises(SandboxException, match=re.escape("refused range 169.254.0.0/16")):
        Sandbox.create(
            template="web",
            network={"allow_out": ["169.254.169.254"], "deny_out": [ALL_TRAFFIC]},
            api_key=KEY_A,
        )
    with pytest.raises(SandboxException, match="template 'sealed' allows no network"):
        Sandbox.create(template="sealed", allow_internet_access=True, api_key=KEY_A)
    with pytest.raises(SandboxException, match="only all traffic"):
        Sandbox.create(template="web", network={"deny_out": ["1.1.1.1"]}, api_key=KEY_A)
    with pytest.raises(SandboxException, match="update_network is not supported"):
        sandbox.update_network({"allow_out": ["blocked.test"], "deny_out": [ALL_TRAFFIC]})
    assert zones_of(endpoint.daemon) == zones
    assert sandbox.get_info().network == {
        "allow_out": ["allowed.test:80,443"],
        "deny_out": [ALL_TRAFFIC],
    }
