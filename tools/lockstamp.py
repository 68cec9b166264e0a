"""The stamp that ties the lock files to pyproject.toml's dependency lists.

``tools/lock`` writes it into each lock file's header; ``tests/unit/test_lock.py``
recomputes it, so that a dependency changed in pyproject.toml without a new
lock fails the suite. Only the lists that the lock is made from count
(dependencies, the optional extras, the build requirements), normalised, so
editing anything else in pyproject.toml needs no new lock.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def dependency_lists(pyproject: Path) -> dict[str, list[str]]:
    data = tomllib.loads(pyproject.read_text())
    project = data.get("project", {})
    lists = {"dependencies": sorted(project.get("dependencies", []))}
    for extra, requirements in sorted(project.get("optional-dependencies", {}).items()):
        lists[f"extra:{extra}"] = sorted(requirements)
    lists["build-system"] = sorted(data.get("build-system", {}).get("requires", []))
    build_in = pyproject.parent / "requirements" / "build.in"
    if build_in.exists():
        lines = (line.split("#", 1)[0].strip() for line in build_in.read_text().splitlines())
        lists["build.in"] = sorted(line for line in lines if line)
    return lists


def stamp(pyproject: Path = REPO / "pyproject.toml") -> str:
    canonical = json.dumps(dependency_lists(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


if __name__ == "__main__":
    print(stamp(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "pyproject.toml"))
