"""``python -m bayesrace.cli``: the ``bayesrace`` command."""

import sys

from ._main import main

sys.exit(main())
