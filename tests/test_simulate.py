import dataclasses
import logging
import re

import pytest
import torch

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ScoreRequest
from nl_rewrite.interp.simulate import (
    SimulationItem,
    Simulator,
    expected_digits,
    mark_last,
    render_token,
)
from fakes import FakeBackend


def token_digit(token: str) -> int:
    """The fake model's 'activation' for a token: its stripped length, mod 10 (distinct per test token)."""
    return len(token.strip()) % 10


class TokenReadingBackend:
    """Answers each read point with a sharp distribution on ``token_digit`` of the token being asked about.

    It recovers that token from the prompt text alone, so a read point misaligned with its token gives
    a wrong digit. ``blank`` read points (by token text) get no digit logprobs at all (-inf)."""

    backend_id = "fake:token-reader"
    chat_prompt = FakeBackend.chat_prompt

    def __init__(self, blank: frozenset[str] = frozenset()):
        self.blank = blank
        self.requests: list[ScoreRequest] = []

    def chat(self, requests):
        raise AssertionError("the simulator never chats")

    def score(self, requests):
        self.requests.extend(requests)
        return [torch.stack([self._read(r, i) for i in r.read_after]) for r in requests]

    def _read(self, request: ScoreRequest, index: int) -> torch.Tensor:
        text = request.prefix + "".join(request.segments[: index + 1])
        marked = re.findall(r"<<(.*?)>>", request.segments[index])
        token = marked[0] if marked else text.rsplit("\n", 1)[-1].rstrip("\t")
        if token.strip() in self.blank:
            return torch.full((10,), float("-inf"))
        logits = torch.full((10,), -8.0)
        logits[token_digit(token)] = 0.0
        return logits.log_softmax(-1) - 0.5  # not normalised over digits: mass elsewhere, as in real models


TOKENS = ("The", " cat", " sat", " on", " a", " windowsill", ".")


@pytest.mark.parametrize("mode", ["all_at_once", "paper"])
def test_scores_align_with_tokens(mode):
    backend = TokenReadingBackend()
    scores = Simulator(backend, mode).simulate("cats", list(TOKENS))
    assert scores.shape == (len(TOKENS),)
    expected = torch.tensor([float(token_digit(t)) for t in TOKENS])
    torch.testing.assert_close(scores, expected, atol=0.05, rtol=0)


def test_all_at_once_is_one_request_per_window_with_one_read_per_token():
    backend = TokenReadingBackend()
    sim = Simulator(backend, "all_at_once")
    sim.simulate_many([SimulationItem("cats", TOKENS), SimulationItem("cats", TOKENS[:3])])
    assert [len(r.read_after) for r in backend.requests] == [len(TOKENS), 3]
    assert backend.requests[0].prefix == backend.requests[1].prefix, "the explanation prefix is shared"
    assert "cats" in backend.requests[0].prefix
    assert all(s.endswith("\t") for s in backend.requests[0].segments)
    assert sim.stats.requests == 2 and sim.stats.predictions == len(TOKENS) + 3


def test_paper_mode_is_one_request_per_token_marking_the_last():
    backend = TokenReadingBackend()
    Simulator(backend, "paper").simulate("cats", list(TOKENS))
    assert len(backend.requests) == len(TOKENS)
    third = backend.requests[2].segments[0]
    assert third.startswith("The cat <<sat>>") and "windowsill" not in third
    assert len({r.prefix for r in backend.requests}) == 1 and "cats" in backend.requests[0].prefix


def test_expected_value_is_renormalised_over_digits():
    logprobs = torch.log(torch.tensor([[0.1, 0, 0, 0, 0, 0, 0, 0, 0, 0.1]]))  # 80% of the mass elsewhere
    assert expected_digits(logprobs).item() == pytest.approx(4.5)


def test_missing_logprobs_give_counted_nan(caplog):
    backend = TokenReadingBackend(blank=frozenset({"sat"}))
    sim = Simulator(backend, "all_at_once")
    with caplog.at_level(logging.WARNING, logger="nl_rewrite.interp.simulate"):
        scores = sim.simulate("cats", list(TOKENS))
    assert torch.isnan(scores[2]) and torch.isfinite(scores[[0, 1, 3, 4, 5, 6]]).all()
    assert sim.stats.nan_predictions == 1
    assert "1 of 7 tokens" in caplog.text


class NoLogprobsBackend(TokenReadingBackend):
    def score(self, requests):
        raise LLMError("server returned no logprobs")


class WrongShapeBackend(TokenReadingBackend):
    def score(self, requests):
        return [torch.zeros(1, 10) for _ in requests]


