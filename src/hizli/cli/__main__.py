"""``python -m hizli.cli ...`` runs the ``hizli`` command."""

import sys

from hizli.cli import main

sys.exit(main())
