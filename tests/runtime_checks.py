"""The runtime type checker tests/conftest.py applies to every nl_rewrite function and dataclass (via jaxtyping's
import hook, which also checks jaxtyping shapes).

beartype with the PEP 484 numeric tower: an ``int`` is accepted where ``float`` is annotated, as static type checkers
(and PEP 484) accept it; plain ``beartype.beartype`` would reject ``timeout=5`` for ``timeout: float``. This module
must not import nl_rewrite: it is imported while nl_rewrite's modules are being decorated.
"""

from __future__ import annotations

from beartype import BeartypeConf, beartype

typechecked = beartype(conf=BeartypeConf(is_pep484_tower=True))
