"""``python -m modula_mhc train ...`` runs the command line (see :mod:`modula_mhc.cli`)."""
import sys

from .cli import main

sys.exit(main())
