"""Where nl_rewrite keeps things that are expensive to rebuild (converted models, trained coders).

Read at call time, never at import time, so tests can point it elsewhere with an env var.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache root: ``$NL_REWRITE_CACHE``, else ``$XDG_CACHE_HOME/nl_rewrite``, else ``~/.cache/nl_rewrite``."""
    explicit = os.environ.get("NL_REWRITE_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nl_rewrite"
    root.mkdir(parents=True, exist_ok=True)
    return root
