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


def place(where: str, loc: tuple) -> str:
    """``where`` followed by pydantic's location of an error: ``.name`` for a field, ``[i]`` for an item."""
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def problems(exc: ValidationError, where: str = "", shown: int = 3, inputs: bool = False) -> str:
    """pydantic's first few complaints, each with its place in the file: ``pool.size: Input should be ...``;
    ``inputs`` adds what was found (``, got 'many' (str)``) where the complaint is about a value's type."""
    errors = exc.errors(include_url=False)
    lines = [f"{place(where, e['loc'])}: {e['msg']}{_found(e) if inputs else ''}" for e in errors[:shown]]
    more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return "; ".join(lines) + more


def _found(error: dict) -> str:
    # a validator's own ValueError already says what it got
    return "" if error["type"] == "value_error" else f", got {error['input']!r} ({type(error['input']).__name__})"


def validated(kind: type[T], data: object, error: type[Exception], what: str, fix: str = "", where: str = "") -> T:
    """``data`` (parsed JSON) as a ``kind``, or ``error`` saying that ``what`` is not one, where, and ``fix`` (left to
    the caller when empty). ``where`` is the place of ``data`` in its file (``"config"`` when it is a part of one)."""
    try:
        return adapter(kind).validate_python(data)
    except ValidationError as exc:
        raise error(f"{what} is not valid: {problems(exc, where)}" + (f"; {fix}" if fix else "")) from None
