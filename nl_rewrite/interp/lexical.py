"""Lexical explanations: a statistical explainer that covers every latent, and a reader that simulates from text.

The explainer reads token statistics of the ``explain`` split's latent cache and writes one short English
sentence per latent, naming the tokens it fires on and, where that helps, the token before, each with a
strength 1–9::

    Fires on " tax" (9), " taxes" (8), " revenue" (5); weakly on " duty" (2). After " the" (3).

Items are chosen greedily by how much squared activation they explain: a current-token item for token t with
mean activation m over its n occurrences explains n·m²; a previous-token item is scored the same way on what
the current-token table leaves unexplained. ``budget`` caps the number of items (the explanation's length).
Token strings are JSON-quoted, so any token (quotes, newlines, spaces) round-trips.

The language also has *pair items*, which :mod:`.detailed` writes: ``On " rate" after " tax" (7).`` states the
strength on " rate" right after " tax", and an exception ``Not on " tax" after " the".`` states 0 there.

And a *start item*: ``At the start of the text (9).`` adds its strength on the text's first token, whatever that
token is (as a previous-token item adds to the current token's). The first token of a window has no context, and
some latents fire on it far above anything else (at SmolLM2's MLP 10, 31 latents fire on the first token of more
than half the windows, up to 17 where they reach 1-2 elsewhere; docs/results.md): without this item their
explanations list the rare words that happened to start windows. With ``first_position=1`` (the default),
:func:`candidate_items` counts token statistics from the second token on, and a latent's start item states what
they leave unexplained on the first.

The reader (:class:`LexicalSimulator`) parses only the text, never the cache, and predicts per token the strength
of its pair item where the token before matches one, else the strength of the current token's item plus that of
the previous token's item (plus the start item's on the first token); calibrators map that score to an activation, exactly as for the LLM simulator. It has the LLM simulator's interface (``identity``, ``stats``,
``simulate_many``) so it can fill a :class:`SimulationStore`, and ``simulate_windows`` reads every latent on a set
of windows by table lookups: every latent of a coder in seconds, so the pipeline recomputes it instead of storing
it. A text it cannot parse is a counted, logged fallback (score 0 for that latent), never a crash.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nl_rewrite.interp.simulate import SimulationItem, SimulatorStats

log = logging.getLogger(__name__)

LEXICAL_VERSION = 1
"""The reader's version. Pair items, exceptions and the start item extend the language; a text without them reads
exactly as before, so results cached under this version stay valid."""
EXPLAINER_VERSION = 2
"""The explainer's: 2 counts token statistics from the second token on and writes start items. What is trained on
its texts (the trained simulator) is keyed by it; evaluations are keyed by the texts themselves."""
DEFAULT_BUDGET = 12
"""Items per explanation: the headline lexical condition's, and so what the trained simulator learns to read."""
WEAK_BELOW = 3
"""Items with strength below this are listed after "weakly on"."""
_STRING = r'"(?:[^"\\]|\\.)*"'
START = "At the start of the text"
"""The start item's words, followed by its strength in parentheses."""
_START = r"(?i:\bat\s+the\s+start\s+of\s+the\s+text\b)"
_ITEM = re.compile(rf'({_STRING})\s+after\s+({_STRING})(?:\s*\((\d+)\))?|({_STRING})\s*\((\d+)\)|\b([Aa]fter)\b'
                   rf'|\b(Fires|On|Not on)\b|{_START}\s*\((\d+)\)')
_BARE_START = re.compile(rf"{_START}(?!\s*\(\d)")
"""A pair item (``"x" after "y" (s)``, or without a strength: an exception), a plain item (``"x" (s)``), a
section word (plain items after ``After`` fire on the next token; ``Fires``, ``On`` and ``Not on`` switch back), or
the start item."""


@dataclass(frozen=True)
class LexicalItem:
    token: str
    strength: int
    previous: bool = False
    """True: the item fires on the token *after* ``token``."""
    before: str | None = None
    """A pair item: it fires on ``token`` only right after ``before``, with ``strength`` (0: an exception, it does
    not fire there), whatever the plain items say."""


