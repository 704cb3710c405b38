"""``python -m peftkit`` runs the ``peftkit`` command."""

import sys

from peftkit.cli import main

sys.exit(main())
