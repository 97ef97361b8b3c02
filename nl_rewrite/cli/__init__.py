"""The ``nl-rewrite`` command line: :mod:`.main` builds the parser, and each subcommand (``train``, ``cache``,
``explain``, ``score``, ``evaluate``, ``layers``, ``run``, ``generate``, ``serve``) lives in its own module that adds
its parser and returns an exit code. Option parsing from config dataclasses is in :mod:`.parsing`. Nothing here is
library API: use the top-level :mod:`nl_rewrite` names from Python.
"""
