import torch

from nl_rewrite.interp.calibrate import LinearCalibrator
from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.evaluation.generate import greedy
from nl_rewrite.interp.lexical import LexicalSimulator
from nl_rewrite.replacements.live import LiveSimulatorReplacement
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder


def decode(ids):
    return [f" t{i}" for i in ids]


def setup():
    cfg = CoderConfig(d_in=32, d_out=32, n_latents=16, k=3, read_site="mlp_in.1", write_site="mlp_out.1", model="tiny")
    coder = SparseCoder(cfg, seed=2)
    texts = {2: 'Fires on " t5" (9), " t7" (4). After " t3" (6).', 9: 'Fires on " t1" (8).'}
    cals = {lat: LinearCalibrator().fit_max(9.0) for lat in texts}
    tokens = torch.randint(1, 10, (4, 8), generator=torch.Generator().manual_seed(0))
    return coder, texts, cals, TokenWindows(tokens, ["d"] * 4, "eval")


def test_live_mode_equals_stored_simulations_on_the_same_windows(tiny):
    coder, texts, cals, windows = setup()
    sim = LexicalSimulator()
    stored = {lat: {w: sim.simulate(text, decode(row.tolist())) for w, row in enumerate(windows.tokens)}
              for lat, text in texts.items()}
    reps = [NLSimulatorReplacement(coder, stored, cals, list(texts), name="stored"),
            LiveSimulatorReplacement(coder, LexicalSimulator(), texts, cals, decode, name="live")]
    res = Evaluator(tiny, windows, 2, progress=False).run(reps)
    assert res.ce["live"] == res.ce["stored"] and res.kl["live"] == res.kl["stored"]
    assert res.kl["live"] != [0.0] * 4


def test_live_mode_runs_on_text_it_has_never_seen(tiny):
    coder, texts, cals, _ = setup()
    live = LiveSimulatorReplacement(coder, LexicalSimulator(), texts, cals, decode)
    out = greedy(tiny, torch.tensor([5, 3, 5, 7]), 3, live)
    assert len(out) == 3
    values = live.row_values([3, 5, 1])
    assert values.tolist() == [[0.0, 0.0], [9.0, 0.0], [0.0, 8.0]]  # " t5" after " t3": 9 + 6, clipped at 9


def test_prompts_continued_in_batches_equal_one_at_a_time(tiny):
    """side_by_side batches prompts of one length; each continuation must be what that prompt gets alone."""
    from nl_rewrite.evaluation.generate import side_by_side

    coder, texts, cals, _ = setup()
    live = LiveSimulatorReplacement(coder, LexicalSimulator(), texts, cals, decode)
    prompts = [torch.tensor([5, 3, 5, 7]), torch.tensor([1, 2]), torch.tensor([3, 5, 1, 4]), torch.tensor([7, 7])]
    rows = side_by_side(tiny, prompts, {"clean": None, "live": live}, 4, decode)
    for prompt, row in zip(prompts, rows):
        for name, rep in (("clean", None), ("live", live)):
            assert row.continuations[name] == "".join(decode(greedy(tiny, prompt, 4, rep))), name
    assert [r.prompt for r in rows] == ["".join(decode(p.tolist())) for p in prompts]
