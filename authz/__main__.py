"""``python -m authz`` runs :func:`authz.tools.cli.main` (the ``authz`` console script)."""

from __future__ import annotations

import sys

from authz.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