@dataclass(frozen=True)
class ParsedExplanation:
    current: dict[str, int]
    previous: dict[str, int]
    problems: tuple[str, ...] = ()
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)
    """(token before, token) → strength; it overrides ``current`` and ``previous`` at those positions."""
    start: int = 0
    """The start item's strength, added on the text's first token (0: no start item)."""

    @property
    def empty(self) -> bool:
        return not (self.current or self.previous or self.pairs or self.start)


# Module-level, not nested in write_explanation: the test session's type-check hook decorates a nested def each time
# its parent runs, once per latent per budget (14,512 decorations, about 10 s of a smoke rerun).
def _quoted(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


def _listed(group: list[LexicalItem]) -> str:
    """``"token" (strength)`` items (``"token" after "before" (strength)`` for pairs), comma-separated."""
    return ", ".join((f"{_quoted(i.token)} after {_quoted(i.before)}" if i.before is not None else _quoted(i.token))
                     + (f" ({i.strength})" if i.strength else "") for i in group)


def write_explanation(items: Sequence[LexicalItem], start: int = 0) -> str:
    """The English sentence for ``items`` (order kept within each group) and a start item of strength ``start``
    (none if 0)::

        At the start of the text (9). Fires on " tax" (9); weakly on " duty" (2). On " rate" after " tax" (7).
        Not on " tax" after " the". After " income" (3).
    """
    plain = [i for i in items if not i.previous and i.before is None]
    strong = [i for i in plain if i.strength >= WEAK_BELOW]
    weak = [i for i in plain if i.strength < WEAK_BELOW]
    pairs = [i for i in items if i.before is not None and i.strength > 0]
    exceptions = [i for i in items if i.before is not None and i.strength == 0]
    after = [i for i in items if i.previous and i.before is None]
    parts = [f"{START} ({start})."] if start else []
    if strong:
        parts.append(f"Fires on {_listed(strong)}" + (f"; weakly on {_listed(weak)}" if weak else "") + ".")
    elif weak:
        parts.append(f"Fires weakly on {_listed(weak)}.")
    if pairs:
        parts.append(f"On {_listed(pairs)}.")
    if exceptions:
        parts.append(f"Not on {_listed(exceptions)}.")
    if after:
        parts.append(f"After {_listed(after)}.")
    return " ".join(parts) if parts else "Fires on no particular token."


def _strength(value: str, token: str, problems: list[str]) -> int:
    strength = int(value)
    if not 1 <= strength <= 9:
        problems.append(f"strength {strength} of {token!r} outside 1-9")
    return min(max(strength, 1), 9)


def _token(quoted: str, problems: list[str]) -> str | None:
    try:
        return json.loads(quoted)
    except json.JSONDecodeError:
        problems.append(f"unreadable token {quoted[:30]}")
        return None


@lru_cache(maxsize=16384)
def parse_explanation(text: str) -> ParsedExplanation:
    """Items of a lexical explanation. Anything malformed is reported in ``problems``, never raised."""
    current: dict[str, int] = {}
    previous: dict[str, int] = {}
    pairs: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    table, start = current, 0
    for match in _ITEM.finditer(text):
        pair_token, before, pair_strength, token, strength, after, other, start_strength = match.groups()
        if start_strength is not None:
            start = max(start, _strength(start_strength, START, problems))
        elif after or other:
            table = previous if after else current
        elif pair_token is not None:
            x, y = _token(pair_token, problems), _token(before, problems)
            if x is not None and y is not None:
                pairs[(y, x)] = _strength(pair_strength, x, problems) if pair_strength else 0
        elif (t := _token(token, problems)) is not None:
            table[t] = max(table.get(t, 0), _strength(strength, t, problems))
    if _BARE_START.search(text):
        problems.append(f"'{START}' without a strength")
    if not (current or previous or pairs or start) and "no particular token" not in text:
        problems.append("no '\"token\" (strength)' items found")
    return ParsedExplanation(current, previous, tuple(problems), pairs, start)


def explanation_problems(texts: dict[int, str]) -> tuple[int, int]:
    """(unparseable explanations, explanations with partial problems such as clamped strengths), for reports."""
    parsed = [parse_explanation(t) for t in texts.values()]
    unparseable = sum(1 for p in parsed if p.problems and p.empty)
    return unparseable, sum(1 for p in parsed if p.problems) - unparseable


def read_scores(parsed: ParsedExplanation, tokens: Sequence[str]) -> Float[Tensor, " pos"]:
    """Per token: its pair item's strength where the token before matches one; else strength of its own item +
    strength of the previous token's item (0 where none). The first token has no token before it; the start item's
    strength is added to it."""
    # a loop, not a helper function: under the tests' runtime type checks a nested function is decorated anew on
    # every call, which made this the plumbing run's most expensive line
    scores = []
    for i, t in enumerate(tokens):
        pair = (tokens[i - 1], t) if i else None
        if pair in parsed.pairs:
            scores.append(parsed.pairs[pair])
        else:
            scores.append(parsed.current.get(t, 0) + (parsed.previous.get(tokens[i - 1], 0) if i else 0))
    if scores:
        scores[0] += parsed.start
    return torch.tensor(scores, dtype=torch.float32)


def strength_table(strengths: dict[str, int], vocabulary: dict[str, int]) -> Float[Tensor, " vocab"]:
    """Strength per vocabulary id (index 0, tokens outside the vocabulary, reads 0)."""
    table = torch.zeros(len(vocabulary) + 1)
    for token, strength in strengths.items():
        if token in vocabulary:
            table[vocabulary[token]] = strength
    return table


def encode_windows(windows: Sequence[Sequence[str]]) -> tuple[dict[str, int], Int[Tensor, "n pos"]]:
    """A vocabulary of the windows' token strings (ids from 1) and the windows as ids; equal lengths only."""
    lengths = {len(w) for w in windows}
    if len(lengths) > 1:
        raise ValueError(f"windows of different lengths {sorted(lengths)}: read them in groups of one length")
    vocabulary: dict[str, int] = {}
    ids = [[vocabulary.setdefault(t, len(vocabulary) + 1) for t in w] for w in windows]
    return vocabulary, torch.tensor(ids, dtype=torch.long).reshape(len(windows), next(iter(lengths), 0))


@dataclass
class LexicalSimulator:
    """Simulates a latent from its lexical explanation alone (see the module docstring)."""

    stats: SimulatorStats = field(default_factory=SimulatorStats)
    unparseable: set[str] = field(default_factory=set)
    """Explanations that could not be parsed (their latents are simulated as 0), each logged once."""

    @property
    def fallbacks(self) -> int:
        return len(self.unparseable)

    @property
    def identity(self) -> str:
        return f"lexical-reader|v{LEXICAL_VERSION}"

    def simulate(self, explanation: str, tokens: Sequence[str]) -> Float[Tensor, " pos"]:
        return self.simulate_many([SimulationItem(explanation, tuple(tokens))])[0]

    def simulate_many(self, items: Sequence[SimulationItem]) -> list[Float[Tensor, " pos"]]:
        out = []
        for item in items:
            out.append(read_scores(self.parsed(item.explanation), item.tokens))
            self.stats.windows += 1
            self.stats.predictions += len(item.tokens)
        return out

    def simulate_windows(self, explanations: dict[int, str], windows: Sequence[Sequence[str]]
                         ) -> dict[int, Float[Tensor, "n pos"]]:
        """Every latent on every window at once (equal lengths): the same numbers as ``simulate_many``, read by
        table lookups over the windows' vocabulary instead of a Python loop per token."""
        vocabulary, ids = encode_windows(windows)
        before = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)  # id 0 before the first token
        out = {}
        for latent, text in explanations.items():
            parsed = self.parsed(text)
            scores = strength_table(parsed.current, vocabulary)[ids] + strength_table(parsed.previous, vocabulary)[before]
            for (y, x), strength in parsed.pairs.items():
                if x in vocabulary and y in vocabulary:
                    scores[(ids == vocabulary[x]) & (before == vocabulary[y])] = float(strength)
            if parsed.start and scores.shape[1]:
                scores[:, 0] += float(parsed.start)
            out[latent] = scores
        self.stats.windows += len(windows) * len(explanations)
        self.stats.predictions += ids.numel() * len(explanations)
        return out

    def parsed(self, explanation: str) -> ParsedExplanation:
        """The explanation's items; an unparseable one is logged once and read as no items (score 0)."""
        parsed = parse_explanation(explanation)
        if parsed.problems and parsed.empty and explanation not in self.unparseable:
            self.unparseable.add(explanation)
            log.warning("lexical reader: cannot parse explanation %r (%s); simulating 0 for it",
                        explanation[:60], "; ".join(parsed.problems))
        return parsed