def test_backend_failures_are_clear_errors():
    with pytest.raises(LLMError, match="no logprobs"):
        Simulator(NoLogprobsBackend()).simulate("cats", list(TOKENS))
    with pytest.raises(LLMError, match="shape"):
        Simulator(WrongShapeBackend()).simulate("cats", list(TOKENS))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="mode"):
        Simulator(TokenReadingBackend(), "token_by_token")
    with pytest.raises(ValueError, match="explanation"):
        Simulator(TokenReadingBackend()).simulate("  ", list(TOKENS))
    with pytest.raises(ValueError, match="empty window"):
        Simulator(TokenReadingBackend()).simulate("cats", [])


def test_rendering_keeps_one_line_per_token():
    assert render_token("a\nb\tc") == "a\\nb\\tc"
    assert render_token("") == "∅"
    assert mark_last(["Hello", " world"]) == "Hello <<world>>"
    backend = TokenReadingBackend()
    Simulator(backend, "all_at_once").simulate("newlines", ["a", "\n", "b"])
    assert "".join(backend.requests[0].segments).count("\n") == 2  # only the line breaks between tokens


def test_identity_changes_with_mode_and_backend():
    a = Simulator(TokenReadingBackend(), "all_at_once").identity
    b = Simulator(TokenReadingBackend(), "paper").identity
    assert a != b and a.startswith("fake:token-reader|all_at_once")
    assert a == Simulator(TokenReadingBackend(), "all_at_once").identity


def test_embedded_backend_gives_finite_scores_for_every_token(tmp_cache):
    from nl_rewrite.llm.embedded import EmbeddedBackend

    backend = EmbeddedBackend("tiny-smollm2")  # plumbing: every read point gets a distribution over the digits
    tokens = ["The", " tax", " was", " raised", " in", " 1990", "."]
    scores = Simulator(backend, "all_at_once").simulate("numbers and years", tokens)
    assert scores.shape == (len(tokens),)
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 9)).all()
    paper = Simulator(backend, "paper").simulate("numbers and years", tokens[:3])
    assert torch.isfinite(paper).all() and ((paper >= 0) & (paper <= 9)).all()


# ---- the on-disk store ------------------------------------------------------------------------------------------

from nl_rewrite.interp.calibrate import LinearCalibrator  # noqa: E402
from nl_rewrite.interp.simulation_store import (  # noqa: E402
    MissingSimulationError,
    SimulationStore,
    quality_ranking,
    simulate_into_store,
    simulation_quality,
)

WINDOWS = {0: TOKENS, 1: TOKENS[::-1], 2: TOKENS[:3] + TOKENS[:4]}


def test_store_simulates_once_and_resumes(tmp_path):
    backend = TokenReadingBackend()
    sim = Simulator(backend, "all_at_once")
    store = SimulationStore(tmp_path, sim.identity)
    first = simulate_into_store(sim, store, {4: "cats", 9: "dogs"}, {0: WINDOWS[0]}, progress=False)
    assert (first.windows_simulated, first.windows_reused) == (2, 0)
    again = SimulationStore(tmp_path, sim.identity)  # a new process, same folder
    second = simulate_into_store(sim, again, {4: "cats", 9: "dogs"}, WINDOWS, chunk=1, progress=False)
    assert (second.windows_simulated, second.windows_reused) == (4, 2)
    assert len(backend.requests) == 6, "each (latent, window) was sent exactly once"
    got = again.get(4, "cats", {w: WINDOWS[w] for w in (2, 0)})
    expected = torch.tensor([[float(token_digit(t)) for t in WINDOWS[w]] for w in (2, 0)])
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)
    assert set(again.load(9, "dogs", WINDOWS)) == {0, 1, 2}


def test_store_changed_explanation_or_simulator_is_not_reused(tmp_path):
    sim = Simulator(TokenReadingBackend(), "all_at_once")
    store = SimulationStore(tmp_path, sim.identity)
    simulate_into_store(sim, store, {4: "cats"}, WINDOWS, progress=False)
    assert store.missing(4, "felines", WINDOWS) == [0, 1, 2]
    with pytest.raises(MissingSimulationError, match="latent 4: no stored simulation for 3 of 3"):
        store.get(4, "felines", WINDOWS)
    paper = SimulationStore(tmp_path, Simulator(TokenReadingBackend(), "paper").identity)
    assert paper.load(4, "cats", WINDOWS) == {}
    with pytest.raises(ValueError, match="store is for simulator"):
        simulate_into_store(sim, paper, {4: "cats"}, WINDOWS, progress=False)
    assert not list(store.folder.glob("*.tmp")), "atomic writes leave no temporary files"


