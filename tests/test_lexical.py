import logging

import pytest
import torch

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.interp.lexical import (LexicalItem, LexicalSimulator, candidate_items, lexical_explanations,
                                parse_explanation, read_scores, start_mean, write_explanation)
from nl_rewrite.interp.simulate import SimulationItem
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
from helpers import VOCAB, first_token_cache


def test_reader_recovers_exact_strengths_from_a_hand_written_explanation():
    text = 'Fires on " tax" (9), " taxes" (8), " revenue" (5); weakly on " duty" (2). After " the" (4), "\\n" (3).'
    parsed = parse_explanation(text)
    assert parsed.current == {" tax": 9, " taxes": 8, " revenue": 5, " duty": 2}
    assert parsed.previous == {" the": 4, "\n": 3}
    assert parsed.problems == ()
    scores = read_scores(parsed, [" the", " tax", " on", " duty", "\n", " revenue"])
    assert scores.tolist() == [0, 4 + 9, 0, 2, 0, 3 + 5]


def test_written_explanations_round_trip_any_token():
    items = [LexicalItem('say "hi"', 9), LexicalItem("a\tb", 4), LexicalItem(" After", 2), LexicalItem("x", 1, True)]
    parsed = parse_explanation(write_explanation(items))
    assert parsed.current == {'say "hi"': 9, "a\tb": 4, " After": 2}
    assert parsed.previous == {"x": 1}


def test_malformed_explanation_is_a_counted_logged_fallback(caplog):
    sim = LexicalSimulator()
    with caplog.at_level(logging.WARNING):
        out = sim.simulate_many([SimulationItem("the marked words are about taxes", ("a", " tax")),
                                 SimulationItem('Fires on " tax" (7).', ("a", " tax"))])
    assert sim.fallbacks == 1
    assert "cannot parse" in caplog.text
    assert out[0].tolist() == [0, 0] and out[1].tolist() == [0, 7]
    bad = parse_explanation('Fires on " tax" (12), "unterminated (3).')
    assert bad.current == {" tax": 9} and any("outside 1-9" in p for p in bad.problems)


def test_reading_all_windows_at_once_equals_reading_them_one_by_one():
    gen = torch.Generator().manual_seed(0)
    vocab = [" the", " tax", "\n", 'say "hi"', " duty", "x", " never"]
    windows = [[vocab[i] for i in torch.randint(0, 6, (9,), generator=gen)] for _ in range(5)]
    texts = {0: 'Fires on " tax" (9); weakly on " duty" (2). After " the" (4), "\\n" (3).',
             3: write_explanation([LexicalItem('say "hi"', 5), LexicalItem("x", 2, True), LexicalItem(" never", 7)]),
             7: "no items at all", 8: "Fires on no particular token.",
             9: write_explanation([LexicalItem(" tax", 4), LexicalItem(" the", 2, True)], start=8)}
    sim = LexicalSimulator()
    at_once = sim.simulate_windows(texts, windows)
    for latent, text in texts.items():
        one_by_one = sim.simulate_many([SimulationItem(text, tuple(w)) for w in windows])
        assert torch.equal(at_once[latent], torch.stack(one_by_one)), latent
    assert at_once[0].abs().sum() > 0 and at_once[3].abs().sum() > 0  # the windows do hit the items
    assert sim.fallbacks == 1
    assert sim.simulate_windows(texts, [])[0].shape == (0, 0)
    with pytest.raises(ValueError, match="different lengths"):
        sim.simulate_windows(texts, [["a"], ["a", "b"]])


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory):
    cfg = CoderConfig(d_in=32, d_out=32, n_latents=24, k=3, read_site="mlp_in.1", write_site="mlp_out.1", model="tiny")
    coder = SparseCoder(cfg, seed=1)
    tokens = torch.randint(1, 40, (24, 12), generator=torch.Generator().manual_seed(3))
    windows = TokenWindows(tokens, [f"d{i}" for i in range(24)], "explain")
    return LatentCache.build(tiny, coder, windows, tmp_path_factory.mktemp("lexcache"), progress=False)


