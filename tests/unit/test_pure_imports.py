"""The pure core stays pure: each of its modules, imported alone in a fresh
interpreter, loads none of trio, libvirt, subprocess or socket (nor pyudev,
psutil). The layer map in ``zoned/__init__.py`` names these modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE_MODULES = [
    "zoned",
    "zoned.errors",
    "zoned.protocol",
    "zoned.lifecycle",
    "zoned.conversation",
    "zoned.access",
    "zoned.zoneids",
    "zoned.probecache",
    "zoned.records",
    "zoned.placement",
    "zoned.topology",
    "zoned.domain",
    "zoned.kernel.cmdline",
    "zoned.kernel.kconfig",
    "zoned.cpio",
    "zoned.credit",
    "zoned.sizes",
    "zoned.failures",
    "zoned.net",
    "zoned.net.policy",
    "zoned.net.sniff",
    "zoned.net.addressing",
    "zoned.net.nftrules",
    "zoned.net.pins",
    "zoned.net.accounting",
    "zoned.net.wire",
    "zoned.e2b",
    "zoned.e2b.connectrpc",
    "zoned.e2b.envd",
    "zoned.e2b.api",
]
FORBIDDEN = ("trio", "libvirt", "libvirtmod", "subprocess", "socket", "pyudev", "psutil")

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.argv[2:] if m in sys.modules)))
"""


@pytest.mark.parametrize("module", PURE_MODULES)
def test_a_pure_module_imports_no_io(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, module, *FORBIDDEN],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], f"{module} loads {result.stdout.strip()}"


def test_the_probe_sees_what_an_impure_module_loads() -> None:
    """The check itself can fail: zoned.server really is IO."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, "zoned.server", *FORBIDDEN],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert {"trio", "socket"} <= set(json.loads(result.stdout))
