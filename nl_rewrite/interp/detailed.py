"""Detailed lexical explanations: pair items ("x" after "y") and exceptions, chosen under one global character budget.

The language is :mod:`.lexical`'s (read back by :class:`.lexical.LexicalSimulator`); this module chooses what to say.
Every candidate item is scored by the squared activation error it removes on the statistics windows, weighted by
the squared norm of its latent's decoder row, so an error is counted by what it does to the coder's output:

- a plain item ("fires on x") predicts the mean activation ``m(x)`` on x: it removes ``n(x)·m(x)²``;
- a previous-token item, as in :func:`.lexical.candidate_items`;
- a pair item ("x" after "y") predicts ``m(y, x)`` there instead of ``m(x)``: it removes ``n(y, x)·(m(y, x) − m(x))²``;
- a start item ("at the start of the text") adds what the plain items leave on the first token, as in
  :func:`.lexical.candidate_items` (token statistics count from the second token on).
  ``m(y, x)`` is shrunk towards ``m(x)`` by ``PAIR_PRIOR`` pseudo-counts, so a pair seen twice says less than one
  seen twenty times. A pair whose mean rounds to strength 0 is an exception ("not on x after y").

All candidates of all latents are ranked by that weighted gain per character, and taken in order until the mean
explanation length reaches the budget: latents that carry more output get longer explanations. Once chosen, a plain
item states its token's mean over the positions none of its latent's chosen pairs cover (a pair overrides it there),
so a latent that fires on x only after y says just that pair. An exception that would override no kept item (no plain
item of x, no previous-token item of y) says nothing and is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nl_rewrite.interp.lexical import (Candidates, LexicalItem, TokenActivations, candidate_items, joined_on_second,
                                      start_means, top_per_latent, write_explanation)

PAIR_PRIOR = 2.0
"""Pseudo-counts of a pair's mean towards its token's mean."""
MIN_PAIR_COUNT = 2
"""A pair seen fewer times in the statistics windows is no candidate."""
PLAIN_PER_LATENT = 64
"""Plain and previous-token candidates kept per latent."""
EXCEPTION_TOKENS = 16
"""Exceptions are looked for after each latent's this many strongest plain tokens."""
MAX_FITS = 8
"""Rounds of :func:`detailed_explanations` trimming the estimate towards the budget."""
SENTENCE_CHARS = 14
"""Estimated characters of sentence words per latent with items ("Fires on", "On", full stops)."""

PLAIN, AFTER, PAIR, START = 0, 1, 2, 3
"""Item kinds: fires on the token; fires on the token after it; fires on the token right after ``before``; fires on
the text's first token (its ``token`` and ``before`` are -1)."""
START_CHARS = len(write_explanation([], start=9)) + 1
"""Characters a start item adds (its sentence and a space)."""


@dataclass(frozen=True)
class Items:
    """Candidate items of every latent (one row each)."""

    latent: Int[Tensor, " c"]
    """The latent the item would explain."""
    token: Int[Tensor, " c"]
    """The token it names (for a previous-token item, the token before the firing position)."""
    before: Int[Tensor, " c"]
    """The pair's preceding token id (-1 for the other kinds)."""
    kind: Int[Tensor, " c"]
    """PLAIN, AFTER, PAIR or START."""
    mean: Float[Tensor, " c"]
    """The value the item would state: a pair's shrunk mean; a plain or previous-token item's mean."""
    gain: Float[Tensor, " c"]
    """The squared activation error the item removes on the statistics windows (before the decoder weighting)."""
    total: Float[Tensor, " c"]
    """Plain and pair items: the latent's summed activation over the item's positions (0 for previous-token items)."""
    count: Float[Tensor, " c"]
    """Plain and pair items: how many positions the item covers (0 for previous-token items)."""

    def __len__(self) -> int:
        return len(self.latent)

    def take(self, index: Tensor) -> "Items":
        return Items(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: Sequence["Items"]) -> "Items":
        return Items(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Items)))


def _from_lexical(c: Candidates, token_counts: Tensor) -> Items:
    count = torch.where(c.previous, torch.zeros(()), token_counts[c.token].float())
    return Items(c.latent, c.token, torch.full_like(c.token, -1), c.previous.long() * AFTER, c.mean, c.gain,
                 c.mean * count, count)


def _lookup(keys: Tensor, values: Tensor, queries: Tensor) -> Tensor:
    """``values`` at ``queries`` among sorted ``keys``; 0 where absent."""
    if not len(keys):
        return torch.zeros(len(queries), dtype=values.dtype)
    pos = torch.searchsorted(keys, queries).clamp_max(len(keys) - 1)
    return torch.where(keys[pos] == queries, values[pos], torch.zeros((), dtype=values.dtype))


