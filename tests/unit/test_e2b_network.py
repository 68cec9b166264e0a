"""The SDK's network options narrowed onto a template's allowance (zoned.e2b.network).

Bodies are what the e2b SDK itself builds (its ``build_network_config``),
decoded as the endpoint decodes a create.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from e2b.api.client.models import SandboxDetail
from e2b.sandbox.network import ALL_TRAFFIC
from e2b.sandbox.sandbox_api import build_network_config, from_client_network_config

from tests.unit.test_e2b_wire import SANDBOX_RECORD
from tests.unit.test_mcp_labels import zone as zone_info
from zoned.config import E2bTemplate
from zoned.e2b import api, network
from zoned.net.policy import NetPolicy, RefusedRange, parse_policy

LIST = ["allowed.test:80,443", "*.pythonhosted.org:443", "203.0.113.0/24", "10.1.0.0/16"]
HOST = [RefusedRange("198.18.5.0/24", "host-network")]


def sdk_body(**options: Any) -> api.NewSandbox:
    """A create body as the SDK sends it (``network`` through its own builder)."""
    body: dict[str, Any] = {"templateID": "t"}
    if "allow_internet_access" in options:
        body["allow_internet_access"] = options["allow_internet_access"]
    if "network" in options:
        built = build_network_config(options["network"])
        assert built is not None
        from e2b.api.client.models import SandboxNetworkConfig

        body["network"] = SandboxNetworkConfig(**built).to_dict()
    decoded: api.NewSandbox = api.decode_body(msgspec.json.encode(body), api.NewSandbox)
    return decoded


def policy_of(template: list[str] | None, **options: Any) -> list[str] | None:
    body = sdk_body(**options)
    made = network.sandbox_policy(
        "t",
        network.template_policy(template),
        body.allow_internet_access,
        body.network,
        HOST,
    )
    return None if made is None else made.describe()


def refused(template: list[str] | None, words: str, **options: Any) -> None:
    with pytest.raises(api.ApiError) as raised:
        policy_of(template, **options)
    assert raised.value.status == 400
    assert words in raised.value.message, raised.value.message


def test_allow_internet_access_gets_the_templates_network_or_none() -> None:
    assert policy_of(LIST, allow_internet_access=True) == LIST
    assert policy_of(["open"], allow_internet_access=True) == ["open"]
    assert policy_of(LIST, allow_internet_access=False) is None
    assert policy_of(LIST) is None  # zoned's default: no network
    assert policy_of(None) is None
    assert policy_of(None, allow_internet_access=False) is None
    refused(None, "template 't' allows no network", allow_internet_access=True)


def test_allow_out_with_all_traffic_denied_narrows_the_template() -> None:
    deny_all = {"deny_out": [ALL_TRAFFIC]}
    # An entry without ports (as E2B writes them) gets the template's ports.
    assert policy_of(LIST, network={"allow_out": ["allowed.test"], **deny_all}) == [
        "allowed.test:80,443"
    ]
    assert policy_of(LIST, network={"allow_out": ["x.pythonhosted.org"], **deny_all}) == [
        "x.pythonhosted.org:443"
    ]
    assert policy_of(LIST, network={"allow_out": ["allowed.test:443"], **deny_all}) == [
        "allowed.test:443"
    ]
    assert policy_of(
        LIST, network={"allow_out": ["x.pythonhosted.org:443", "203.0.113.7"], **deny_all}
    ) == ["x.pythonhosted.org:443", "203.0.113.7/32"]
    # The template opened 10.1/16 itself: a part of it may be asked for.
    assert policy_of(LIST, network={"allow_out": ["10.1.2.0/24:443"], **deny_all}) == [
        "10.1.2.0/24:443"
    ]
    # The SDK's callable selectors and allow_internet_access=False deny all the same.
    assert policy_of(
        LIST, network={"allow_out": ["allowed.test:80"], "deny_out": lambda ctx: [ctx.all_traffic]}
    ) == ["allowed.test:80"]
    assert policy_of(
        LIST, allow_internet_access=False, network={"allow_out": ["allowed.test:80"]}
    ) == ["allowed.test:80"]
    # Under "open": names and public networks, TCP.
    assert policy_of(
        ["open"], network={"allow_out": ["example.com", "*.example.org", "8.8.8.0/24"], **deny_all}
    ) == ["example.com", "*.example.org", "8.8.8.0/24"]
    # Nothing allowed and everything denied: no network.
    assert policy_of(LIST, network={"deny_out": [ALL_TRAFFIC]}) is None


def test_allow_out_without_a_deny_is_the_template_and_must_still_lie_inside_it() -> None:
    assert policy_of(LIST, network={"allow_out": ["allowed.test"]}) == LIST
    # Without allow_out and deny_out, allow_internet_access alone decides.
    assert policy_of(LIST, network={"dns_servers": ["1.1.1.1"]}) is None
    assert policy_of(LIST, allow_internet_access=True, network={"dns_servers": []}) == LIST
    assert policy_of(LIST, network={"allow_public_traffic": False}) is None
    refused(LIST, "outside what template 't' allows", network={"allow_out": ["blocked.test"]})
    refused(None, "allows no network", network={"allow_out": ["allowed.test"]})


@pytest.mark.parametrize(
    ("template", "entry", "words"),
    [
        (LIST, "blocked.test", "does not allow that name"),
        (LIST, "allowed.test:8443", "does not allow that name"),
        (LIST, "*.test", "does not allow that name"),
        (LIST, "pythonhosted.org:443", "does not allow that name"),
        (LIST, "x.pythonhosted.org:80,443", "does not allow that name"),
        (LIST, "203.0.0.0/16", "does not allow that network"),
        (LIST, "udp://203.0.113.5:123", "does not allow that network"),
        (LIST, "10.2.0.0/24", "refused range 10.0.0.0/8"),
        (LIST, "0.0.0.0/0", "does not allow that network"),
        (["open"], "10.1.2.3", "refused range 10.0.0.0/8"),
        (["open"], "169.254.169.254", "refused range 169.254.0.0/16"),
        (["open"], "127.0.0.1", "refused range 127.0.0.0/8"),
        (["open"], "fd00::/64", "refused range fc00::/7"),
        (["open"], "198.18.5.7", "refused range 198.18.5.0/24"),  # the host's network
        (["open"], "printer.lan", "does not allow that name"),
        (["open"], "*.internal", "does not allow that name"),
        (["open"], "udp://8.8.8.8:53", "does not allow that network"),
        (["0.0.0.0/0"], "10.0.0.0/8", "refused range 10.0.0.0/8"),
        (["allowed.test"], "203.0.113.7", "does not allow that network"),
        (["203.0.113.0/24"], "allowed.test", "does not allow that name"),
    ],
)
def test_an_entry_outside_the_template_is_refused(
    template: list[str], entry: str, words: str
) -> None:
    refused(template, words, network={"allow_out": [entry], "deny_out": [ALL_TRAFFIC]})


@pytest.mark.parametrize(
    ("net", "words"),
    [
        ({"allow_out": ["a b"]}, "network.allowOut entry 'a b'"),
        ({"allow_out": ["x.test"], "deny_out": ["1.1.1.1"]}, "only all traffic"),
        ({"egress_proxy": {"address": "p:1080"}}, "network.egressProxy is not supported"),
        ({"mask_request_host": "${PORT}-x"}, "network.maskRequestHost is not supported"),
        ({"allow_public_traffic": True}, "network.allowPublicTraffic is not supported"),
        ({"rules": {"x.test": [{}]}}, "network.rules is not supported"),
    ],
)
def test_what_cannot_be_said_is_refused(net: dict[str, Any], words: str) -> None:
    refused(LIST, words, network=net)


def test_malformed_network_bodies_are_refused() -> None:
    for bad in ({"allowOut": "x.test"}, {"allowOut": [1]}, {"allowOut": ["x"] * 300}):
        with pytest.raises(api.ApiError) as raised:
            network.sandbox_policy("t", parse_policy(LIST), None, bad)
        assert raised.value.status == 400


def test_a_bad_template_net_is_a_config_error() -> None:
    assert E2bTemplate(net=["open"]).net == ["open"]
    with pytest.raises(ValueError, match="e2b template net"):
        msgspec.convert({"net": ["udp://x.test"]}, E2bTemplate)
    assert network.template_policy(None) is None
    assert network.template_policy([]) == NetPolicy()


def test_get_info_reports_the_zones_network_as_the_sdk_reads_it() -> None:
    record = SANDBOX_RECORD
    zone = zone_info("e2b-x", {api.SANDBOX_LABEL: "base"})
    cases: list[tuple[list[str] | None, bool, dict[str, list[str]] | None]] = [
        (None, False, None),
        (
            ["allowed.test:443"],
            True,
            {"allow_out": ["allowed.test:443"], "deny_out": [ALL_TRAFFIC]},
        ),
        (["open"], True, {"allow_out": []}),
    ]
    for net, access, info in cases:
        detail = SandboxDetail.from_dict(api.detail(record, msgspec.structs.replace(zone, net=net)))
        assert detail.allow_internet_access is access
        assert from_client_network_config(detail.network) == info
