"""The import rules of the layer map in ``zoned/__init__.py``, read from the sources."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import zoned

PACKAGE = Path(zoned.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def in_agent(module: str) -> bool:
    return module == "zoned.agent" or module.startswith("zoned.agent.")


SOURCES = {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def importers_of(prefix: str) -> set[str]:
    return {
        module
        for module, names in SOURCES.items()
        if any(name == prefix or name.startswith(prefix + ".") for name in names)
    }


def test_the_sources_were_read() -> None:
    assert {"zoned.zones", "zoned.lifecycle", "zoned.agent.init"} <= set(SOURCES)


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        ("libvirt", {"zoned.virt"}),
        ("pyudev", {"zoned.hostwatch"}),
        ("mcp", {"zoned.mcp.server"}),
        ("mcp_types", {"zoned.mcp.server"}),
        ("h11", {"zoned.httpserve", "zoned.localdaemon"}),
        ("prometheus_client", {"zoned.metrics"}),
    ],
)
def test_one_shell_module_wraps_each_untyped_library(library: str, allowed: set[str]) -> None:
    assert importers_of(library) == allowed


def test_the_agent_imports_only_the_wire_from_the_host_side() -> None:
    def allowed(name: str) -> bool:
        if name in ("zoned", "zoned.__version__"):
            return True
        return any(
            name == wire or name.startswith(wire + ".")
            for wire in ("zoned.errors", "zoned.protocol", "zoned.credit")
        ) or in_agent(name)

    for module, names in SOURCES.items():
        if not in_agent(module):
            continue
        ours = {n for n in names if n == "zoned" or n.startswith("zoned.")}
        outside = {n for n in ours if not allowed(n)}
        assert not outside, f"{module} imports {sorted(outside)}"
        assert "trio" not in names, module


def test_only_the_boot_image_builder_imports_the_agents_modules() -> None:
    importers = {m for m in importers_of("zoned.agent.init") if not in_agent(m)}
    assert importers == {"zoned.images.bootimage"}
    for module, names in SOURCES.items():
        if in_agent(module) or module == "zoned.images.bootimage":
            continue
        agent_modules = {n for n in names if n.startswith("zoned.agent.")}
        # From the package itself, only its constants.
        assert agent_modules <= {"zoned.agent.AGENT_PORT_NAME", "zoned.agent.AGENT_NAME"}, module


def test_clients_do_not_import_the_daemon() -> None:
    daemon = ("zoned.virt", "zoned.zones", "zoned.daemon", "zoned.server", "zoned.workloads")
    for module, names in SOURCES.items():
        if not module.startswith(("zoned.client", "zoned.cli", "zoned.mcp")):
            continue
        bad = {n for n in names if n.startswith(daemon) or n == "libvirt"}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_the_e2b_endpoint_reaches_the_daemon_only_through_its_protocol() -> None:
    daemon = ("zoned.virt", "zoned.zones", "zoned.daemon", "zoned.server", "zoned.workloads")
    for module, names in SOURCES.items():
        if module.startswith("zoned.e2b"):
            bad = {n for n in names if n.startswith(daemon) or n == "libvirt"}
            assert not bad, f"{module} imports {sorted(bad)}"
    assert {m for m in importers_of("zoned.e2b") if not m.startswith("zoned.e2b")} == {
        "zoned.daemon"
    }