# ---- the explainer ------------------------------------------------------------------------------------------

@runtime_checkable
class TokenActivations(Protocol):
    """What the lexical explainers read of a :class:`LatentCache`: the windows' tokens, the sparse activation rows of
    some windows, and the token strings (a test may hand in latents defined by rules on the tokens)."""

    @property
    def tokens(self) -> Int[Tensor, "n_windows window"]: ...

    @property
    def n_latents(self) -> int: ...

    def rows(self, window_ids: Sequence[int]) -> dict[str, Tensor]: ...

    def token_strings(self, ids: list[int]) -> list[str]: ...


@dataclass(frozen=True)
class Candidates:
    """Every candidate item of every latent, sorted by latent, then by explained squared activation (desc)."""

    latent: Int[Tensor, " c"]
    token: Int[Tensor, " c"]
    previous: Tensor
    """bool [c]: a previous-token item."""
    mean: Float[Tensor, " c"]
    gain: Float[Tensor, " c"]
    first_sum: Float[Tensor, " n_latents"] | None = None
    """Each latent's summed activation on the windows' first token (None: no start items; the first token's
    statistics are then in the token items)."""
    first_count: Float[Tensor, " c"] | None = None
    """Per candidate: how many windows start with its token (0 for previous-token items), so that a start item
    states what the items an explanation keeps leave on the first token."""
    windows: int = 0
    """Statistics windows: the start item's number of occurrences."""


