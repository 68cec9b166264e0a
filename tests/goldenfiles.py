"""Golden files: what a renderer writes, compared with tests/golden/<name>.

Set ``UPDATE_GOLDEN=1`` to rewrite the files from the current renderers;
review the diff before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def assert_matches_golden(rendered: str, filename: str) -> None:
    """``rendered`` is the text of tests/golden/``filename`` (which UPDATE_GOLDEN=1 rewrites)."""
    golden = GOLDEN_DIR / filename
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(rendered)
    assert golden.exists(), f"{golden} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert rendered == golden.read_text()
