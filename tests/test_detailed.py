"""Detailed explanations: pair items and exceptions, chosen under a global character budget, read back exactly."""

import pytest
import torch

from nl_rewrite.interp import detailed
from nl_rewrite.interp.lexical import LexicalItem, LexicalSimulator, parse_explanation, write_explanation

from helpers import INCOME, RATE, TAX, SyntheticCache, first_token_cache, synthetic

def read_back(cache: SyntheticCache, texts: dict[int, str]) -> dict[int, torch.Tensor]:
    windows = [cache.token_strings(w.tolist()) for w in cache.tokens]
    return LexicalSimulator().simulate_windows(texts, windows)


@pytest.mark.parametrize("token", [" tax", 'say "hi"', "a\nb", "é 中文", "  leading", " after ", "Not on", "(3)",
                                   '" after "', "\\"])
def test_every_item_kind_round_trips_any_token(token):
    items = [LexicalItem(token, 9), LexicalItem(token, 2), LexicalItem(" x", 5, before=token),
             LexicalItem(token, 7, before=" y"), LexicalItem(token, 0, before=token), LexicalItem(token, 3, True)]
    parsed = parse_explanation(write_explanation(items))
    assert parsed.problems == ()
    assert parsed.current == {token: 9}  # the weaker plain item of the same token is merged by max
    assert parsed.pairs == {(token, " x"): 5, (" y", token): 7, (token, token): 0}
    assert parsed.previous == {token: 3}


def test_pairs_override_the_plain_items_where_they_apply():
    text = write_explanation([LexicalItem(" tax", 6), LexicalItem(" tax", 9, before=" income"),
                              LexicalItem(" tax", 0, before=" the"), LexicalItem(" the", 2, True)])
    assert text == 'Fires on " tax" (6). On " tax" after " income" (9). Not on " tax" after " the". After " the" (2).'
    tokens = [" tax", " income", " tax", " the", " tax", " a", " tax", " the", " rate"]
    scores = LexicalSimulator().simulate_windows({0: text}, [tokens])[0][0]
    assert scores.tolist() == [6, 0, 9, 0, 0, 0, 6, 0, 2]


def test_a_bigram_latent_gets_one_pair_item_and_reads_back_exactly():
    cache = synthetic()
    texts = detailed.detailed_explanations(cache, range(len(cache)), 40, torch.ones(3))
    parsed = parse_explanation(texts[0])
    assert parsed.pairs == {(" income", " tax"): 9} and not parsed.current and not parsed.previous, texts[0]
    fires = cache.values[..., 0] > 0
    assert torch.equal(read_back(cache, texts)[0] > 0, fires)


def test_an_except_after_latent_gets_an_exception_and_reads_back_exactly():
    cache = synthetic()
    texts = detailed.detailed_explanations(cache, range(len(cache)), 60, torch.ones(3))
    parsed = parse_explanation(texts[1])
    assert parsed.current == {" rate": 9} and parsed.pairs == {(" the", " rate"): 0}, texts[1]
    assert torch.equal(read_back(cache, texts)[1] > 0, cache.values[..., 1] > 0)
    assert texts[2] == "Fires on no particular token."


@pytest.mark.parametrize("mean_chars", [30, 45, 80, 200])
def test_the_global_budget_holds_and_heavier_latents_get_at_least_as_many_items(mean_chars):
    cache = synthetic(seed=1)
    cache.values[..., 2] = cache.values[..., 1]  # latents 1 and 2 are the same, but 2 weighs 10× at the output
    texts = detailed.detailed_explanations(cache, range(len(cache)), mean_chars, torch.tensor([1.0, 1.0, 10.0]))
    assert sum(map(len, texts.values())) <= mean_chars * cache.n_latents

    def n_items(text: str) -> int:
        p = parse_explanation(text)
        return len(p.current) + len(p.previous) + len(p.pairs)

    assert n_items(texts[2]) >= n_items(texts[1])


def test_pair_means_shrink_towards_the_token_mean_and_rare_pairs_are_no_candidates():
    cache = synthetic()
    items = detailed.candidates(cache, range(len(cache)))
    pairs = items.take(torch.nonzero((items.kind == detailed.PAIR) & (items.latent == 0)).flatten())
    assert (pairs.count >= detailed.MIN_PAIR_COUNT).all()
    i = int(torch.nonzero((pairs.token == TAX) & (pairs.before == INCOME)).flatten()[0])
    tax = cache.tokens[:, 1:] == TAX  # the token's mean from the second token on (the first is the start item's)
    m_token = float(cache.values[:, 1:, 0][tax].mean())
    n = float(pairs.count[i])
    assert float(pairs.mean[i]) == pytest.approx((5.0 * n + detailed.PAIR_PRIOR * m_token) / (n + detailed.PAIR_PRIOR),
                                                 rel=1e-5)


def test_a_budget_below_the_empty_sentence_is_refused_with_the_minimum():
    cache = synthetic()
    with pytest.raises(ValueError, match="at least 29"):
        detailed.detailed_explanations(cache, range(len(cache)), 10, torch.ones(3))


def test_the_exception_join_gives_the_same_keys_in_small_chunks(monkeypatch):
    cache = synthetic()
    whole = detailed.candidates(cache, range(len(cache)))
    import nl_rewrite.interp.lexical as lexical

    monkeypatch.setattr(lexical, "JOIN_CHUNK", 3)
    chunked = detailed.candidates(cache, range(len(cache)))
    assert torch.equal(whole.latent, chunked.latent) and torch.equal(whole.before, chunked.before)
    assert torch.equal(whole.mean, chunked.mean)


def test_a_first_token_latent_gets_a_start_item_in_the_detailed_language_too():
    cache = first_token_cache()
    texts = detailed.detailed_explanations(cache, range(len(cache)), 60, torch.ones(cache.n_latents))
    assert texts[0] == "At the start of the text (9).", texts[0]
    assert not parse_explanation(texts[1]).start and parse_explanation(texts[1]).current, texts[1]
    assert torch.equal(read_back(cache, texts)[0] > 0, cache.values[..., 0] > 0)
    chars = detailed.item_chars(detailed.candidates(cache, range(len(cache))), cache.token_strings(range(8)))
    assert len(chars) and (chars > 0).all()
