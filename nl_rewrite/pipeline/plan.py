"""The cost planner: what a run (or one stage) would ask of the LLM and the models, without doing any of it.

Per stage it counts LLM calls (one chat or score request each), prompt tokens, generated tokens, predictions
(simulated activations), (latent, window) items, and forward passes of the subject model or the trained simulator.
Prompt tokens come from one typical prompt of each kind, rendered by the real prompt builders (explainer, detection
scorer, simulator) around placeholder examples and a placeholder explanation of typical length, counted with the
backend's tokenizer when one is available locally (else ≈ 4 characters per token, said so). Times come from a
:class:`Throughput`: measured by a few-second probe of the embedded backend, or a stated assumption (a remote
endpoint's throughput under load cannot be probed with a few requests). Every assumption carries its source.

The simulation of the eval windows is shown four ways side by side: the paper's protocol (one prompt per
(latent, window), reading the last token: the paper's ~3.3e7 calls), this project's paper mode (one prompt per
(latent, window, position): it simulates every position, which the ``all`` position mode needs), all-at-once (one
prompt per (latent, window), every position read) and the trained single-pass simulator (one forward pass per latent
per batch of 64 windows).

:func:`plan_run` and the ``plan_*`` functions of the stage commands are pure: sizes in, :class:`Plan` out.
:func:`measure_prompts` and :func:`choose_throughput` are the impure parts (a tokenizer load; the probe).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from nl_rewrite.errors import LLMError
from nl_rewrite.interp.explain import SYSTEM_PROMPT as EXPLAIN_SYSTEM_PROMPT
from nl_rewrite.interp.explain import ExplainConfig, mark_example, strength_list
from nl_rewrite.interp.score import ScoreConfig, detection_requests
from nl_rewrite.interp.simulate import SimulationItem, Simulator, SimulatorConfig
from nl_rewrite.latents.sampling import SamplingConfig
from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.trained.simulator import TrainedSimulator

SECONDS_PER_DAY = 86_400
PAPER_CALLS_PER_SECOND = 38.0
PAPER_SOURCE = ("assumed: 38 paper-protocol simulator calls (one prediction each) per GPU-second — Paulo & Belrose "
                "2025 report ~3.3e7 calls of Llama-3.1-8B in ~10 A40-days; converted to prompt tokens/s with this "
                "plan's own paper-protocol prompt")
REMOTE_GENERATED_PER_SECOND = 1000.0
REMOTE_GENERATED_SOURCE = ("assumed: 1,000 generated tokens/s (batched decoding of an 8B model on one GPU; not "
                           "measured here; the paper reports ~8 A40-days to explain and score 32k latents with a 70B "
                           "model)")
CPU_CALLS_PER_SECOND = 1.84
CPU_SOURCE = ("assumed (--no-probe): 1.84 paper-mode calls/s, SmolLM2-135M on this project's 2-core CPU, no prefix "
              "reuse (docs/history.md, issue 11 throughput table)")
CPU_GENERATED_PER_SECOND = 5.0
CPU_GENERATED_SOURCE = ("assumed (--no-probe): ~5 generated tokens/s on the 2-core CPU (docs/history.md: the default "
                        "run spent 108 s explaining 6 latents of ≤ 32 tokens, retries included)")
TRAINED_PREDICTIONS_PER_SECOND = 5076.0
TRAINED_SOURCE = ("measured on this project's 2-core CPU: 5,076 predictions/s, 64 windows per latent "
                  "(docs/history.md, issue 11)")
TRAINED_BATCH = next(f.default for f in dataclasses.fields(TrainedSimulator) if f.name == "batch_size")
"""Windows per trained-simulator forward pass (its default)."""
CACHE_BATCH = 16
"""Windows per forward pass when building a latent cache (LatentCache.build's default)."""
CHARS_PER_TOKEN = 4

PLACEHOLDER_WORDS = ("The committee said on Tuesday that the new budget would raise taxes on imported steel by "
                     "twelve percent, and that the money would pay for roads, schools and hospitals in the northern "
                     "provinces over the next five years.").split(" ")
PLACEHOLDER_EXPLANATION = ("words about money, taxes and public spending, especially amounts and percentages in "
                           "news reports about government budgets")
"""Typical of an explainer's one-line answer (~20 words); explanations are clipped at 300 characters."""


# ---- throughput and prompt sizes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Throughput:
    """How fast the chosen backend reads prompts and writes tokens, and where those numbers come from."""

    prompt_tokens_per_second: float
    generated_tokens_per_second: float
    source: str
    """measured by the probe, or the assumption and its origin"""

    def seconds(self, prompt_tokens: int | None, generated_tokens: int | None) -> float | None:
        if prompt_tokens is None or generated_tokens is None:
            return None
        return prompt_tokens / self.prompt_tokens_per_second + generated_tokens / self.generated_tokens_per_second


@dataclass(frozen=True)
class PromptSizes:
    """Tokens of one typical request of each kind, rendered by the real prompt builders."""

    explain: int
    """one explainer chat (system prompt, n_train marked examples, prefill)"""
    score: int
    """one detection request (few-shot, explanation, one window)"""
    paper_last: int
    """one paper-protocol request: the whole window, its last token marked"""
    paper_every_position: int
    """the paper-mode requests of one window, one per position, summed"""
    all_at_once: int
    """one all-at-once request: every token of the window on its own line"""
    source: str
    """how tokens were counted"""


@dataclass(frozen=True)
class PromptTokenizer:
    """Renders chats in the served model's template and counts tokens, as the run's backend would."""

    render: Callable[[ChatRequest], str]
    count: Callable[[str], int]
    source: str


class PromptOnlyBackend:
    """A backend that renders prompts and refuses any LLM work: the planner counts requests, never sends them."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.backend_id = "planner (no LLM calls)"
        self.tokenizer = tokenizer

    def chat_prompt(self, request: ChatRequest) -> str:
        return self.tokenizer.render(request)

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        raise LLMError("the planner does no LLM work; it only renders prompts to count their tokens")

    def score(self, requests: Sequence[ScoreRequest]) -> list:
        raise LLMError("the planner does no LLM work; it only renders prompts to count their tokens")


def spec_model(spec: str) -> tuple[str, str]:
    """(backend kind, model) of a backend spec (``embedded:smollm2-135m``, ``openai:<model>@<url>``)."""
    kind, _, rest = spec.strip().partition(":")
    return kind, rest.partition("@")[0]


def plain_render(request: ChatRequest) -> str:
    return "".join(f"{role}: {content}\n" for role, content in request.messages) + request.prefill


def prompt_tokenizer(spec: str) -> PromptTokenizer:
    """The backend's own template and tokenizer when they load locally (tokenizer only, no weights), else a plain
    rendering counted at ≈ 4 characters per token."""
    from nl_rewrite.llm.factory import DEFAULT_EMBEDDED
    from nl_rewrite.llm.templates import find_template, load_template

    kind, model = spec_model(spec)
    try:
        template = load_template(model or DEFAULT_EMBEDDED) if kind == "embedded" else find_template(None, model)
    except LLMError:
        template = None
    if template is None:
        return PromptTokenizer(plain_render, lambda text: math.ceil(len(text) / CHARS_PER_TOKEN),
                               f"≈ {CHARS_PER_TOKEN} characters per token (an assumption: no local tokenizer for "
                               f"{spec!r})")
    return PromptTokenizer(template.render, lambda text: len(template.encode_prefix(text)),
                           f"counted with the {template.source} tokenizer")


def placeholder_window(window: int) -> tuple[str, ...]:
    """``window`` word-like tokens of ordinary English (a leading space on all but the first)."""
    words = [PLACEHOLDER_WORDS[i % len(PLACEHOLDER_WORDS)] for i in range(window)]
    return tuple(w if i == 0 else " " + w for i, w in enumerate(words))


def explain_request(window: int, n_train: int, cfg: ExplainConfig) -> ChatRequest:
    """An explainer chat as :func:`nl_rewrite.interp.explain.build_messages` builds it, on placeholder examples
    where a few tokens fire."""
    pieces = placeholder_window(window)
    acts = [float(9 - i % 10) if i % 10 < 3 else 0.0 for i in range(window)]
    blocks = [f"Example {i}: {mark_example(pieces, acts, cfg.threshold)}\n"
              f"Activations: {strength_list(pieces, acts, cfg.threshold, max(acts))}" for i in range(1, n_train + 1)]
    messages = (("system", EXPLAIN_SYSTEM_PROMPT), ("user", "\n\n".join(blocks)))
    return ChatRequest(messages, cfg.max_tokens, cfg.temperature, cfg.prefill)


def simulator_requests(tokenizer: PromptTokenizer, mode: str, window: int) -> list[ScoreRequest]:
    simulator = Simulator(PromptOnlyBackend(tokenizer), mode)
    return simulator.requests(SimulationItem(PLACEHOLDER_EXPLANATION, placeholder_window(window)))


def score_tokens(tokenizer: PromptTokenizer, requests: Sequence[ScoreRequest]) -> int:
    return sum(tokenizer.count(r.prompt) for r in requests)


def measure_prompts(tokenizer: PromptTokenizer, window: int, n_train: int, explain: ExplainConfig,
                    score: ScoreConfig) -> PromptSizes:
    """Token counts of one typical request of each kind (see :class:`PromptSizes`)."""
    paper = simulator_requests(tokenizer, "paper", window)
    detection = detection_requests(PLACEHOLDER_EXPLANATION, ["".join(placeholder_window(window))], score)
    return PromptSizes(explain=tokenizer.count(tokenizer.render(explain_request(window, n_train, explain))),
                       score=score_tokens(tokenizer, detection), paper_last=score_tokens(tokenizer, paper[-1:]),
                       paper_every_position=score_tokens(tokenizer, paper),
                       all_at_once=score_tokens(tokenizer, simulator_requests(tokenizer, "all_at_once", window)),
                       source=f"one rendered prompt of each kind, placeholder explanation of "
                              f"{len(PLACEHOLDER_EXPLANATION)} characters; {tokenizer.source}")


# ---- choosing a throughput -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ThroughputOptions:
    """How the planner gets the backend's speed."""

    probe: bool = True
    """time a few real requests of the embedded backend (a few seconds, plus loading it)"""
    calls_per_second: Optional[float] = None
    """assumed paper-protocol calls (one prediction each) per second; None: probe (embedded) or the paper's 38/s"""
    generated_tokens_per_second: Optional[float] = None
    """assumed generated tokens per second; None: probe (embedded) or the planner's stated default"""
    probe_seconds: float = 3.0
    """time budget of the probe's timed requests (loading the model is not counted)"""


def assumed_throughput(spec: str, prompts: PromptSizes, opts: ThroughputOptions) -> Throughput:
    """The stated assumption for ``spec``: this CPU's measured speeds for the embedded backend, the paper's for a
    remote one; a user's own numbers override either."""
    local = spec_model(spec)[0] == "embedded"
    calls, calls_source = (CPU_CALLS_PER_SECOND, CPU_SOURCE) if local else (PAPER_CALLS_PER_SECOND, PAPER_SOURCE)
    gen, gen_source = ((CPU_GENERATED_PER_SECOND, CPU_GENERATED_SOURCE) if local
                       else (REMOTE_GENERATED_PER_SECOND, REMOTE_GENERATED_SOURCE))
    if opts.calls_per_second is not None:
        calls, calls_source = opts.calls_per_second, f"given: {opts.calls_per_second:g} paper-protocol calls/s"
    if opts.generated_tokens_per_second is not None:
        gen, gen_source = opts.generated_tokens_per_second, f"given: {opts.generated_tokens_per_second:g} tokens/s"
    return Throughput(calls * prompts.paper_last, gen, f"prompts: {calls_source}; generation: {gen_source}")


def probe_throughput(spec: str, prompts_window: int, budget_seconds: float, tokenizer: PromptTokenizer) -> Throughput:
    """Time real paper-protocol score requests (until ``budget_seconds``, at least one) and one short chat on the
    embedded backend, uncached (a cache hit would time the disk). Loading the model is not timed."""
    from nl_rewrite.llm.factory import make_backend

    backend = make_backend(spec)
    request = simulator_requests(tokenizer, "paper", prompts_window)[-1]
    backend.score([request])  # warm-up: first-call costs are not throughput
    tokens, start = 0, time.perf_counter()
    while tokens == 0 or time.perf_counter() - start < budget_seconds / 2:
        backend.score([request])
        tokens += tokenizer.count(request.prompt)
    prompt_rate = tokens / (time.perf_counter() - start)
    return Throughput(prompt_rate, probe_generation(backend, tokenizer, prompt_rate),
                      f"measured by a probe of {spec}: paper-protocol score requests and one 8-token chat, "
                      "one request at a time, no prefix reuse")


def probe_generation(backend, tokenizer: PromptTokenizer, prompt_rate: float) -> float:
    """Generated tokens per second of one short chat, its prompt's share of the time taken out."""
    request = ChatRequest((("user", "Count from one to twenty in words."),), max_tokens=8)
    start = time.perf_counter()
    reply = backend.chat([request])[0]
    elapsed = time.perf_counter() - start - tokenizer.count(tokenizer.render(request)) / prompt_rate
    return max(1, tokenizer.count(reply)) / max(elapsed, 1e-3)


def choose_throughput(spec: str, prompts: PromptSizes, tokenizer: PromptTokenizer, window: int,
                      opts: ThroughputOptions) -> Throughput:
    """The probe for the embedded backend (unless ``opts`` says otherwise), else the stated assumption."""
    given = opts.calls_per_second is not None or opts.generated_tokens_per_second is not None
    if opts.probe and not given and spec_model(spec)[0] == "embedded":
        return probe_throughput(spec, window, opts.probe_seconds, tokenizer)
    return assumed_throughput(spec, prompts, opts)


# ---- the plan --------------------------------------------------------------------------------------------------

COUNT_FIELDS = ("llm_calls", "prompt_tokens", "generated_tokens", "predictions", "items", "forward_passes",
                "forward_tokens")


@dataclass(frozen=True)
class StageCost:
    """One stage's work. A count of None is unknown (printed in words); 0 means none."""

    stage: str
    what: str
    llm_calls: int | None = 0
    """chat or score requests (one prompt each)"""
    prompt_tokens: int | None = 0
    generated_tokens: int | None = 0
    """at most (max_tokens per reply, first attempts only)"""
    predictions: int | None = 0
    """simulated activations (detection: one yes/no judgement each)"""
    items: int | None = 0
    """(latent, window) pairs"""
    forward_passes: int | None = 0
    """batched forward passes of the subject model or the trained simulator"""
    forward_tokens: int | None = 0
    """window tokens through those passes"""
    seconds: float | None = None
    """estimated; None when not estimated"""
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """What a command would do: its stages, the simulation alternatives, the speeds and prompt sizes assumed."""

    command: str
    stages: tuple[StageCost, ...]
    throughput: Throughput | None
    """None when no stage uses the LLM"""
    prompts: PromptSizes | None
    alternatives: tuple[StageCost, ...] = ()
    """the eval-window simulation four ways (a run's plan only)"""
    notes: tuple[str, ...] = ()
    sizes: dict[str, int | str] = field(default_factory=dict)
    """the sizes the counts were made from"""

    def totals(self) -> StageCost:
        """Every count summed; the time of the timed stages only (``untimed`` names the others)."""
        counts = {name: add_all([getattr(s, name) for s in self.stages]) for name in COUNT_FIELDS}
        timed = [s.seconds for s in self.stages if s.seconds is not None]
        untimed = ", ".join(self.untimed())
        note = f"time of the timed stages only; not timed: {untimed}" if timed and untimed else ""
        return StageCost("total", "all stages above", **counts, seconds=sum(timed) if timed else None, note=note)

    def untimed(self) -> list[str]:
        return [s.stage for s in self.stages if s.seconds is None]

    def to_json(self) -> dict:
        throughput = asdict(self.throughput) if self.throughput else None
        return {"command": self.command, "sizes": self.sizes, "throughput": throughput,
                "prompt_tokens_per_request": asdict(self.prompts) if self.prompts else None,
                "stages": [asdict(s) for s in self.stages], "totals": asdict(self.totals()),
                "simulation_alternatives": [asdict(s) for s in self.alternatives], "notes": list(self.notes)}


def add_all(values: Sequence[float | None]) -> float | None:
    """The sum, or None when any part is unknown (a partial sum would read as a total)."""
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def batches(n: int, size: int) -> int:
    return -(-n // size)


def llm_stage(stage: str, what: str, throughput: Throughput, calls: int, prompt_tokens: int, generated: int = 0,
              predictions: int = 0, items: int = 0, note: str = "") -> StageCost:
    return StageCost(stage, what, calls, prompt_tokens, generated, predictions, items,
                     seconds=throughput.seconds(prompt_tokens, generated), note=note)


def cache_stage(stage: str, windows: int | None, window: int) -> StageCost:
    passes = None if windows is None else batches(windows, CACHE_BATCH)
    tokens = None if windows is None else windows * window
    return StageCost(stage, f"subject model + coder over {'all' if windows is None else f'{windows:,}'} windows",
                     llm_calls=0, forward_passes=passes, forward_tokens=tokens,
                     note="not timed: subject-model speed is not probed (docs/results.md has this CPU's)")


def explain_stage(latents: int, n_train: int, prompts: PromptSizes, cfg: ExplainConfig, throughput: Throughput
                  ) -> StageCost:
    """One chat per latent showing ``n_train`` windows (its items)."""
    retries = len(cfg.retry_temperatures)
    return llm_stage("explain", f"{latents:,} latents, one chat each", throughput, latents, latents * prompts.explain,
                     latents * cfg.max_tokens, items=latents * n_train,
                     note=f"up to {retries} retries per unusable reply are not counted")


def score_stage(latents: int, sampling: SamplingConfig, prompts: PromptSizes, throughput: Throughput) -> StageCost:
    per_latent = sampling.n_heldout + sampling.n_negatives
    calls = latents * per_latent
    return llm_stage("score", f"{latents:,} latents × {per_latent} windows (detection)", throughput, calls,
                     calls * prompts.score, predictions=calls, items=calls)


def simulate_stage(stage: str, mode: str, latents: int, windows: int, window: int, prompts: PromptSizes,
                   throughput: Throughput) -> StageCost:
    """One simulation of ``latents`` × ``windows`` in ``mode``: paper (every position), paper_last (the paper's
    protocol), all_at_once, or trained."""
    items = latents * windows
    what = f"{latents:,} latents × {windows:,} windows"
    if mode == "paper_last":
        return llm_stage(stage, f"paper protocol: {what}, last token", throughput, items, items * prompts.paper_last,
                         predictions=items, items=items, note="one prompt per (latent, window): the paper's count")
    if mode == "paper":
        return llm_stage(stage, f"paper mode: {what} × {window} positions", throughput, items * window,
                         items * prompts.paper_every_position, predictions=items * window, items=items,
                         note="one prompt per (latent, window, position): this project's paper mode")
    if mode == "all_at_once":
        return llm_stage(stage, f"all-at-once: {what}, every position", throughput, items,
                         items * prompts.all_at_once, predictions=items * window, items=items,
                         note="one prompt per (latent, window), every position read")
    return trained_stage(stage, latents, windows, window)


def trained_stage(stage: str, latents: int, windows: int, window: int) -> StageCost:
    predictions = latents * windows * window
    return StageCost(stage, f"trained simulator: {latents:,} latents × {windows:,} windows", llm_calls=0,
                     predictions=predictions, items=latents * windows,
                     forward_passes=latents * batches(windows, TRAINED_BATCH),
                     forward_tokens=latents * windows * window,
                     seconds=predictions / TRAINED_PREDICTIONS_PER_SECOND,
                     note=f"one pass per latent per {TRAINED_BATCH} windows, explanation KV cached; {TRAINED_SOURCE}")


def evaluate_stage(stage: str, what: str, windows: int, window: int, conditions: int, batch_size: int,
                   blocks: int = 1) -> StageCost:
    """``blocks`` Evaluator runs over ``windows``: the clean model plus each condition, per batch of windows."""
    forwards = blocks * (1 + conditions)
    return StageCost(stage, what, llm_calls=0, forward_passes=forwards * batches(windows, batch_size),
                     forward_tokens=forwards * windows * window,
                     note="not timed: subject-model speed is not probed (docs/results.md has this CPU's)")


def main_condition_count(cfg: RunConfig) -> int:
    """Conditions on every eval window: those the run declares (:func:`~.main_arm.main_planned`)."""
    from nl_rewrite.pipeline.main_arm import main_planned  # here: the CLI imports plans, and should not import torch

    return len(main_planned(cfg))


def pool_condition_count(cfg: RunConfig) -> int:
    """Conditions of the LLM pool: those the run declares (:func:`~.pool_arm.pool_planned`)."""
    from nl_rewrite.pipeline.pool_arm import pool_planned

    return len(pool_planned(cfg, pool_size(cfg) / cfg.width))


def pool_size(cfg: RunConfig) -> int:
    return cfg.width if cfg.pool == 0 else min(cfg.pool, cfg.width)


def run_sizes(cfg: RunConfig) -> dict[str, int | str]:
    return {"latents": cfg.width, "pool": pool_size(cfg), "window": cfg.window, "explain_windows": cfg.explain_windows,
            "calib_windows": cfg.calib_windows, "eval_windows": cfg.eval_windows,
            "llm_eval_windows": cfg.llm_eval_windows, "simulator_mode": cfg.simulator.mode,
            "position_modes": ",".join(cfg.position_modes), "fractions": len(cfg.fractions)}


def simulation_alternatives(cfg: RunConfig, prompts: PromptSizes, throughput: Throughput) -> tuple[StageCost, ...]:
    latents, windows = pool_size(cfg), cfg.llm_eval_windows
    return tuple(simulate_stage(f"simulate_eval[{mode}]", mode, latents, windows, cfg.window, prompts, throughput)
                 for mode in ("paper_last", "paper", "all_at_once", "trained"))


def run_notes(cfg: RunConfig) -> tuple[str, ...]:
    notes = [f"pool {cfg.pool}: " + ("all alive latents; counted as all " f"{cfg.width:,} (an upper bound: dead and "
                                     "rarely firing latents are skipped)" if cfg.pool == 0 else
                                     f"the {pool_size(cfg):,} latents of most output mass"),
             f"simulations are made once per (latent, window) and reused by all {len(cfg.fractions)} fractions, "
             f"{len(cfg.calibrations)} calibrations and the position modes ({', '.join(cfg.position_modes)})",
             "the paper's protocol reads the last token only: one prompt per (latent, window); this project's paper "
             "mode reads every position (one prompt each), all-at-once reads every position in one prompt"]
    if cfg.coder_checkpoint != "small":
        notes.append(f"latents: --width {cfg.width:,} is counted; the run's coder ({cfg.coder_checkpoint}) decides its "
                     "real width (the default coder has 4,096)")
    return tuple(notes)


def plan_run(cfg: RunConfig, prompts: PromptSizes, throughput: Throughput) -> Plan:
    """The plan of ``nl-rewrite run`` for ``cfg`` (resolved here): every stage, in order, with the run's simulator
    mode; the eval-window simulation also four ways side by side."""
    cfg = cfg.resolved()
    pool, mode = pool_size(cfg), cfg.simulator.mode
    stages = [cache_stage("latent_cache", cfg.explain_windows, cfg.window),
              cache_stage("latent_cache_eval", cfg.eval_windows, cfg.window),
              explain_stage(pool, cfg.sampling.n_train, prompts, cfg.explain_config(), throughput),
              score_stage(pool, cfg.sampling_config(), prompts, throughput),
              simulate_stage("simulate_explain", mode, pool, cfg.calib_windows, cfg.window, prompts, throughput),
              simulate_stage("simulate_eval", mode, pool, cfg.llm_eval_windows, cfg.window, prompts, throughput),
              evaluate_stage("evaluate", f"{main_condition_count(cfg)} conditions × {cfg.eval_windows:,} windows × "
                             f"{len(cfg.position_modes)} position modes", cfg.eval_windows, cfg.window,
                             main_condition_count(cfg), cfg.batch_size, len(cfg.position_modes)),
              evaluate_stage("evaluate_pool", f"{pool_condition_count(cfg)} conditions × {cfg.llm_eval_windows:,} "
                             "windows", cfg.llm_eval_windows, cfg.window, pool_condition_count(cfg), cfg.batch_size)]
    if cfg.trained_simulator != "none":
        stages.append(trained_stage("simulate_trained", cfg.width, cfg.trained_eval_windows, cfg.window))
    return Plan("run", tuple(stages), throughput, prompts, simulation_alternatives(cfg, prompts, throughput),
                run_notes(cfg), run_sizes(cfg))


def plan_explain(latents: int, cfg: ExplainConfig, sampling: SamplingConfig, prompts: PromptSizes,
                 throughput: Throughput) -> Plan:
    return Plan("explain", (explain_stage(latents, sampling.n_train, prompts, cfg, throughput),), throughput, prompts,
                sizes={"latents": latents, "n_train": sampling.n_train})


def plan_score(latents: int | None, sampling: SamplingConfig, prompts: PromptSizes, throughput: Throughput) -> Plan:
    if latents is None:
        raise ValueError("score --plan counts the ok explanations: pass --explanations FILE or --cache FOLDER")
    return Plan("score", (score_stage(latents, sampling, prompts, throughput),), throughput, prompts,
                sizes={"latents": latents})


def plan_cache(windows: int | None, window: int) -> Plan:
    notes = () if windows is not None else ("--max-windows 0 encodes every window of the split: not counted "
                                            "without tokenising the corpus",)
    return Plan("cache", (cache_stage("latent_cache", windows, window),), None, None, notes=notes,
                sizes={"windows": "all" if windows is None else windows, "window": window})


def plan_evaluate(windows: int, window: int, conditions: int, blocks: int, batch_size: int) -> Plan:
    stage = evaluate_stage("evaluate", f"{conditions} conditions × {windows:,} windows × {blocks} blocks", windows,
                           window, conditions, batch_size, blocks)
    return Plan("evaluate", (stage,), None, None,
                notes=("a suite adds a zero-ablation reference per write site when none is given",),
                sizes={"windows": windows, "window": window, "conditions": conditions, "blocks": blocks})


# ---- printing --------------------------------------------------------------------------------------------------

def count_text(n: float | None) -> str:
    if n is None:
        return "unknown"
    if n >= 1_000_000:
        mantissa, exponent = f"{n:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{int(n):,}"


def short(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "not estimated"
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (2 * SECONDS_PER_DAY, "h", 3600)):
        if seconds < limit:
            return f"{short(seconds / size)} {unit}"
    return f"{short(seconds / SECONDS_PER_DAY)} days"


HEADER = ("stage", "LLM calls", "prompt tok", "generated", "predictions", "items", "fwd passes", "fwd tokens", "time")


def row(cost: StageCost, at_least: bool = False) -> tuple[str, ...]:
    """A table row; ``at_least`` marks a time that leaves untimed stages out."""
    time_text = ("≥ " if at_least else "") + duration_text(cost.seconds)
    return (cost.stage, *(count_text(getattr(cost, name)) for name in COUNT_FIELDS), time_text)


def table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    rows = [HEADER, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            for r in rows]


def paper_line(plan: Plan) -> list[str]:
    """The paper's count, spelled out, when the plan has the paper-protocol alternative."""
    paper = next((s for s in plan.alternatives if s.stage.endswith("[paper_last]")), None)
    if paper is None or paper.predictions is None:
        return []
    return [f"paper protocol: {plan.sizes['pool']:,} latents × {plan.sizes['llm_eval_windows']:,} eval windows = "
            f"{paper.predictions:,} predictions ({count_text(paper.predictions)}; the paper: ~3.3e7), "
            f"{duration_text(paper.seconds)}"]


def plan_text(plan: Plan) -> str:
    probed = plan.throughput is not None and plan.throughput.source.startswith("measured")
    work = "no LLM work beyond the throughput probe" if probed else "no LLM work"
    lines = [f"plan of nl-rewrite {plan.command} ({work} done)",
             "sizes: " + ", ".join(f"{k}={v}" for k, v in plan.sizes.items()), "",
             *table([*map(row, plan.stages), row(plan.totals(), at_least=bool(plan.totals().note))])]
    if plan.alternatives:
        lines += ["", "simulating the eval windows, side by side:", *table([*map(row, plan.alternatives)]),
                  *(f"  {s.stage}: {s.what}; {s.note}" for s in plan.alternatives), "", *paper_line(plan)]
    lines += ["", *throughput_lines(plan.throughput)]
    if plan.prompts:
        p = plan.prompts
        lines.append(f"prompt tokens per request: explain {p.explain:,}, score {p.score:,}, paper-protocol "
                     f"{p.paper_last:,}, paper mode per window {p.paper_every_position:,}, all-at-once "
                     f"{p.all_at_once:,} ({p.source})")
    return "\n".join(lines + note_lines(plan))


def throughput_lines(throughput: Throughput | None) -> list[str]:
    if throughput is None:
        return ["throughput: no LLM stage, nothing to time"]
    return [f"throughput: {throughput.prompt_tokens_per_second:,.0f} prompt tokens/s, "
            f"{throughput.generated_tokens_per_second:,.1f} generated tokens/s", f"  source: {throughput.source}"]


def note_lines(plan: Plan) -> list[str]:
    """Each stage note once, with the stages it applies to, then the plan's own notes."""
    stages_by_note: dict[str, list[str]] = {}
    for s in (*plan.stages, plan.totals()):
        if s.note:
            stages_by_note.setdefault(s.note, []).append(s.stage)
    return [f"note: {', '.join(names)}: {note}" for note, names in stages_by_note.items()] + \
        [f"note: {n}" for n in plan.notes]