def test_simulations_are_keyed_by_window_content_not_position(tmp_path):
    """The issue-13 regression: a rerun with another sample must never reuse a simulation for different text."""
    backend = TokenReadingBackend()
    sim = Simulator(backend, "all_at_once")
    store = SimulationStore(tmp_path, sim.identity)
    small = {0: WINDOWS[0], 1: WINDOWS[1]}
    bigger = {0: WINDOWS[1], 1: WINDOWS[2], 2: WINDOWS[0], 3: TOKENS[1:] + TOKENS[:1]}  # ids name other texts
    simulate_into_store(sim, store, {4: "cats"}, small, progress=False)
    run = simulate_into_store(sim, store, {4: "cats"}, bigger, progress=False)
    assert (run.windows_simulated, run.windows_reused) == (2, 2)  # exactly the two texts seen before
    fresh = SimulationStore(tmp_path / "fresh", sim.identity)
    simulate_into_store(sim, fresh, {4: "cats"}, bigger, progress=False)
    torch.testing.assert_close(store.get(4, "cats", bigger), fresh.get(4, "cats", bigger))


def test_a_larger_sample_of_real_windows_reuses_only_identical_text(tmp_path, tiny):
    from nl_rewrite.data.windows import token_windows

    def strings(n: int) -> dict[int, list[str]]:
        windows = token_windows(tiny, "eval", window=12, max_windows=n)
        return {i: [tiny.tokenizer.decode([t]) for t in row.tolist()] for i, row in enumerate(windows.tokens)}

    w16, w32 = strings(16), strings(32)
    assert sum(w16[i] == w32[i] for i in range(16)) < 16  # the same ids name different text: the old bug's setup
    sim = Simulator(TokenReadingBackend(), "all_at_once")
    store = SimulationStore(tmp_path, sim.identity)
    simulate_into_store(sim, store, {4: "cats"}, w16, progress=False)
    run = simulate_into_store(sim, store, {4: "cats"}, w32, progress=False)
    shared = sum(1 for t in w32.values() if t in w16.values())
    assert run.windows_reused == shared and run.windows_simulated == 32 - shared
    fresh = SimulationStore(tmp_path / "fresh", sim.identity)
    simulate_into_store(sim, fresh, {4: "cats"}, w32, progress=False)
    torch.testing.assert_close(store.get(4, "cats", w32), fresh.get(4, "cats", w32))


def test_quality_correlations_and_fire_precision_recall(tmp_path):
    true = torch.tensor([0.0, 0.0, 1.0, 2.0, 0.0, 3.0])
    scores = torch.tensor([0.1, 0.5, 3.0, 5.0, float("nan"), 4.0])
    calibrated = torch.tensor([0.0, 0.2, 1.0, 2.0, float("nan"), 0.0])
    q = simulation_quality(7, scores, true, calibrated)
    assert q.n == 6 and q.n_nan == 1
    from scipy.stats import pearsonr, spearmanr

    keep = [0, 1, 2, 3, 5]
    assert q.spearman == pytest.approx(spearmanr(scores[keep], true[keep])[0])
    assert q.pearson == pytest.approx(pearsonr(scores[keep], true[keep])[0])
    assert q.precision == pytest.approx(2 / 3) and q.recall == pytest.approx(2 / 3)
    flat = simulation_quality(8, torch.zeros(6), true)
    assert flat.pearson != flat.pearson, "a constant prediction has undefined (NaN) correlation"
    store = SimulationStore(tmp_path, "x")
    store.save_quality("linear", [q, flat])
    loaded = store.load_quality("linear")
    assert loaded[7] == q and set(quality_ranking(loaded, "spearman")) == {7, 8}
    unranked = simulation_quality(7, scores, true, calibrated, rank_correlation=False)
    assert unranked.spearman is None and dataclasses.replace(unranked, spearman=q.spearman) == q
    store.save_quality("lexical", [unranked])
    assert store.load_quality("lexical")[7] == unranked


def test_stored_simulations_feed_the_calibrators(tmp_path):
    sim = Simulator(TokenReadingBackend(), "all_at_once")
    store = SimulationStore(tmp_path, sim.identity)
    simulate_into_store(sim, store, {4: "cats"}, WINDOWS, progress=False)
    scores = store.get(4, "cats", WINDOWS)
    cal = LinearCalibrator().fit(scores.reshape(-1), scores.reshape(-1) / 3)
    assert cal(torch.tensor([9.0])).item() == pytest.approx(scores.max().item() / 3, rel=1e-5)
