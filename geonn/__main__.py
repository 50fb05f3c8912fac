"""``python -m geonn`` (and ``torchrun -m geonn ...``) runs the ``geonn`` command."""

import sys

from .cli import main

sys.exit(main())