def _grouped_sums(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    unique, inverse = torch.unique(keys, return_inverse=True)
    return unique, torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, values.double())


def candidate_items(cache: TokenActivations, window_ids: Sequence[int], max_per_latent: int = 64,
                    min_count: int = 1, first_position: int = 1) -> Candidates:
    """Current- and previous-token candidate items of every latent, from ``window_ids`` of the cache.
    A token seen fewer than ``min_count`` times is no candidate. (2 instead of 1 lowered held-out Pearson
    slightly, 0.441 vs 0.452, on SmolLM2's MLP 10, so single occurrences are kept by default.) With
    ``first_position=1`` (the default) token items are counted from the second token on, and ``first_sum`` and
    ``first_count`` let :func:`lexical_explanations` state what the kept items leave on the first token; with 0,
    the language before start items."""
    if first_position not in (0, 1):
        raise ValueError(f"first_position is 0 (token items everywhere) or 1 (start items), got {first_position}")
    rows = cache.rows(window_ids)
    tokens = cache.tokens.long()
    vocab = int(tokens.max()) + 1
    chosen = torch.as_tensor(list(window_ids), dtype=torch.long)
    toks = tokens[chosen]
    n_cur = torch.bincount(toks[:, first_position:].reshape(-1), minlength=vocab).double()
    n_prev = torch.bincount(toks[:, :-1].reshape(-1), minlength=vocab).double()
    w, p, lat, val = rows["window_ids"].long(), rows["positions"].long(), rows["latent_ids"].long(), rows["values"]
    first = p < first_position
    on_first = torch.zeros(cache.n_latents, dtype=torch.float64).index_add_(0, lat[first], val[first].double())
    w, p, lat, val = w[~first], p[~first], lat[~first], val[~first]
    cur = tokens[w, p]
    keys, sums = _grouped_sums(lat * vocab + cur, val)
    c_lat, c_tok = keys // vocab, keys % vocab
    c_mean = sums / n_cur[c_tok]
    # previous-token items explain what is left after the current-token table
    has_prev = p > 0
    prev_tok = tokens[w[has_prev], p[has_prev] - 1]
    pkeys, psums = _grouped_sums(lat[has_prev] * vocab + prev_tok, val[has_prev])
    expected = _expected_by_previous(c_lat, c_tok, c_mean, toks, vocab, pkeys)
    p_lat, p_tok = pkeys // vocab, pkeys % vocab
    p_mean = (psums - expected) / n_prev[p_tok]
    c_ok = n_cur[c_tok] >= min_count
    c_lat, c_tok, c_mean = c_lat[c_ok], c_tok[c_ok], c_mean[c_ok]
    keep = (p_mean > 0) & (n_prev[p_tok] >= min_count)
    latent = torch.cat([c_lat, p_lat[keep]])
    token = torch.cat([c_tok, p_tok[keep]])
    previous = torch.cat([torch.zeros(len(c_lat), dtype=torch.bool), torch.ones(int(keep.sum()), dtype=torch.bool)])
    mean = torch.cat([c_mean, p_mean[keep]])
    gain = torch.cat([n_cur[c_tok] * c_mean ** 2, n_prev[p_tok][keep] * p_mean[keep] ** 2])
    first_sum = first_count = None
    if first_position:
        n_first = torch.bincount(toks[:, 0], minlength=vocab).float()
        first_sum, first_count = on_first.float(), torch.where(previous, torch.zeros(()), n_first[token])
    return _top_per_latent(Candidates(latent, token, previous, mean.float(), gain.float(), first_sum, first_count,
                                      len(chosen)), max_per_latent)


