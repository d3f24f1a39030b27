"""``python -m authz`` runs :func:`authz.tools.cli.main`."""

import sys

from authz.tools.cli import main

sys.exit(main())
