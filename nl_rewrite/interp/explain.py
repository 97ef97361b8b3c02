"""Explainer: show an LLM a latent's activating examples and ask for a one-line explanation.

The prompt follows delphi's default explainer (used by the paper): in each example the tokens at or above
``threshold`` × the example's peak are wrapped in ``<<`` ``>>`` (consecutive ones share one pair), and an
``Activations:`` line lists each marked token with its strength on a 0–9 scale relative to the strongest
activation shown. The contrastive variant adds windows where the latent is silent.

Small instruct models ramble; ``prefill`` starts the answer ("[EXPLANATION]: The marked words are all") so
the reply is the explanation itself. Replies are parsed strictly: empty, wordless or repetitive replies are
retried at other temperatures, then recorded as failed (``ok=False``, ``text=""``, with the reason) and
counted. Failed records are never handed on as explanations.

Records are appended to a JSONL file as each batch finishes, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Generic, Literal, Sequence, TypeVar, get_args


from nl_rewrite.io import RecordStore
from nl_rewrite.parallel.runner import InProcess, ShardRunner
from nl_rewrite.errors import NLRewriteError
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.llm.base import ChatRequest, LLMBackend
from nl_rewrite.latents.sampling import Example, LatentExamples, SamplingConfig, SamplingError, sample_latent
from nl_rewrite.hashing import digest

log = logging.getLogger(__name__)

Variant = Literal["default", "contrastive"]
VARIANTS: tuple[str, ...] = get_args(Variant)
EXPLANATION_TAG = "[EXPLANATION]:"
DEFAULT_PREFILL = "[EXPLANATION]: The marked words are all"

SYSTEM_PROMPT = """You are a meticulous AI researcher conducting an important investigation into patterns found in \
language. Your task is to analyze text and provide an explanation that thoroughly encapsulates possible patterns \
found in it.
Guidelines:

You will be given a list of text examples on which special words are selected and between delimiters like \
<<this>>. If a sequence of consecutive tokens all are important, the entire sequence of tokens will be contained \
between delimiters <<just like this>>. How important each token is for the behavior is listed after each example \
in parentheses, from 1 (weak) to 9 (strongest).

- Try to produce a concise final description. Simply describe the text features that are common in the examples, \
and what patterns you found.
- If the examples are uninformative, you don't need to mention them. Don't focus on giving examples of important \
tokens, but try to summarize the patterns found in the examples.
- Do not mention the marker tokens (<< >>) in your explanation.
- Do not make lists of possible explanations. Keep your explanations short and concise.
- The last line of your response must be the formatted explanation, using [EXPLANATION]:"""

CONTRASTIVE_NOTE = """
Some texts where the pattern is ABSENT are also given. Your explanation should fit the marked words and not \
these texts."""


class ExplanationParseError(NLRewriteError):
    """A reply that holds no usable explanation."""


@dataclass(frozen=True)
class ExplainConfig:
    """How the explainer is prompted and how its replies are read."""

    variant: Variant = "default"
    """default (delphi/paper) or contrastive (adds non-activating examples)"""
    prefill: str = DEFAULT_PREFILL
    """text that starts the explainer's answer; empty to let the model write freely"""
    threshold: float = 0.2
    """mark tokens at or above this fraction of the example's peak activation"""
    n_contrastive: int = 10
    """non-activating examples in the contrastive prompt"""
    max_tokens: int = 60
    """reply length limit in tokens"""
    temperature: float = 0.0
    """first attempt's temperature (0 = greedy)"""
    retry_temperatures: tuple[float, ...] = (0.7, 1.0)
    """temperature of each retry after an unusable reply"""
    batch_size: int = 4
    """latents per backend call"""
    max_chars: int = 300
    """longer explanations are cut at a word boundary"""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"ExplainConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"ExplainConfig.threshold must be in (0, 1], got {self.threshold}")
        if self.max_tokens < 1 or self.batch_size < 1 or self.max_chars < 10:
            raise ValueError("ExplainConfig.max_tokens and batch_size must be >= 1, max_chars >= 10")
        if any(t < 0 for t in (self.temperature, *self.retry_temperatures)):
            raise ValueError("temperatures must be >= 0")

    def settings_key(self, sampling: SamplingConfig, backend_id: str) -> str:
        """Identity of everything that shapes an explanation: records made otherwise are not reused."""
        blob = json.dumps([asdict(self), asdict(sampling), backend_id], sort_keys=True, default=list)
        return digest(blob)


