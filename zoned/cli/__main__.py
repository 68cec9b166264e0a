"""``python -m zoned.cli``: zonectl."""

import sys

from zoned.cli.entry import main

sys.exit(main())
