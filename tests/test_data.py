import pytest
import torch

from nl_rewrite.data.windows import SPLITS, load_splits, split_manifest, token_windows
from nl_rewrite.errors import CorpusError


def test_default_splits_are_document_disjoint_and_complete():
    splits = load_splits()
    assert set(splits) == set(SPLITS)
    seen: dict[str, str] = {}
    for name, docs in splits.items():
        assert docs, f"split {name} is empty"
        for doc in docs:
            assert doc.doc_id not in seen, f"{doc.doc_id} in both {seen.get(doc.doc_id)} and {name}"
            seen[doc.doc_id] = name
    assert all(d.doc_id.startswith("bbc/") for d in splits["eval_ood"])


def test_splits_are_seeded():
    a, b, c = split_manifest(seed=0), split_manifest(seed=0), split_manifest(seed=1)
    assert a == b
    assert a["splits"]["eval"] != c["splits"]["eval"]


def _write_docs(folder, texts):
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text)
    return folder


def test_windows_never_cross_documents(tiny, tmp_cache, tmp_path):
    texts = [f"document number {i} " * (7 + i) for i in range(12)]
    corpus = _write_docs(tmp_path / "txt", texts)
    windows = token_windows(tiny, "train", corpus=str(corpus), window=16)
    by_id = {f"doc{i}.txt": t for i, t in enumerate(texts)}
    for row, doc_id in zip(windows.tokens, windows.doc_ids):
        decoded = tiny.tokenizer.decode(row.tolist()).replace(" ", "")
        assert decoded in by_id[doc_id].replace(" ", "")


def test_max_windows_is_a_seeded_subset(tiny, tmp_cache, tmp_path):
    corpus = _write_docs(tmp_path / "txt", ["abcdefgh " * 40] * 6)
    full = token_windows(tiny, "train", corpus=str(corpus), window=8)
    part = token_windows(tiny, "train", corpus=str(corpus), window=8, max_windows=5)
    again = token_windows(tiny, "train", corpus=str(corpus), window=8, max_windows=5)
    assert len(part) == 5 and torch.equal(part.tokens, again.tokens)
    assert all(any(torch.equal(r, f) for f in full.tokens) for r in part.tokens)


def test_empty_corpus_is_a_clear_error(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="non-empty documents"):
        token_windows(tiny, "train", corpus=str(tmp_path / "empty"))


def test_corpus_shorter_than_a_window(tiny, tmp_cache, tmp_path):
    corpus = _write_docs(tmp_path / "short", ["tiny text"] * 5)
    with pytest.raises(CorpusError, match="long enough"):
        token_windows(tiny, "eval", corpus=str(corpus), window=64)


def test_unknown_split(tiny):
    with pytest.raises(CorpusError, match="valid"):
        token_windows(tiny, "validation")


def test_damaged_tokenised_windows_are_recomputed(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NL_REWRITE_CACHE", str(tmp_path / "cache"))  # its own cache: this test damages it
    corpus = _write_docs(tmp_path / "txt", ["abcdefgh " * 40] * 4)
    first = token_windows(tiny, "train", corpus=str(corpus), window=8)
    (path,) = (tmp_path / "cache" / "windows").glob("train-*.pt")
    path.write_bytes(path.read_bytes()[:200])
    again = token_windows(tiny, "train", corpus=str(corpus), window=8)
    assert torch.equal(first.tokens, again.tokens) and f"{path} cannot be read" in caplog.text
    assert torch.equal(token_windows(tiny, "train", corpus=str(corpus), window=8).tokens, first.tokens)


def test_one_tokenizer_from_two_folders_shares_its_cached_windows(tiny, tmp_path, monkeypatch):
    """The windows are keyed by what the tokenizer is, not where it was loaded from (each test's cache links the
    same converted model under another path; keyed by the path, every test tokenised the train split again)."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("NL_REWRITE_CACHE", str(tmp_path / "cache"))
    corpus = _write_docs(tmp_path / "txt", ["abcdefgh " * 40] * 4)
    loaded = []
    for folder in ("a", "b"):
        tiny.tokenizer.save_pretrained(tmp_path / folder)
        loaded.append(AutoTokenizer.from_pretrained(tmp_path / folder))
        token_windows(loaded[-1], "train", corpus=str(corpus), window=8)
    assert loaded[0].name_or_path != loaded[1].name_or_path
    assert len(list((tmp_path / "cache" / "windows").glob("train-*.pt"))) == 1
    other = AutoTokenizer.from_pretrained(tmp_path / "a")
    other.add_tokens(["zzz"])  # another vocabulary: other windows
    token_windows(other, "train", corpus=str(corpus), window=8)
    assert len(list((tmp_path / "cache" / "windows").glob("train-*.pt"))) == 2