def _expected_by_previous(c_lat: Tensor, c_tok: Tensor, c_mean: Tensor, toks: Tensor, vocab: int,
                          pkeys: Tensor) -> Tensor:
    """For each (latent, previous token) key: Σ over positions after that token of the current-token mean."""
    bigrams, counts = torch.unique(toks[:, :-1] * vocab + toks[:, 1:], return_counts=True)
    first = bigrams // vocab
    # join current-token items (latent, t) with bigrams (u, t) on t: contributes count(u,t)·mean(latent,t) to (latent,u)
    out = torch.zeros(len(pkeys), dtype=torch.float64)
    for item_of, bigram_of in joined_on_second(c_tok, bigrams, vocab):
        keys = c_lat[item_of] * vocab + first[bigram_of]
        pos = torch.searchsorted(pkeys, keys).clamp_max(max(len(pkeys) - 1, 0))
        found = pkeys[pos] == keys if len(pkeys) else torch.zeros_like(keys, dtype=torch.bool)
        out.index_add_(0, pos[found], (counts[bigram_of].double() * c_mean[item_of])[found])
    return out


JOIN_CHUNK = 4_000_000
"""Rows of an (item × predecessor) join held at once in :func:`joined_on_second`."""


def joined_on_second(tokens: Int[Tensor, " i"], bigrams: Int[Tensor, " b"], vocab: int
                     ) -> Iterator[tuple[Int[Tensor, " r"], Int[Tensor, " r"]]]:
    """The join of items (their ``tokens``) with the bigrams ``u·vocab + t`` whose second token is theirs, as
    (item index, bigram index) rows. Frequent tokens have thousands of predecessors, so the rows come in chunks of
    about ``JOIN_CHUNK``."""
    second = bigrams % vocab
    order = torch.argsort(second)
    second_sorted = second[order]
    lo = torch.searchsorted(second_sorted, tokens, right=False)
    span = torch.searchsorted(second_sorted, tokens, right=True) - lo
    ends = torch.cumsum(span, 0)
    start = 0
    while start < len(span):
        stop = max(start + 1, int(torch.searchsorted(ends, int(ends[start]) - int(span[start]) + JOIN_CHUNK)))
        sp = span[start:stop]
        item_of = torch.repeat_interleave(torch.arange(start, stop), sp)
        offsets = torch.arange(int(sp.sum())) - torch.repeat_interleave(torch.cumsum(sp, 0) - sp, sp)
        yield item_of, order[lo[item_of] + offsets]
        start = stop


