"""The one LLM protocol used by the explainer, the scorer and the simulator.

Two request kinds:
- ``ChatRequest``: generate text (explanations).
- ``ScoreRequest``: next-token log-probabilities of a few candidate tokens (digits, "Yes"/"No") read
  at chosen points of a prompt, all in one pass. The prompt is ``prefix + "".join(segments)``; for
  each ``i`` in ``read_after`` the backend returns ``log p(next token == c | prompt up to the end of
  segments[i])`` for every ``c`` in ``choices``. ``prefix`` is the part shared by many requests
  (instructions, few-shot examples, explanation): backends may compute it once and reuse it.

Requests are frozen dataclasses: every call carries its own settings, nothing mutable is shared.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from nl_rewrite.hashing import digest


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion. ``prefill`` starts the assistant's answer (the reply returned excludes it)."""

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs; roles are system, user, assistant."""
    max_tokens: int = 200
    temperature: float = 0.0
    prefill: str = ""

    def key(self) -> str:
        return _digest({"kind": "chat", **asdict(self)})


@dataclass(frozen=True)
class ScoreRequest:
    """Log-probabilities of ``choices`` as the next token after chosen segments of one prompt."""

    prefix: str
    segments: tuple[str, ...]
    read_after: tuple[int, ...]
    choices: tuple[str, ...] = tuple(str(d) for d in range(10))
    meta: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    """Free-form labels for logs (latent id, window id); not part of the cache key."""

    def __post_init__(self) -> None:
        bad = [i for i in self.read_after if not 0 <= i < len(self.segments)]
        if bad:
            raise ValueError(f"read_after indices {bad} out of range for {len(self.segments)} segments")
        if not self.choices:
            raise ValueError("ScoreRequest needs at least one choice")

    @property
    def prompt(self) -> str:
        return self.prefix + "".join(self.segments)

    def key(self) -> str:
        return _digest({"kind": "score", "prefix": self.prefix, "segments": self.segments,
                        "read_after": self.read_after, "choices": self.choices})


@dataclass
class Counts:
    """Running counts a backend keeps for logs and reports (e.g. its workarounds). ``snapshot`` and ``since`` tell
    what one call added; ``restore`` takes back what an advisory call (a check, not the run's work) added."""

    def snapshot(self) -> dict[str, float]:
        return dict(vars(self))

    def since(self, snapshot: dict[str, float]) -> dict[str, float]:
        """The counts that changed since ``snapshot``, by how much."""
        return {name: value - snapshot[name] for name, value in vars(self).items() if value != snapshot[name]}

    def restore(self, snapshot: dict[str, float]) -> None:
        vars(self).update(snapshot)


@runtime_checkable
class LLMBackend(Protocol):
    """Anything that answers chat and score requests. ``backend_id`` keys the on-disk cache (never holds a key)."""

    backend_id: str

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        """One reply per request (without the prefill)."""
        ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[Float[Tensor, "n_read n_choices"]]:
        """Per request, log-probs for each read point and choice; ``-inf`` for a choice a server left out of
        its top-K when that is provably negligible, a NaN row for a read point it left unknown (see
        ``readout``). Raises ``LLMError`` if the backend gives no logprobs at all."""
        ...


def _digest(obj: object) -> str:
    return digest(json.dumps(obj, sort_keys=True, default=list), length=None)