def pair_items(cache: TokenActivations, window_ids: Sequence[int], plain: Items, min_count: int = MIN_PAIR_COUNT,
               prior: float = PAIR_PRIOR) -> Items:
    """Pair candidates of every latent: pairs it fires on, and exceptions after its strongest plain tokens."""
    tokens = cache.tokens.long()
    vocab = int(tokens.max()) + 1
    toks = tokens[torch.as_tensor(list(window_ids), dtype=torch.long)]
    bigrams, bigram_counts = torch.unique(toks[:, :-1] * vocab + toks[:, 1:], return_counts=True)
    # a token's mean from the second token on, as the plain items state it (the first is the start item's)
    n_cur = torch.bincount(toks[:, 1:].reshape(-1), minlength=vocab).double()
    rows = cache.rows(window_ids)
    w, p, lat, val = rows["window_ids"].long(), rows["positions"].long(), rows["latent_ids"].long(), rows["values"]
    later = p > 0
    w, p, lat, val = w[later], p[later], lat[later], val[later]
    unigram_keys, inverse = torch.unique(lat * vocab + tokens[w, p], return_inverse=True)
    unigram_sums = torch.zeros(len(unigram_keys), dtype=torch.float64).index_add_(0, inverse, val.double())
    has = p > 0
    fired = (lat[has] * vocab + tokens[w[has], p[has] - 1]) * vocab + tokens[w[has], p[has]]
    pair_keys, pair_inverse = torch.unique(fired, return_inverse=True)
    pair_sums = torch.zeros(len(pair_keys), dtype=torch.float64).index_add_(0, pair_inverse, val[has].double())
    keys = torch.unique(torch.cat([pair_keys, _exception_keys(plain, bigrams, bigram_counts, vocab, min_count)]))
    latent, bigram = keys // (vocab * vocab), keys % (vocab * vocab)
    n = _lookup(bigrams, bigram_counts, bigram).double()
    keep = n >= min_count
    keys, latent, bigram, n = keys[keep], latent[keep], bigram[keep], n[keep]
    token = bigram % vocab
    m_token = _lookup(unigram_keys, unigram_sums, latent * vocab + token) / n_cur[token]
    mean = (_lookup(pair_keys, pair_sums, keys) + prior * m_token) / (n + prior)
    gain = n * (mean - m_token) ** 2
    return Items(latent, token, bigram // vocab, torch.full_like(latent, PAIR), mean.float(), gain.float(),
                 _lookup(pair_keys, pair_sums, keys).float(), n.float())


