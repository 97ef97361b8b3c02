"""Bad input: a clear error naming the problem and the fix, or a counted, logged fallback (the rest of the
table in docs/reliability.md points at the tests that already covered its rows)."""

from __future__ import annotations

import logging

import pytest

from nl_rewrite.cli.main import main
from nl_rewrite.data.windows import load_splits
from nl_rewrite.interp.simulate import Simulator

from fakes import FakeBackend


def test_a_non_utf8_text_file_is_counted_logged_and_replaced(tmp_path, caplog):
    for i in range(8):
        (tmp_path / f"doc{i}.txt").write_text(f"Document number {i} says something. " * 20)
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9. ".encode("latin-1") * 20)
    with caplog.at_level(logging.WARNING, logger="nl_rewrite.data.windows"):
        splits = load_splits(str(tmp_path))
    assert "1 of 9 .txt files" in caplog.text and "latin1.txt" in caplog.text
    texts = [d.text for docs in splits.values() for d in docs if d.doc_id.endswith("latin1.txt")]
    assert texts and "\ufffd" in texts[0]


@pytest.mark.parametrize("explanation,message", [("", "without an explanation"),
                                                 ("x" * 100_000, "100000 characters is longer than")])
def test_empty_or_huge_explanations_are_refused_before_any_request(explanation, message):
    backend = FakeBackend()
    with pytest.raises(ValueError, match=message):
        Simulator(backend).simulate(explanation, ["a", " b"])
    assert backend.score_requests == []


def test_zero_eval_windows_is_refused_without_a_traceback(capsys):
    assert main(["run", "--preset", "smoke", "--eval-windows", "0"]) == 2
    assert "eval_windows must be at least 1" in capsys.readouterr().err


def _refuse_loading(monkeypatch) -> list[str]:
    """Make every model load and corpus read fail the test: a wrong option must be caught before them."""
    from nl_rewrite.data import windows
    from nl_rewrite.model import loading

    touched: list[str] = []

    def refused(what):
        def fn(*args, **kwargs):
            touched.append(what)
            raise AssertionError(f"{what} was loaded before the options were checked")
        return fn

    monkeypatch.setattr(loading, "load_hf", refused("a model"))
    monkeypatch.setattr(loading, "tiny_smollm2", refused("a model"))
    monkeypatch.setattr(windows, "load_splits", refused("the corpus"))
    return touched


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "tiny-smollm2", "--layer", "7", "--out", "{out}"],
     "layer 7 out of range for a model with 2 layers"),
    (["run", "--model", "/no/such/model", "--out", "{out}"], "unknown model '/no/such/model'"),
    (["run", "--model", "no-such-org/no-such-model", "--layer", "1", "--llm", "claude:x", "--out", "{out}"],
     "unknown backend 'claude:x'"),  # a hub id is only resolved when it loads: the next check still runs first
    (["run", "--model", "tiny-smollm2", "--layer", "1", "--llm", "claude:x", "--out", "{out}"],
     "unknown backend 'claude:x'"),
    (["run", "--model", "tiny-smollm2", "--layer", "1", "--coder-checkpoint", "/no/such/folder", "--out", "{out}"],
     "--coder-checkpoint '/no/such/folder' is neither default, small, hf:ORG/REPO[/SUBFOLDER] nor a checkpoint folder"),
    (["run", "--model", "tiny-smollm2", "--layer", "1", "--trained-simulator", "/no/such/sim", "--out", "{out}"],
     "--trained-simulator '/no/such/sim' is neither none, default nor a checkpoint folder"),
    (["evaluate", "--model", "tiny-smollm2", "--layer", "99", "--out", "{out}"], "layer 99 out of range"),
    (["evaluate", "--model", "tiny-smollm2", "--layer", "1", "--replacement", "nonsense", "--out", "{out}"],
     "unknown replacement"),
    (["train", "--model", "tiny-smollm2", "--layer", "5", "--out", "{out}"], "layer 5 out of range"),
    (["train-simulator", "--model", "tiny-smollm2", "--layer", "9", "--out", "{out}"], "layer 9 out of range"),
    (["generate", "--model", "tiny-smollm2", "--layer", "1", "--prompt", "hi", "--out", "{out}"],
     "no latent cache in"),
    (["layers", "--model", "/no/such/model", "--out", "{out}"], "unknown model '/no/such/model'"),
    (["serve", "--model", "/no/such/model", "--port", "0"], "unknown model '/no/such/model'"),
    (["cache", "--coder", "/no/such/coder", "--out", "{out}"], "checkpoint folder not found"),
    (["explain", "--backend", "claude:x", "--cache", "{out}"], "unknown backend 'claude:x'"),
    (["score", "--backend", "claude:x", "--cache", "{out}"], "unknown backend 'claude:x'"),
], ids=lambda value: " ".join(value[:1]) if isinstance(value, list) else None)
def test_wrong_options_fail_before_the_model_or_the_corpus_is_loaded(argv, message, monkeypatch, tmp_path, capsys):
    """Every command checks what needs no model output first: a wrong option fails in seconds, before any load."""
    touched = _refuse_loading(monkeypatch)
    assert main([arg.replace("{out}", str(tmp_path / "out")) for arg in argv]) == 2
    assert message in capsys.readouterr().err
    assert touched == []
