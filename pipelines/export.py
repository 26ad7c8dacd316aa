#!/usr/bin/env python
"""`pconv export` as a script, for `ray job submit -- python pipelines/export.py ...`: see pconv.commands.export."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pconv first (ray job submit --working-dir .)
from pconv.commands.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