def test_explainer_picks_the_token_explaining_most_squared_activation(tiny_cache):
    ids = list(range(len(tiny_cache)))
    cands = candidate_items(tiny_cache, ids, max_per_latent=6, first_position=0)
    rows = tiny_cache.rows(ids)
    tokens = tiny_cache.tokens
    latent = int(torch.mode(rows["latent_ids"]).values)
    mine = rows["latent_ids"] == latent
    cur = tokens[rows["window_ids"][mine].long(), rows["positions"][mine].long()]
    counts = torch.bincount(tokens.reshape(-1), minlength=64).double()
    sums = torch.zeros(64, dtype=torch.float64).index_add_(0, cur, rows["values"][mine].double())
    best = int(torch.argmax(sums ** 2 / counts.clamp_min(1)))
    top_current = [i for i in torch.nonzero(cands.latent == latent).flatten().tolist() if not cands.previous[i]][0]
    assert int(cands.token[top_current]) == best


def test_explanations_respect_the_budget_and_parse_cleanly(tiny_cache):
    ids = list(range(len(tiny_cache)))
    for budget in (1, 3):
        texts = lexical_explanations(tiny_cache, ids, budget)
        assert sorted(texts) == list(range(tiny_cache.n_latents)), "every latent is explained, even silent ones"
        for latent, text in texts.items():
            parsed = parse_explanation(text)
            assert parsed.problems == ()
            if int(tiny_cache.stats.count[latent]) == 0:
                assert text == "Fires on no particular token." and not parsed.current
                continue
            assert 1 <= len(parsed.current) + len(parsed.previous) + bool(parsed.start) <= budget
            assert max([*parsed.current.values(), *parsed.previous.values(), parsed.start]) == 9


@pytest.mark.parametrize("chunk, first", [(4_000_000, 0), (7, 0), (4_000_000, 1)])
def test_previous_token_items_measure_what_the_current_token_table_leaves(tiny_cache, chunk, first, monkeypatch):
    """Brute force on dense activations: mean over positions after token u of (act − E[act | current token]).
    A tiny join chunk exercises the chunked path. With start items (``first`` 1) the current-token table and both
    means leave out the first token, whose mean per latent is the start item's."""
    import nl_rewrite.interp.lexical as lexical

    monkeypatch.setattr(lexical, "JOIN_CHUNK", chunk)
    ids = list(range(len(tiny_cache)))
    cands = candidate_items(tiny_cache, ids, max_per_latent=10_000, first_position=first)
    dense = tiny_cache.dense_windows(ids)  # [n, pos, latents]
    tokens = tiny_cache.tokens
    vocab = int(tokens.max()) + 1
    flat_tok, flat_act = tokens[:, first:].reshape(-1), dense[:, first:].reshape(-1, dense.shape[-1]).double()
    counts = torch.bincount(flat_tok, minlength=vocab).double()
    cur_mean = torch.zeros(vocab, dense.shape[-1], dtype=torch.float64).index_add_(0, flat_tok, flat_act) / \
        counts.clamp_min(1)[:, None]
    resid = dense.double() - cur_mean[tokens]  # [n, pos, latents]
    if first:  # the start item beside every current-token item: what their means leave on the first token
        assert cands.windows == len(ids)
        assert torch.allclose(cands.first_sum.double(), dense[:, 0].sum(0).double(), atol=1e-4)
        for lat in range(dense.shape[-1]):
            span = torch.nonzero(cands.latent == lat).flatten()
            if len(span):
                lo, hi = int(span[0]), int(span[-1]) + 1
                assert start_mean(cands, lo, hi, lat) == pytest.approx(float(resid[:, 0, lat].mean().clamp_min(0)),
                                                                      abs=1e-4)
    else:
        assert cands.first_sum is None and cands.first_count is None
    prev, after = tokens[:, :-1].reshape(-1), resid[:, 1:].reshape(-1, dense.shape[-1])
    prev_counts = torch.bincount(prev, minlength=vocab).double()
    prev_mean = torch.zeros(vocab, dense.shape[-1], dtype=torch.float64).index_add_(0, prev, after) / \
        prev_counts.clamp_min(1)[:, None]
    checked = 0
    for i in torch.nonzero(cands.previous).flatten().tolist():
        lat, tok = int(cands.latent[i]), int(cands.token[i])
        assert float(cands.mean[i]) == pytest.approx(float(prev_mean[tok, lat]), abs=1e-4)
        checked += 1
    for i in torch.nonzero(~cands.previous).flatten().tolist()[:50]:
        lat, tok = int(cands.latent[i]), int(cands.token[i])
        assert float(cands.mean[i]) == pytest.approx(float(cur_mean[tok, lat]), abs=1e-4)
    assert checked > 0


