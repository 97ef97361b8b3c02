"""An instruct model run in-process with torch (fp32, CPU): the offline backend.

Scoring tokenises ``prefix`` once and every segment on its own, then concatenates the ids, so each
read point falls exactly on a segment end (no BPE merge across a boundary can move it). The prefix's
KV cache is computed once and kept in a small LRU keyed by prefix text; every request sharing that
prefix runs only its own segments, in ONE forward pass that computes logits only at the read points.

Choices are matched literally: each must encode to exactly one token. For SmolLM2, digits are single
tokens ("3") but " 3" is two ("Ġ", "3"), so put the separator (space, tab) at the end of the segment
before the read point and use bare digits as choices.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nl_rewrite.errors import LLMError
from nl_rewrite.placement import Placement, place
from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.templates import render_with
from nl_rewrite.llm.token_layout import layout

log = logging.getLogger(__name__)


@dataclass
class _Prefix:
    """A computed prefix: its KV cache, its length, and the log-probs after its last token."""

    cache: object | None  # transformers DynamicCache; None for an empty prefix
    n_tokens: int
    last_logprobs: Float[Tensor, " vocab"] | None


class EmbeddedBackend:
    """The ``LLMBackend`` protocol on a local HF causal LM.

    ``reuse_prefix=False`` recomputes the prefix for every request (the benchmark's baseline).
    ``batch_size`` groups requests that share a prefix into one right-padded forward pass (4 measured 1.37×
    faster than 1 on this CPU for ~14-token bodies after a 308-token prefix; see benchmarks/llm_backend.py).
    """

    def __init__(self, model: str = "smollm2-135m", *, reuse_prefix: bool = True, batch_size: int = 4,
                 max_prefixes: int = 4, progress: bool = False, placement: Placement = Placement()) -> None:
        from nl_rewrite.model.loading import load_hf

        if batch_size < 1 or max_prefixes < 1:
            raise ValueError(f"batch_size and max_prefixes must be >= 1, got {batch_size}, {max_prefixes}")
        self.model_name = model
        # the cache of LLM calls keys replies by this: another precision gives other replies (float32 keeps its key)
        self.backend_id = f"embedded:{model}" + ("" if placement.dtype == "float32" else f"@{placement.dtype}")
        self.reuse_prefix = reuse_prefix
        self.batch_size = batch_size
        self.max_prefixes = max_prefixes
        self.progress = progress
        # fused attention: an explanation prompt's prefill (~1,300 tokens) took 4.7-5.8 s against 9.9-11.2 s eager
        self.model, self.tokenizer = load_hf(model, attention="sdpa")
        self.placement = placement
        self.device = placement.torch_device
        place(self.model, placement)
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self._choice_ids: dict[str, int] = {}
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._lock = threading.RLock()  # one forward at a time: the server calls us from many threads

    def __reduce__(self):
        """Pickled as its recipe: a worker that receives it loads its own copy of the model."""
        options = dict(reuse_prefix=self.reuse_prefix, batch_size=self.batch_size, max_prefixes=self.max_prefixes,
                       progress=self.progress, placement=self.placement)
        return (functools.partial(EmbeddedBackend, **options), (self.model_name,))

    def __repr__(self) -> str:
        return f"EmbeddedBackend(model={self.model_name!r}, reuse_prefix={self.reuse_prefix})"

    # ---- tokens -------------------------------------------------------------------------------

    def encode_prefix(self, text: str) -> list[int]:
        """The prefix carries the model's special start tokens (BOS where the tokenizer adds one)."""
        return self.tokenizer(text, add_special_tokens=True).input_ids if text else self._bos_only()

    def encode_segment(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _bos_only(self) -> list[int]:
        ids = self.tokenizer("", add_special_tokens=True).input_ids
        return list(ids)

    def choice_id(self, choice: str) -> int:
        """The single token id of ``choice``; an ``LLMError`` naming it if it is not one token."""
        if choice not in self._choice_ids:
            ids = self.encode_segment(choice)
            if len(ids) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(ids)
                hint = ""
                if choice != choice.strip() and len(self.encode_segment(choice.strip())) == 1:
                    hint = f"; {choice.strip()!r} is one token: end the segment before the read point with the whitespace instead"
                raise LLMError(f"choice {choice!r} is {len(ids)} tokens {pieces} for {self.model_name}, "
                               f"must be exactly one{hint}")
            self._choice_ids[choice] = ids[0]
        return self._choice_ids[choice]

    # ---- scoring ------------------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[Float[Tensor, "n_read n_choices"]]:
        from tqdm import tqdm

        results: list[Tensor | None] = [None] * len(requests)
        groups = _group_by_prefix(requests, self.batch_size)
        with self._lock, torch.inference_mode(), tqdm(total=len(requests), desc="score", unit="prompt",
                                                       disable=not self.progress) as bar:
            for indices in groups:
                batch = [requests[i] for i in indices]
                for i, out in zip(indices, self._score_group(batch)):
                    results[i] = out
                bar.update(len(indices))
        return results  # type: ignore[return-value]

    def _score_group(self, batch: list[ScoreRequest]) -> list[Tensor]:
        """Score requests that share one prefix: one forward pass for the whole group."""
        choice_ids = [torch.tensor([self.choice_id(c) for c in r.choices]) for r in batch]
        suffixes, reads = zip(*(self._suffix_and_reads(r) for r in batch))
        if self.reuse_prefix:
            prefix = self._prefix(batch[0].prefix)
            logprobs = self._suffix_logprobs(prefix, list(suffixes), list(reads))
        else:
            logprobs = self._full_logprobs(batch[0].prefix, list(suffixes), list(reads))
        return [lp[:, ids.to(lp.device)].cpu() for lp, ids in zip(logprobs, choice_ids)]  # results live on the CPU

    def _suffix_and_reads(self, request: ScoreRequest) -> tuple[list[int], list[int]]:
        """The segments' ids, and each read point as an index into them (-1 = the prefix's last token).
        The prefix is left out here: its KV cache is computed once, apart (see ``_prefix``)."""
        lay = layout(request, lambda _prefix: [], self.encode_segment)
        return list(lay.ids), list(lay.reads)

    def _prefix(self, text: str) -> _Prefix:
        """The prefix's KV cache, from the LRU or computed now."""
        if text in self._prefixes:
            self._prefixes.move_to_end(text)
            return self._prefixes[text]
        ids = self.encode_prefix(text)
        if not ids:
            entry = _Prefix(None, 0, None)
        else:
            out = self.model(torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
            entry = _Prefix(returned_cache(out), len(ids), out.logits[0, -1].float().log_softmax(-1))
        self._prefixes[text] = entry
        while len(self._prefixes) > self.max_prefixes:
            self._prefixes.popitem(last=False)
        return entry

    def _suffix_logprobs(self, prefix: _Prefix, suffixes: list[list[int]], reads: list[list[int]]
                         ) -> list[Float[Tensor, "n_read vocab"]]:
        """Run the suffixes on a copy of the prefix cache; log-probs at each read point."""
        for r in reads:
            if min(r, default=0) < 0 and prefix.last_logprobs is None:
                raise LLMError("a read point falls before the first token: the prompt is empty up to there")
        needed = sorted({p for r in reads for p in r if p >= 0})
        if not needed:  # every read point is at the prefix's end: no forward pass at all
            return [prefix.last_logprobs.expand(len(r), -1) for r in reads]  # type: ignore[union-attr]
        tokens = right_padded(suffixes, self.tokenizer.pad_token_id or 0, self.device)
        past = None
        if prefix.cache is not None:
            past = copy.deepcopy(prefix.cache)
            if len(suffixes) > 1:
                past.batch_repeat_interleave(len(suffixes))
        out = self.model(tokens, use_cache=past is not None, logits_to_keep=torch.tensor(needed, device=self.device),
                         **{self._cache_arg: past})
        logprobs = out.logits.float().log_softmax(-1)  # [batch, len(needed), vocab]
        column = {p: j for j, p in enumerate(needed)}
        return [torch.stack([logprobs[b, column[p]] if p >= 0 else prefix.last_logprobs for p in r])  # type: ignore[misc]
                if r else logprobs.new_zeros(0, logprobs.shape[-1]) for b, r in enumerate(reads)]

    def _full_logprobs(self, prefix_text: str, suffixes: list[list[int]], reads: list[list[int]]
                       ) -> list[Float[Tensor, "n_read vocab"]]:
        """The no-reuse baseline: prefix and segments in one sequence, one pass per group."""
        prefix_ids = self.encode_prefix(prefix_text)
        shift = len(prefix_ids)
        empty = _Prefix(None, 0, None)
        shifted = [[p + shift for p in r] for r in reads]
        if any(p < 0 for r in shifted for p in r):
            raise LLMError("a read point falls before the first token: the prompt is empty up to there")
        return self._suffix_logprobs(empty, [prefix_ids + s for s in suffixes], shifted)

    # ---- for callers that drive the model token by token (the HTTP server) ---------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model alone, without autograd: the server calls us from many threads."""
        with self._lock, torch.inference_mode():
            yield

    def forward_cached(self, ids: Int[Tensor, "1 pos"], cache: object = None) -> tuple[Float[Tensor, "pos vocab"], object]:
        """Logits for ``ids`` continuing from ``cache`` (``None``: from scratch), and the cache to continue from."""
        extra = {self._cache_arg: cache} if cache is not None else {}
        out = self.model(ids.to(self.device), use_cache=True, **extra)
        return out.logits[0], returned_cache(out)

    # ---- chat ---------------------------------------------------------------------------------

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        from tqdm import tqdm

        with self._lock, torch.inference_mode():
            return [self._chat_one(r) for r in tqdm(requests, desc="chat", unit="reply", disable=not self.progress)]

    def chat_prompt(self, request: ChatRequest) -> str:
        """The templated prompt with the assistant turn opened and ``prefill`` appended."""
        return render_with(self.tokenizer, request)

    def _chat_one(self, request: ChatRequest) -> str:
        ids = self.tokenizer(self.chat_prompt(request), add_special_tokens=False, return_tensors="pt").input_ids
        new = self.generate(ids, request.max_tokens, request.temperature, seed=int(request.key()[:8], 16))
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def generate(self, ids: Int[Tensor, "1 pos"], max_tokens: int, temperature: float, seed: int = 0
                 ) -> list[int]:
        """Greedy (temperature 0) or sampled continuation ids, without the prompt; stops at EOS.

        Sampling seeds a forked RNG from ``seed`` so a request always gets the same reply.
        """
        if max_tokens <= 0:
            return []
        sample = temperature > 0
        options = dict(do_sample=sample, temperature=temperature if sample else None, top_p=None, top_k=None)
        ids = ids.to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **options)
        return out[0, ids.shape[1]:].tolist()


def returned_cache(output):
    """The KV cache a forward pass returned, under either name transformers has used for it."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _group_by_prefix(requests: Sequence[ScoreRequest], batch_size: int) -> list[list[int]]:
    """Request indices grouped by shared prefix, in chunks of at most ``batch_size``."""
    by_prefix: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_prefix.setdefault(r.prefix, []).append(i)
    return [idx[j:j + batch_size] for idx in by_prefix.values() for j in range(0, len(idx), batch_size)]


def right_padded(rows: Sequence[list[int]], pad_id: int, device: torch.device | str = "cpu") -> Int[Tensor, "batch pos"]:
    """Right padding needs no attention mask: under causal attention, real tokens never see later pads."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
