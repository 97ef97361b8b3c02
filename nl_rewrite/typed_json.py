"""JSON read back as typed objects: pydantic checks a file's content field by field against the dataclass it was
written from, and a failure becomes the caller's error naming the file, the fields at fault and the fix.

One helper for every loader of a results file (``nl-rewrite run``'s and ``nl-rewrite evaluate``'s), so each states
only its type and its fix.
"""

from __future__ import annotations

from functools import cache
from typing import TypeVar

from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")


@cache
def adapter(kind: object) -> TypeAdapter:
    """pydantic's reader and writer of ``kind`` (built once per type: building one walks the whole tree)."""
    return TypeAdapter(kind)


def problems(exc: ValidationError, where: str = "", shown: int = 3) -> str:
    """pydantic's first few complaints, each with its place in the file: ``pool.size: Input should be ...``."""
    errors = exc.errors(include_url=False)
    lines = [f"{where}{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in errors[:shown]]
    more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return "; ".join(lines) + more


def validated(kind: type[T], data: object, error: type[Exception], what: str, fix: str = "", where: str = "") -> T:
    """``data`` (parsed JSON) as a ``kind``, or ``error`` saying that ``what`` is not one, where, and ``fix`` (left to
    the caller when empty). ``where`` prefixes each field's place (``"config."`` when ``data`` is a part of a file)."""
    try:
        return adapter(kind).validate_python(data)
    except ValidationError as exc:
        raise error(f"{what} is not valid: {problems(exc, where)}" + (f"; {fix}" if fix else "")) from None
