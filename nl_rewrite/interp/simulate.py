"""LLM simulators: predict a latent's activation on every token of a window from its explanation.

Two modes, over any ``LLMBackend`` (embedded, OpenAI-compatible server, cached):

- ``paper``: one ``ScoreRequest`` per (latent, token), as in Paulo & Belrose (2025). The window text
  up to and including the token is shown with that last token marked ``<<tok>>`` and the model is
  asked for one integer 0–9; the digit distribution of its first answer token is read.
- ``all_at_once`` (OpenAI neuron-explainer style): the window is written one token per line as
  ``token<TAB>digit``; the digit distribution is read after each tab, all positions in ONE request.
  The digit itself is replaced by a fixed placeholder so later lines never see a prediction.

In both modes the instructions, three few-shot examples and the explanation form the request's
``prefix``, which the backend may compute once and reuse across every window of a latent.

The score of a token is the expected digit ``Σ p(d)·d`` with ``p`` RENORMALISED over the ten digits
(the paper used the raw top-k probabilities without renormalising, so its scores shrink whenever the
model puts mass on non-digits). A read point with no finite digit log-prob gives NaN, counted and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, get_args, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest, LLMBackend, ScoreRequest
from nl_rewrite.hashing import digest

log = logging.getLogger(__name__)

Mode = Literal["paper", "all_at_once"]
MODES: tuple[str, ...] = get_args(Mode)
DIGITS = tuple(str(d) for d in range(10))
# SimulatorConfig's defaults, and a Simulator's built without a config
DEFAULT_MODE: Mode = "all_at_once"
DEFAULT_PLACEHOLDER = "0"
DEFAULT_REQUESTS_PER_CALL = 64
PROMPT_VERSIONS = {"paper": 2, "all_at_once": 1}
"""Bump a mode's version when its prompts change: it is part of ``Simulator.identity``, which keys stored
simulations. Paper mode v2 puts the text on its own line: a prefix ending in ``"Text: "`` let a server that
tokenises the whole prompt merge that space into the window's first token, unlike the embedded backend."""

SYSTEM_PROMPT = (
    "We are studying neurons in a neural network. Each neuron looks for one particular thing in a text. "
    "Given an explanation of what a neuron looks for, predict how strongly it fires on each token, "
    "from 0 (not at all) to 9 (as strongly as it ever does). Most tokens have nothing to do with the "
    "explanation: give them 0. Give high values only to tokens that match the explanation."
)

_SHOT_TOKENS = ("In", " 18", "61", ",", " the", " government", " raised", " taxes", " and", " did", " not",
                " pay", " its", " debts", ".")