@dataclass
class Explanation:
    latent: int
    text: str
    """The explanation; empty exactly when ``ok`` is False."""
    ok: bool
    prompt: str
    examples: list[Example]
    error: str | None = None
    attempts: int = 0
    settings: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "examples": [e.to_dict() for e in self.examples]}

    @classmethod
    def from_dict(cls, d: dict) -> "Explanation":
        return cls(**{**d, "examples": [Example.from_dict(e) for e in d["examples"]]})

    @property
    def window_ids(self) -> list[int]:
        return [e.window_id for e in self.examples]


# ---- prompt --------------------------------------------------------------------------------------------------

def _show(piece: str) -> str:
    """Token text for a one-line example: newlines and tabs made visible."""
    return piece.replace("\n", "\\n").replace("\t", "\\t")


def mark_example(pieces: Sequence[str], acts: Sequence[float], threshold: float) -> str:
    """The example's text with runs of tokens at or above ``threshold`` × its peak wrapped in << >>.

    A leading space stays outside the markers ("the <<cat>>", not "the<< cat>>").
    """
    cut = threshold * max(acts) if max(acts) > 0 else float("inf")
    out, inside = [], False
    for piece, act in zip(pieces, acts):
        piece = _show(piece)
        hot = act >= cut
        if hot and not inside:
            stripped = piece.lstrip(" ")
            out.append(piece[:len(piece) - len(stripped)] + "<<")
            piece = stripped
        elif not hot and inside:
            out.append(">>")
        out.append(piece)
        inside = hot
    return "".join(out) + (">>" if inside else "")


def strength_list(pieces: Sequence[str], acts: Sequence[float], threshold: float, scale: float) -> str:
    """``("tok", 7), ...`` for the marked tokens; strength = round(9 × act / scale), at least 1."""
    cut = threshold * max(acts)
    items = [f'("{_show(p).strip() or _show(p)}", {max(1, min(9, round(9 * a / scale)))})'
             for p, a in zip(pieces, acts) if a >= cut and a > 0]
    return ", ".join(items)


def build_messages(cache: LatentCache, examples: LatentExamples, cfg: ExplainConfig) -> tuple[tuple[str, str], ...]:
    scale = max(e.max_act for e in examples.train)
    blocks = []
    for i, ex in enumerate(examples.train, 1):
        pieces = cache.token_strings(ex.tokens)
        blocks.append(f"Example {i}: {mark_example(pieces, ex.acts, cfg.threshold)}\n"
                      f"Activations: {strength_list(pieces, ex.acts, cfg.threshold, scale)}")
    system = SYSTEM_PROMPT
    if cfg.variant == "contrastive" and examples.negatives:
        system += CONTRASTIVE_NOTE
        negatives = ["Absent: " + "".join(_show(p) for p in cache.token_strings(ex.tokens))
                     for ex in examples.negatives[:cfg.n_contrastive]]
        blocks.append("Texts where the pattern is absent:\n" + "\n".join(negatives))
    return (("system", system), ("user", "\n\n".join(blocks)))


def render_prompt(messages: tuple[tuple[str, str], ...], prefill: str) -> str:
    """A readable record of exactly what was asked (the backend applies its own chat template)."""
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + f"<|assistant|>\n{prefill}"


# ---- parsing -------------------------------------------------------------------------------------------------

def parse_explanation(reply: str, prefill: str = "", max_chars: int = 300) -> str:
    """The explanation in ``prefill + reply``; raises ``ExplanationParseError`` saying why there is none."""
    if not reply.strip():
        raise ExplanationParseError("empty reply")
    if not re.search(r"[A-Za-z]{2,}", reply):
        raise ExplanationParseError(f"reply has no words: {reply[:80]!r}")
    full = prefill + reply
    text = full.rsplit(EXPLANATION_TAG, 1)[-1] if EXPLANATION_TAG in full else full
    text = next((line for line in text.splitlines() if line.strip()), "")
    text = re.sub(r"<<|>>", "", text)
    text = re.sub(r"\s+", " ", text).strip().strip("\"'`*").strip()
    words = re.findall(r"[A-Za-z]+", text)
    if len(words) < 2:
        raise ExplanationParseError(f"explanation too short: {text!r}")
    if len(words) >= 6 and max(map(words.count, set(words))) > len(words) / 2:
        raise ExplanationParseError(f"repetitive reply: {text[:80]!r}")
    return _clip(text, max_chars)


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0].rstrip(",;:") + "…"


# ---- storage -------------------------------------------------------------------------------------------------

def load_explanations(path: "str | Path") -> list[Explanation]:
    """All records of a JSONL file (ok and failed), in file order."""
    lines = Path(path).read_text().split("\n")[:-1]  # skip a half-written last line
    return [Explanation.from_dict(json.loads(line)) for line in lines if line.strip()]


# ---- running -------------------------------------------------------------------------------------------------

