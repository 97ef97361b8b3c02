"""Content digests. Every cache key, fingerprint and identity in the package is a SHA-256 digest made here, so all are
made one way; a digest already stored in a file is unchanged by going through this function."""

from __future__ import annotations

import hashlib


def digest(*parts: bytes | str, length: int | None = 16) -> str:
    """Hex SHA-256 of ``parts`` concatenated (text as UTF-8), cut to ``length`` characters (None: all 64)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    full = h.hexdigest()
    return full if length is None else full[:length]
