"""Models and coders by hub id, resolved from a huggingface_hub cache laid out as huggingface_hub lays it out, with
the network off (the suite runs with HF_HUB_OFFLINE=1); a repo in neither the cache nor a network is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import make_coder
from nl_rewrite.coders.checkpoint import load_coder, save_coder
from nl_rewrite.errors import ModelLoadError
from nl_rewrite.model.loading import load_model, tiny_hf
from nl_rewrite.placement import Placement

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache (``HF_HUB_CACHE``), which huggingface_hub reads when it downloads or looks up."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def cached_repo(hub: Path, repo_id: str) -> Path:
    """A repo's snapshot folder in the cache's layout: models--ORG--NAME/{refs/main, snapshots/<commit>/}."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def test_a_model_by_hub_id_loads_from_the_cache_offline(hub_cache):
    hf, tok = tiny_hf(seed=3)
    folder = cached_repo(hub_cache, "acme/tiny-llama")
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_model("acme/tiny-llama", Placement("cpu"))
    tokens = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-5)


def test_a_coder_by_hub_spec_loads_its_subfolder(hub_cache):
    coder = make_coder(seed=2)
    save_coder(coder, cached_repo(hub_cache, "acme/coders") / "layers.1.mlp")
    loaded = load_coder("hf:acme/coders/layers.1.mlp")
    assert all(torch.equal(a, b) for a, b in zip(coder.state_dict().values(), loaded.state_dict().values()))


def test_a_repo_missing_from_the_cache_offline_names_it_and_how_to_fetch_it(hub_cache):
    with pytest.raises(ModelLoadError, match=r"'acme/absent' is not in the local huggingface_hub cache and "
                                             r"HF_HUB_OFFLINE is set: .*`hf download acme/absent`"):
        load_model("acme/absent")
    save_coder(make_coder(), cached_repo(hub_cache, "acme/coders") / "layers.1.mlp")  # another layer is cached
    with pytest.raises(ModelLoadError, match=r"`hf download acme/coders --include layers.9/\*`"):
        load_coder("hf:acme/coders/layers.9")
    tokenizer_only = cached_repo(hub_cache, "acme/half")  # a cached snapshot without the model's config.json
    tiny_hf()[1].save_pretrained(tokenizer_only)
    with pytest.raises(ModelLoadError, match=r"'acme/half' is not in the local huggingface_hub cache"):
        load_model("acme/half")


def test_without_the_repo_or_a_network_the_error_says_it_could_not_download(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user allows the network; huggingface_hub still finds none here
    with pytest.raises(ModelLoadError, match="'acme/absent' is not in the local huggingface_hub cache and could not "
                                             "be downloaded"):
        load_model("acme/absent")


@pytest.mark.parametrize("spec", ["hf:", "hf:acme", "hf:/x"])
def test_a_malformed_hub_coder_spec_says_the_form(spec):
    with pytest.raises(ModelLoadError, match="write hf:ORG/REPO or hf:ORG/REPO/SUBFOLDER"):
        load_coder(spec)