def top_per_latent(latent: Int[Tensor, " c"], gain: Float[Tensor, " c"], limit: int) -> Int[Tensor, " k"]:
    """Indices of each latent's ``limit`` rows of largest gain, sorted by latent, then by gain (descending)."""
    order = torch.argsort(gain, descending=True, stable=True)
    order = order[torch.argsort(latent[order], stable=True)]
    grouped = latent[order]
    rank = torch.arange(len(grouped)) - torch.searchsorted(grouped, grouped)
    return order[rank < limit]


def _top_per_latent(c: Candidates, limit: int) -> Candidates:
    keep = top_per_latent(c.latent, c.gain, limit)
    first_count = c.first_count[keep] if c.first_count is not None else None
    return Candidates(c.latent[keep], c.token[keep], c.previous[keep], c.mean[keep], c.gain[keep], c.first_sum,
                      first_count, c.windows)


def start_means(c: Candidates) -> Float[Tensor, " n_latents"]:
    """Every latent's start item beside *all* its candidates (see :func:`start_mean`; zeros without start items)."""
    if c.first_sum is None or c.first_count is None:
        return torch.zeros(0)
    expected = torch.zeros_like(c.first_sum).index_add_(0, c.latent, c.first_count * c.mean)
    return ((c.first_sum - expected) / max(c.windows, 1)).clamp_min(0)


def start_mean(c: Candidates, lo: int, hi: int, latent: int) -> float:
    """The start item of ``latent`` beside its candidates ``lo:hi``: its mean activation on the first token beyond
    what those items' tokens predict there (0 if not positive, or without start items)."""
    if c.first_sum is None or c.first_count is None:
        return 0.0
    expected = float((c.first_count[lo:hi] * c.mean[lo:hi]).sum())
    return max(float(c.first_sum[latent]) - expected, 0.0) / max(c.windows, 1)


def lexical_explanations(cache: TokenActivations, window_ids: Sequence[int], budget: int,
                         candidates: Candidates | None = None) -> dict[int, str]:
    """latent → explanation with at most ``budget`` items, for *every* latent: one that never fires in
    ``window_ids`` is explained as firing on no particular token (simulated as silence, never left true). With start
    items (``candidates.first_sum``), a latent's start item competes for the budget by the same gain (occurrences ×
    mean²) as its token items."""
    c = candidates if candidates is not None else candidate_items(cache, window_ids, max_per_latent=budget)
    strings = cache.token_strings(list(range(int(c.token.max()) + 1))) if len(c.token) else []
    out: dict[int, str] = {lat: write_explanation([]) for lat in range(cache.n_latents)}
    ids, counts = torch.unique_consecutive(c.latent, return_counts=True)  # candidates are sorted by latent
    ends = torch.cumsum(counts, 0)
    ranges = {int(lat): (int(end - n), int(end)) for lat, n, end in zip(ids, counts, ends)}
    starts = c.first_sum if c.first_sum is not None else torch.zeros(cache.n_latents)
    for latent in sorted(set(ranges) | set(torch.nonzero(starts > 0).flatten().tolist())):
        lo, hi = ranges.get(latent, (0, 0))
        # the start item takes the place of the token item of smallest gain (they are sorted, largest first), and
        # states what the kept items leave on the first token; it must rank within the budget and round to >= 1
        s = start_mean(c, lo, min(hi, lo + budget - 1), latent)
        with_start = s > 0 and int((c.gain[lo:hi] > c.windows * s ** 2).sum()) < budget
        if with_start:
            scale = max(c.mean[lo:min(hi, lo + budget - 1)].tolist() + [s])
            with_start = round(9 * s / scale) >= 1
        hi = min(hi, lo + budget - int(with_start))
        scale = max(c.mean[lo:hi].tolist() + ([s] if with_start else []))
        items = [LexicalItem(strings[int(t)], int(round(9 * float(m) / scale)), bool(prev))
                 for t, m, prev in zip(c.token[lo:hi], c.mean[lo:hi], c.previous[lo:hi])]
        out[latent] = write_explanation([i for i in items if i.strength >= 1],
                                        int(round(9 * s / scale)) if with_start else 0)
    return out