@dataclass
class _Pending:
    latent: int
    examples: LatentExamples
    messages: tuple[tuple[str, str], ...]
    errors: list[str] = field(default_factory=list)


def _attempt_temperatures(cfg: ExplainConfig) -> list[float]:
    return [cfg.temperature, *cfg.retry_temperatures]


def _ask(backend: LLMBackend, batch: list[_Pending], cfg: ExplainConfig, settings: str) -> list[Explanation]:
    """Ask for every latent of ``batch``, retrying unusable replies; one record per latent."""
    done: dict[int, Explanation] = {}
    todo = list(batch)
    for attempt, temperature in enumerate(_attempt_temperatures(cfg), 1):
        if not todo:
            break
        requests = [ChatRequest(p.messages, cfg.max_tokens, temperature, cfg.prefill) for p in todo]
        replies = backend.chat(requests)
        still = []
        for pending, reply in zip(todo, replies):
            try:
                text = parse_explanation(reply, cfg.prefill, cfg.max_chars)
                done[pending.latent] = _record(pending, text, True, None, attempt, cfg, settings)
            except ExplanationParseError as exc:
                pending.errors.append(f"attempt {attempt} (temperature {temperature}): {exc}")
                still.append(pending)
        todo = still
    for pending in todo:
        done[pending.latent] = _record(pending, "", False, "; ".join(pending.errors), len(pending.errors), cfg,
                                       settings)
    return [done[p.latent] for p in batch]


def _record(pending: _Pending, text: str, ok: bool, error: str | None, attempts: int, cfg: ExplainConfig,
            settings: str) -> Explanation:
    shown = pending.examples.train + (pending.examples.negatives[:cfg.n_contrastive]
                                      if cfg.variant == "contrastive" else [])
    return Explanation(pending.latent, text, ok, render_prompt(pending.messages, cfg.prefill), shown, error,
                       attempts, settings)


def _prepare(cache: LatentCache, latent: int, cfg: ExplainConfig, sampling: SamplingConfig, settings: str
             ) -> _Pending | Explanation:
    """The prompt for one latent, or a failed record if it cannot be sampled (too few activating windows)."""
    try:
        examples = sample_latent(cache, latent, sampling)
    except SamplingError as exc:
        return Explanation(latent, "", False, "", [], str(exc), 0, settings)
    return _Pending(latent, examples, build_messages(cache, examples, cfg))


StageConfig = TypeVar("StageConfig")


@dataclass(frozen=True)
class LatentStageInputs(Generic[StageConfig]):
    """What a worker of an LLM stage over latents (explain, score) works with; the backend pickles as its recipe,
    so each worker builds its own."""

    backend: LLMBackend
    cache: LatentCache
    cfg: StageConfig
    sampling: SamplingConfig
    settings: str


def explain_batch(inputs: "LatentStageInputs[ExplainConfig]", latents: list[int]) -> list[Explanation]:
    """One record per latent of ``latents``: sampled, asked for in one batch of chats, parsed (with retries)."""
    prepared = [_prepare(inputs.cache, latent, inputs.cfg, inputs.sampling, inputs.settings) for latent in latents]
    records = [p for p in prepared if isinstance(p, Explanation)]
    return records + _ask(inputs.backend, [p for p in prepared if isinstance(p, _Pending)], inputs.cfg,
                          inputs.settings)


def explain_latents(backend: LLMBackend, cache: LatentCache, latents: Sequence[int], cfg: ExplainConfig,
                    sampling: SamplingConfig | None = None, path: "str | Path | None" = None,
                    progress: bool = True, runner: ShardRunner | None = None) -> list[Explanation]:
    """One explanation record per latent (in the order given). With ``path``, records already there are reused
    and new ones are appended batch by batch. ``runner`` (default: this process) asks for the batches; on Ray each
    worker holds its own backend."""
    sampling = sampling or SamplingConfig()
    settings = cfg.settings_key(sampling, backend.backend_id)
    store = RecordStore(path, settings, Explanation.from_dict) if path is not None else None
    have = store.records if store else {}
    todo = [latent for latent in dict.fromkeys(latents) if latent not in have]
    made: dict[int, Explanation] = {}

    def keep(_: int, records: list[Explanation]) -> None:
        if store:
            store.add(records)
        made.update((r.latent, r) for r in records)

    batches = [todo[start:start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
    inputs = LatentStageInputs(backend, cache, cfg, sampling, settings)
    (runner or InProcess()).map(inputs, explain_batch, batches, keep, desc="explain", progress=progress)
    out = [have.get(latent) or made[latent] for latent in latents]
    failed = sum(not r.ok for r in out)
    log.info("explanations: %d ok, %d failed, %d reused from %s", len(out) - failed, failed, len(latents) - len(todo),
             path)
    return out
