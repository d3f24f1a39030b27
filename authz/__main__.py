"""``python -m authz`` runs :func:`authz.cli.main`."""

import sys

from authz.cli import main

sys.exit(main())