FEW_SHOT: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = tuple(
    (explanation, tuple(zip(_SHOT_TOKENS, digits))) for explanation, digits in (
        ("years and dates, especially four-digit years", (1, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        ("words about money, taxes and debt", (0, 0, 0, 0, 0, 2, 1, 9, 0, 0, 0, 5, 0, 8, 0)),
        ("the word \"and\" and other words that join phrases", (0, 0, 0, 3, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0)),
    ))
"""The same sentence under three explanations: the digits depend on the explanation, never on the token
alone (a small model otherwise learns 'the → 0' from the examples instead of reading the explanation)."""
PAPER_MARKED = (2, 7, 4)
"""Which token of each few-shot example the paper-mode prompt marks (a high, a high, a zero)."""

_WINDOW_SLOT = "\x00WINDOW\x00"
MAX_EXPLANATION_CHARS = 4000
"""Longer would crowd the window out of a small model's context (SmolLM2: 8192 tokens) or fail deep in torch."""


@dataclass(frozen=True)
class SimulationItem:
    """One (latent, window) to simulate; ``meta`` labels logs and cache entries."""

    explanation: str
    tokens: tuple[str, ...]
    meta: tuple[tuple[str, str], ...] = ()


@dataclass
class SimulatorStats:
    """Running counts, for logs and reports."""

    windows: int = 0
    predictions: int = 0
    nan_predictions: int = 0
    requests: int = 0


@runtime_checkable
class TokenSimulator(Protocol):
    """Anything that predicts a latent's activation per token from its explanation: the LLM :class:`Simulator`, or
    the lexical reader. ``identity`` keys the simulation store, so two simulators never share stored scores."""

    stats: SimulatorStats

    @property
    def identity(self) -> str: ...

    def simulate_many(self, items: Sequence[SimulationItem]) -> list[Float[Tensor, " pos"]]: ...


def render_token(token: str) -> str:
    """A token as it appears on one line: newlines and tabs escaped so the line format survives."""
    text = token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return text if text else "∅"


def mark_last(tokens: Sequence[str]) -> str:
    """The text of ``tokens`` with the last one wrapped in ``<<…>>`` (leading space kept outside)."""
    last = tokens[-1]
    stripped = last.lstrip(" ")
    return "".join(tokens[:-1]) + last[: len(last) - len(stripped)] + f"<<{stripped or last}>>"


def expected_digits(logprobs: Float[Tensor, "n_read 10"]) -> Float[Tensor, " n_read"]:
    """Σ p(d)·d with p renormalised over the digits; NaN where no digit has a finite log-prob."""
    logprobs = logprobs.to(torch.float32)
    usable = torch.isfinite(logprobs).any(dim=-1)
    safe = torch.where(torch.isfinite(logprobs), logprobs, torch.full_like(logprobs, -1e30))
    probs = safe.softmax(dim=-1)
    values = probs @ torch.arange(logprobs.shape[-1], dtype=torch.float32)
    return torch.where(usable, values, torch.full_like(values, float("nan")))


def _chat_renderer(backend: LLMBackend):
    """The backend's own chat template when it exposes one (possibly behind a cache wrapper)."""
    for candidate in (backend, getattr(backend, "backend", None), getattr(backend, "inner", None)):
        render = getattr(candidate, "chat_prompt", None)
        if callable(render):
            return render
    return None


def render_chat(backend: LLMBackend, messages: list[tuple[str, str]]) -> str:
    """Messages → prompt text in the served model's own chat template, ending with the assistant turn opened.

    There is no generic fallback: the same model must get the same prompt whichever backend serves it."""
    render = _chat_renderer(backend)
    if render is None:
        raise LLMError(f"backend {backend.backend_id} exposes no chat template (a `chat_prompt` method); the "
                       "simulator renders its prompts with the served model's own template")
    return render(ChatRequest(messages=tuple(messages)))


def check_options(mode: str, placeholder: str, requests_per_call: int) -> None:
    """Raise ValueError for simulator options that cannot work."""
    if mode not in MODES:
        raise ValueError(f"unknown simulator mode {mode!r}; valid: {', '.join(MODES)}")
    if "\n" in placeholder or "\t" in placeholder:
        raise ValueError("the placeholder must not contain newlines or tabs (it would break the line format)")
    if requests_per_call < 1:
        raise ValueError(f"requests_per_call must be >= 1, got {requests_per_call}")


@dataclass(frozen=True)
class SimulatorConfig:
    """The LLM simulator's options (see :class:`Simulator`)."""

    mode: Mode = DEFAULT_MODE
    """all_at_once (one request per window, every token read at once) or paper (one request per token)"""
    placeholder: str = DEFAULT_PLACEHOLDER
    """all_at_once: written in place of each token's digit, so later lines never see a prediction"""
    requests_per_call: int = DEFAULT_REQUESTS_PER_CALL
    """score requests sent to the backend per call"""

    def __post_init__(self) -> None:
        check_options(self.mode, self.placeholder, self.requests_per_call)


class Simulator:
    """Predicts per-token activation digits from an explanation (see the module docstring)."""

    def __init__(self, backend: LLMBackend, mode: str = DEFAULT_MODE, *, placeholder: str = DEFAULT_PLACEHOLDER,
                 requests_per_call: int = DEFAULT_REQUESTS_PER_CALL, progress: bool = False) -> None:
        check_options(mode, placeholder, requests_per_call)
        self.backend, self.mode, self.placeholder = backend, mode, placeholder
        self.requests_per_call, self.progress = requests_per_call, progress
        self.stats = SimulatorStats()
        self._template_cache: dict[str, tuple[str, str]] = {}

    @classmethod
    def from_config(cls, backend: LLMBackend, cfg: SimulatorConfig, *, progress: bool = False) -> "Simulator":
        return cls(backend, cfg.mode, placeholder=cfg.placeholder, requests_per_call=cfg.requests_per_call,
                   progress=progress)

    @property
    def identity(self) -> str:
        """Stable id of everything that changes a simulation except the explanation and the tokens."""
        probe = self.requests(SimulationItem("EXPLANATION", ("a", " b")))[0]
        key = digest(probe.prefix + "\x1f".join(probe.segments), length=12)
        return f"{self.backend.backend_id}|{self.mode}|v{PROMPT_VERSIONS[self.mode]}|{key}"

    # ---- prompts ------------------------------------------------------------------------------

    def _template(self, explanation: str) -> tuple[str, str]:
        """(prefix, tail) of the rendered chat, split where the window text goes."""
        if explanation not in self._template_cache:
            messages = self._paper_messages(explanation) if self.mode == "paper" else self._aao_messages(explanation)
            rendered = render_chat(self.backend, messages)
            if self.mode == "all_at_once":
                rendered += _WINDOW_SLOT  # the window lines follow the opened assistant turn
            prefix, _, tail = rendered.partition(_WINDOW_SLOT)
            if len(self._template_cache) > 256:
                self._template_cache.clear()
            self._template_cache[explanation] = (prefix, tail)
        return self._template_cache[explanation]

    @staticmethod
    def _aao_user(explanation: str) -> str:
        return (f"Explanation of the neuron: {explanation}\n"
                "Write each token of the text on its own line, then a tab, then the activation 0-9.")

    def _aao_messages(self, explanation: str) -> list[tuple[str, str]]:
        messages = [("system", SYSTEM_PROMPT)]
        for shot_explanation, pairs in FEW_SHOT:
            lines = "".join(f"{render_token(t)}\t{d}\n" for t, d in pairs)
            messages += [("user", self._aao_user(shot_explanation)), ("assistant", lines)]
        return messages + [("user", self._aao_user(explanation))]

    @staticmethod
    def _paper_user(explanation: str, text: str) -> str:
        return (f"Explanation of the neuron: {explanation}\nText:\n{text}\n"
                "How strongly does the neuron fire on the token marked <<like this>>? Answer with one integer 0-9.")

    def _paper_messages(self, explanation: str) -> list[tuple[str, str]]:
        messages = [("system", SYSTEM_PROMPT)]
        for (shot_explanation, pairs), marked in zip(FEW_SHOT, PAPER_MARKED):
            text = mark_last([t for t, _ in pairs[: marked + 1]])
            messages += [("user", self._paper_user(shot_explanation, text)), ("assistant", str(pairs[marked][1]))]
        return messages + [("user", self._paper_user(explanation, _WINDOW_SLOT))]

    def requests(self, item: SimulationItem) -> list[ScoreRequest]:
        """The score requests of one (latent, window): one in all-at-once mode, one per token in paper mode."""
        if not item.explanation or not item.explanation.strip():
            raise ValueError(f"cannot simulate without an explanation ({dict(item.meta) or 'no meta'})")
        if len(item.explanation) > MAX_EXPLANATION_CHARS:
            raise ValueError(f"an explanation of {len(item.explanation)} characters is longer than the simulator "
                             f"accepts ({MAX_EXPLANATION_CHARS}; the explainer clips at 300): shorten it "
                             f"({dict(item.meta) or 'no meta'})")
        if not item.tokens:
            raise ValueError("cannot simulate an empty window")
        prefix, tail = self._template(item.explanation)
        if self.mode == "all_at_once":
            lines = tuple((f"{self.placeholder}\n" if i else "") + f"{render_token(t)}\t"
                          for i, t in enumerate(item.tokens))
            return [ScoreRequest(prefix, lines, tuple(range(len(lines))), DIGITS, item.meta)]
        # Paper mode: the text slot sits inside the user turn; the tail closes it and opens the answer.
        return [ScoreRequest(prefix, (mark_last(item.tokens[: t + 1]) + tail,), (0,), DIGITS,
                             item.meta + (("position", str(t)),))
                for t in range(len(item.tokens))]

    # ---- running ------------------------------------------------------------------------------

    def simulate(self, explanation: str, tokens: Sequence[str]) -> Float[Tensor, " pos"]:
        """Expected digit (0–9, renormalised over digits) per token; NaN where no digit logprob came back."""
        return self.simulate_many([SimulationItem(explanation, tuple(tokens))])[0]

    def simulate_many(self, items: Sequence[SimulationItem]) -> list[Float[Tensor, " pos"]]:
        """Many (latent, window) items, sent to the backend in large calls so it can share prefixes."""
        from tqdm import tqdm

        per_item = [self.requests(item) for item in items]
        flat = [r for reqs in per_item for r in reqs]
        answers: list[Tensor] = []
        step = self.requests_per_call
        for start in tqdm(range(0, len(flat), step), desc=f"simulate ({self.mode})", unit="call",
                          disable=not self.progress or len(flat) <= step):
            answers.extend(self._score(flat[start:start + step]))
        return self._collect(items, per_item, answers)

    def _score(self, requests: list[ScoreRequest]) -> list[Tensor]:
        answers = self.backend.score(requests)
        if len(answers) != len(requests):
            raise LLMError(f"backend {self.backend.backend_id} returned {len(answers)} answers for "
                           f"{len(requests)} score requests")
        for request, answer in zip(requests, answers):
            if tuple(answer.shape) != (len(request.read_after), len(DIGITS)):
                raise LLMError(f"backend {self.backend.backend_id} returned logprobs of shape {tuple(answer.shape)}, "
                               f"expected {(len(request.read_after), len(DIGITS))} ({dict(request.meta)})")
        self.stats.requests += len(requests)
        return answers

    def _collect(self, items, per_item, answers) -> list[Tensor]:
        """Reassemble per-request digit scores into one vector per item; count NaN predictions."""
        out, cursor = [], 0
        for item, reqs in zip(items, per_item):
            mine = answers[cursor:cursor + len(reqs)]
            cursor += len(reqs)
            scores = torch.cat([expected_digits(a) for a in mine])
            n_nan = int(torch.isnan(scores).sum())
            if n_nan:
                log.warning("simulator got no usable digit logprobs for %d of %d tokens (%s); those are NaN",
                            n_nan, scores.numel(), dict(item.meta) or item.explanation[:60])
            self.stats.windows += 1
            self.stats.predictions += scores.numel()
            self.stats.nan_predictions += n_nan
            out.append(scores)
        return out
