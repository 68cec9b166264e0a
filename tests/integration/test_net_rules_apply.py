"""The golden nftables tables are accepted by the real nft, replace themselves atomically,
and delete cleanly, in a namespace of the test's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.networld import require_tools, sh

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@pytest.mark.parametrize("name", ["net-empty", "net-two-zones"])
def test_golden_table_applies_twice_and_deletes(name: str) -> None:
    require_tools()
    ns = f"znr{os.getpid() % 100000}"
    sh(["ip", "netns", "add", ns])
    try:
        nft = ["ip", "netns", "exec", ns, "nft"]
        script = (GOLDEN / f"{name}.nft").read_text()
        sh([*nft, "-f", "-"], input=script)
        first = sh([*nft, "list", "table", "inet", "zoned"]).stdout
        sh([*nft, "-f", "-"], input=script)  # replaces, does not add
        assert sh([*nft, "list", "table", "inet", "zoned"]).stdout == first
        sh([*nft, "-f", "-"], input="table inet zoned\ndelete table inet zoned\n")
        assert sh([*nft, "list", "tables"]).stdout == ""
    finally:
        sh(["ip", "netns", "del", ns])
    assert ns not in sh(["ip", "netns", "list"]).stdout