def _exception_keys(plain: Items, bigrams: Tensor, counts: Tensor, vocab: int, min_count: int) -> Tensor:
    """(latent, y, x) keys for every frequent pair (y, x) whose x is one of the latent's strongest plain tokens."""
    plain = plain.take(torch.nonzero(plain.kind == PLAIN).flatten())
    strongest = plain.take(top_per_latent(plain.latent, plain.gain, EXCEPTION_TOKENS))
    frequent = bigrams[counts >= min_count]
    parts = [strongest.latent[item_of] * vocab * vocab + frequent[bigram_of]
             for item_of, bigram_of in joined_on_second(strongest.token, frequent, vocab)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def candidates(cache: TokenActivations, window_ids: Sequence[int]) -> Items:
    """Every kind of candidate item of every latent, from ``window_ids`` of the cache."""
    toks = cache.tokens[torch.as_tensor(list(window_ids), dtype=torch.long)].long()
    counts = torch.bincount(toks[:, 1:].reshape(-1), minlength=int(cache.tokens.max()) + 1)
    lexical = candidate_items(cache, window_ids, max_per_latent=PLAIN_PER_LATENT)
    plain = _from_lexical(lexical, counts)
    return Items.cat([plain, pair_items(cache, window_ids, plain), _start_items(lexical)])


def _start_items(c: Candidates) -> Items:
    """Start items: what *all* of a latent's plain candidates leave on the first token (which of them the global
    budget keeps is decided later, so this is an estimate where some are dropped)."""
    start = start_means(c)
    latent = torch.nonzero(start > 0).flatten()
    mean = start[latent]
    none = torch.full_like(latent, -1)
    zero = torch.zeros_like(mean)
    return Items(latent, none, none, torch.full_like(latent, START), mean, c.windows * mean ** 2, zero, zero)


def item_chars(items: Items, strings: Sequence[str]) -> Tensor:
    """Characters each item adds to its sentence (quoted tokens, strength, separator)."""
    quoted = torch.tensor([len(s.encode("unicode_escape")) + 2 for s in strings], dtype=torch.float32)
    start = items.kind == START
    chars = torch.where(start, torch.tensor(float(START_CHARS)), quoted[items.token.clamp_min(0)] + len(" (9), "))
    pair = items.kind == PAIR
    chars[pair] += quoted[items.before[pair]] + len(" after ")
    return chars


def detailed_explanations(cache: TokenActivations, window_ids: Sequence[int], mean_chars: float,
                          weights: Float[Tensor, " n_latents"], items: Items | None = None) -> dict[int, str]:
    """latent → explanation, for every latent, with the mean length at most ``mean_chars`` characters.

    ``weights``: each latent's squared decoder-row norm (what an activation error costs at the output)."""
    shortest = len(write_explanation([]))
    if mean_chars < shortest:
        raise ValueError(f"mean_chars {mean_chars} is below {shortest}, the length of an explanation with no items "
                         f"({write_explanation([])!r}): give at least {shortest}")
    items = items if items is not None else candidates(cache, window_ids)
    strings = cache.token_strings(list(range(int(cache.tokens.max()) + 1)))
    chars = item_chars(items, strings)
    order = torch.argsort(items.gain * weights[items.latent].float() / chars, descending=True, stable=True)
    ranked, chars = items.take(order), chars[order]
    budget = target = mean_chars * cache.n_latents
    for _ in range(MAX_FITS):
        texts = _write_all(ranked, _prefix_within(ranked, chars, target, cache.n_latents), strings, cache.n_latents)
        total = sum(map(len, texts.values()))
        if total <= budget:
            return texts
        target -= total - budget
    raise RuntimeError(f"explanations still {total} characters over a {budget:.0f}-character budget")


def _prefix_within(ranked: Items, chars: Tensor, budget: float, n_latents: int) -> int:
    """How many of the ranked items fit ``budget`` characters, by estimate: items' characters, sentence words of
    each latent that has items, and the no-item sentence of each latent that has none."""
    _, index = torch.unique(ranked.latent, return_inverse=True)
    # an item is its latent's first in the ranking when no earlier item shares its latent
    earliest = torch.full((int(index.max()) + 1 if len(index) else 0,), len(ranked), dtype=torch.long)
    earliest.scatter_reduce_(0, index, torch.arange(len(ranked)), reduce="amin")
    first = torch.arange(len(ranked)) == earliest[index]
    empty = len(write_explanation([]))
    # not monotone: a latent's first item replaces the longer no-item sentence
    total = n_latents * empty + torch.cumsum(chars + first * (SENTENCE_CHARS - empty), 0)
    fits = torch.nonzero(total <= budget).flatten()
    return int(fits.max()) + 1 if len(fits) else 0


def _write_all(ranked: Items, n: int, strings: Sequence[str], n_latents: int) -> dict[int, str]:
    chosen = ranked.take(torch.arange(n))
    order = torch.argsort(chosen.latent, stable=True)
    chosen = chosen.take(order)
    out = {lat: write_explanation([]) for lat in range(n_latents)}
    bounds = torch.searchsorted(chosen.latent, torch.unique(chosen.latent)).tolist() + [len(chosen)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[int(chosen.latent[lo])] = write_explanation(*_latent_items(chosen.take(torch.arange(lo, hi)), strings))
    return out


def _latent_items(items: Items, strings: Sequence[str]) -> tuple[list[LexicalItem], int]:
    """One latent's chosen items as text items and its start item's strength (0: none), strengths 0-9 relative to
    its strongest. A plain item states its
    token's mean over the positions no chosen pair covers (a pair overrides it there); an exception (a pair of
    strength 0) is kept only where it changes a prediction: beside a plain item of its token, or a previous-token
    item of its token before."""
    pair = items.kind == PAIR
    mean = items.mean.clone()
    for i in torch.nonzero(items.kind == PLAIN).flatten().tolist():
        covered = pair & (items.token == items.token[i])
        rest = float(items.count[i] - items.count[covered].sum())
        mean[i] = float(items.total[i] - items.total[covered].sum()) / rest if rest > 0 else 0.0
    scale = float(mean.max())
    strength = (9 * mean / scale).round().long().tolist() if scale > 0 else [0] * len(items)
    kept = [(int(items.token[i]), int(items.kind[i])) for i in range(len(items)) if strength[i] >= 1]
    plain = {t for t, k in kept if k == PLAIN}
    after = {t for t, k in kept if k == AFTER}
    out, start = [], 0
    for t, b, k, st in zip(items.token.tolist(), items.before.tolist(), items.kind.tolist(), strength):
        if k == START:
            start = st
        elif k == PAIR:
            if st > 0 or t in plain or b in after:
                out.append(LexicalItem(strings[t], st, before=strings[b]))
        elif st >= 1:
            out.append(LexicalItem(strings[t], st, previous=k == AFTER))
    return out, start
