"""``python -m hsoftmax``: the ``hsoftmax`` command."""

import sys

from hsoftmax.cli import main

sys.exit(main())
