"""``python -m zoned.mcp``: the same as ``zoned-mcp``."""

import sys

from zoned.mcp import main

sys.exit(main())
