"""Register postload's production blocks from environment variables: ``python blocks/register.py``.

Reads the variables listed in ``blocks/README.md`` (or a ``.env`` file in the current folder) and
creates or updates each block group whose variables are complete, against the Prefect API of the
current profile (``PREFECT_API_URL``). Safe to re-run.

Exit code: 0 when every group is registered, unchanged or simply not configured (the embedded
default needs no block); 1 when a group is incomplete, invalid or could not be saved.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import postload  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postload.blocks import format_report, register_blocks
from postload.config import Settings


def main() -> int:
    report = register_blocks(Settings())
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
