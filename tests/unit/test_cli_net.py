"""zonectl's network options without a daemon: create/run --net and --publish,
net set's rules and publishes, and the usage errors that change nothing."""

from __future__ import annotations

import pytest

from zoned.cli.args import parse_args
from zoned.cli.commands import zone_options


def test_create_and_run_take_networks_and_publishes() -> None:
    args = parse_args(
        ["create", "web", "--net", "pypi.org", "--net", "*.pythonhosted.org:443", "-p", "8080:80"]
    )
    options = zone_options(args)
    assert (options["net"], options["publishes"]) == (
        "pypi.org,*.pythonhosted.org:443",
        ["8080:80"],
    )
    plain = zone_options(parse_args(["create", "plain"]))
    assert (plain["net"], plain["publishes"]) == (None, [])
    run = parse_args(["run", "--net", "open", "--", "python3", "fetch.py"])
    assert (zone_options(run)["net"], run.argv) == ("open", ["python3", "fetch.py"])


def test_net_set_takes_rules_and_or_publishes() -> None:
    args = parse_args(["net", "set", "web", "open"])
    assert (args.name, args.rules, args.publishes) == ("web", "open", None)
    args = parse_args(["net", "set", "web", "--publish", "127.0.0.1:8081:80"])
    assert (args.rules, args.publishes) == (None, ["127.0.0.1:8081:80"])
    args = parse_args(["net", "set", "web", "none", "--no-publish"])
    assert (args.rules, args.publishes) == ("none", [])
    assert parse_args(["net", "show", "web"]).net_command == "show"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["net", "set", "web"], "give the new rules, --publish or --no-publish"),
        (["net", "set", "web", "--no-publish", "-p", "1:2"], "contradict each other"),
        (["net", "set"], "ZONE"),
        (["net"], "ACTION"),
    ],
)
def test_net_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
