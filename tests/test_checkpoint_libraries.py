"""Checkpoints written by the libraries themselves: sparsify (installed by the test extra) writes a transcoder
and an SAE with its own code; SAELens cannot be installed next to TransformerLens 4 (it pins transformer-lens<4),
so its SAE is a committed fixture written by SAELens's own code (tests/fixtures/saelens_topk/, made by
tests/fixtures/make_saelens_fixture.py in a separate venv) together with SAELens's outputs on fixed inputs.
Each must load with ``load_coder`` and match the library's own forward within 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nl_rewrite.coders.checkpoint import load_coder

FIXTURES = Path(__file__).parent / "fixtures"


def _dense(values: torch.Tensor, indices: torch.Tensor, width: int) -> torch.Tensor:
    return torch.zeros(*values.shape[:-1], width).scatter_(-1, indices, values)


@pytest.mark.parametrize("folder_name, transcode, skip, sites", [
    ("layers.3.mlp", True, True, ("mlp_in.3", "mlp_out.3")),
    ("layers.3", False, False, ("resid_post.3", "resid_post.3")),
])
def test_a_folder_sparsify_wrote_matches_sparsifys_forward(tmp_path, folder_name, transcode, skip, sites):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify (the test extra) is not installed")
    torch.manual_seed(0)
    d, n, k = 16, 48, 4
    theirs = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=n, k=k, transcode=transcode,
                                                                 skip_connection=skip))
    with torch.no_grad():
        for param in theirs.parameters():  # every tensor non-trivial, biases and skip included
            param.normal_(0, 0.3)
    theirs.save_to_disk(tmp_path / folder_name)
    ours = load_coder(tmp_path / folder_name)
    assert (ours.cfg.read_site, ours.cfg.write_site) == sites and (ours.W_skip is not None) == skip
    x = torch.randn(32, d)
    with torch.no_grad():
        expected = theirs(x).sae_out
        acts, idx, _ = theirs.encode(x)
        ours_out, ours_latents = ours(x), ours.encode(x)
    torch.testing.assert_close(ours_out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_dense(ours_latents.values, ours_latents.indices, n), _dense(acts, idx, n),
                               atol=1e-5, rtol=0)


def test_an_sae_saelens_wrote_matches_saelens_outputs():
    folder = FIXTURES / "saelens_topk"
    recorded = load_file(str(folder / "saelens_outputs.safetensors"))
    ours = load_coder(folder)
    assert ours.cfg.kind == "sae" and ours.cfg.n_latents == recorded["feature_acts"].shape[-1]
    with torch.no_grad():
        dense = _dense(*ours.encode(recorded["x"]), ours.cfg.n_latents)
        torch.testing.assert_close(dense, recorded["feature_acts"], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(recorded["x"]), recorded["sae_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("option, value", [("rescale_acts_by_decoder_norm", True), ("reshape_activations", "hook_z"),
                                           ("normalize_activations", "layer_norm")])
def test_saelens_options_that_change_the_function_are_refused(tmp_path, option, value):
    import json
    import shutil

    from nl_rewrite.errors import CheckpointError

    folder = shutil.copytree(FIXTURES / "saelens_topk", tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, option: value}))
    with pytest.raises(CheckpointError, match=f"SAELens options {{'{option}'.*not supported"):
        load_coder(folder)