def test_the_start_item_round_trips_and_adds_its_strength_on_the_first_token():
    text = write_explanation([LexicalItem(" tax", 9), LexicalItem(" the", 4, True)], start=6)
    assert text.startswith("At the start of the text (6). Fires on")
    parsed = parse_explanation(text)
    assert (parsed.start, parsed.current, parsed.previous, parsed.problems) == (6, {" tax": 9}, {" the": 4}, ())
    assert read_scores(parsed, [" tax", " the", " tax"]).tolist() == [9 + 6, 0, 4 + 9]
    assert parse_explanation("at the start of the text (3).").start == 3 and not parse_explanation("x").start
    assert parse_explanation('Fires on " tax" (2).').start == 0, "without the item the first token reads as before"
    assert parse_explanation('AT  THE START\nOF THE TEXT (5). Fires on " x" (1).').start == 5
    bare = parse_explanation('At the start of the text. Fires on " x" (1).')
    assert bare.start == 0 and any("without a strength" in p for p in bare.problems)


def test_a_first_token_latent_gets_one_start_item_and_reads_back_exactly():
    cache = first_token_cache()
    texts = lexical_explanations(cache, range(len(cache)), 12)
    assert texts[0] == "At the start of the text (9).", texts[0]
    assert parse_explanation(texts[1]).start == 0 and parse_explanation(texts[1]).current == {VOCAB[2]: 9}, texts[1]
    windows = [cache.token_strings(row.tolist()) for row in cache.tokens]
    read = LexicalSimulator().simulate_windows(texts, windows)
    assert torch.equal(read[0] > 0, cache.values[..., 0] > 0)
    # latent 1's token item still covers the first token: the first token is no start item of its own
    assert torch.equal(read[1] > 0, cache.values[..., 1] > 0)
    # latent 2's start item states what its token item leaves on the first token: 0.5 there, less the 1.0 its
    # token item predicts where the first token is VOCAB[3]. It competes for the budget by its gain (200·residual²,
    # against the token item's n·1²), so with one item latent 2 keeps only its token
    first_is_3 = float((cache.tokens[:, 0] == 3).float().mean())
    residual = 0.5 - first_is_3
    assert parse_explanation(lexical_explanations(cache, range(len(cache)), 1)[2]).start == 0
    assert parse_explanation(lexical_explanations(cache, range(len(cache)), 2)[2]).start == round(9 * residual)
    # latent 3 fires weakly on three tokens and strongly on the first token: the start item displaces a token item
    two = parse_explanation(lexical_explanations(cache, range(len(cache)), 2)[3])
    assert two.start == 9 and len(two.current) == 1, two


def test_without_start_items_the_first_token_is_counted_in_the_token_items():
    cache = first_token_cache()
    old = lexical_explanations(cache, range(len(cache)), 12, candidate_items(cache, range(len(cache)),
                                                                          first_position=0))
    assert "start" not in old[0] and parse_explanation(old[0]).current, old[0]
    with pytest.raises(ValueError, match="first_position"):
        candidate_items(cache, range(len(cache)), first_position=2)
