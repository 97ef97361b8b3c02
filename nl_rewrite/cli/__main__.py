"""``python -m nl_rewrite.cli``: the ``nl-rewrite`` command."""

import sys

from nl_rewrite.cli.main import main

sys.exit(main())
