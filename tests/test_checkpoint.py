"""Checkpoints: sparsify layout round trip, foreign sparsify/SAELens folders, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nl_rewrite.coders.checkpoint import CheckpointShapeError, load_coder, save_coder
from nl_rewrite.errors import CheckpointError, ShapeMismatchError
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder


def random_coder(skip: bool = True, d: int = 32) -> SparseCoder:
    cfg = CoderConfig(d_in=d, d_out=d, n_latents=48, k=3, skip=skip, read_site="mlp_in.1", write_site="mlp_out.1",
                      model="tiny")
    coder = SparseCoder(cfg, seed=1)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape))
    return coder


def test_save_load_round_trip_bit_exact(tmp_path):
    coder = random_coder()
    save_coder(coder, tmp_path / "c")
    loaded = load_coder(tmp_path / "c")
    assert loaded.cfg == coder.cfg
    for name, tensor in coder.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(5, 32)
    assert torch.equal(coder(x), loaded(x))
    assert not list(tmp_path.glob("c/*.tmp"))  # atomic writes leave no temporaries


def test_sparsify_written_folder_loads(tmp_path):
    """A folder exactly as EleutherAI sparsify writes it: its cfg keys only, hookpoint-named folder, W_skip."""
    d, n = 32, 40
    torch.manual_seed(0)
    tensors = {"encoder.weight": torch.randn(n, d), "encoder.bias": torch.randn(n), "W_dec": torch.randn(n, d),
               "b_dec": torch.randn(d), "W_skip": torch.randn(d, d)}
    folder = tmp_path / "layers.1.mlp"
    folder.mkdir()
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": n, "k": 4,
        "multi_topk": False, "skip_connection": True, "transcode": True, "d_in": d}))
    coder = load_coder(folder)
    assert (coder.cfg.kind, coder.cfg.read_site, coder.cfg.write_site) == ("transcoder", "mlp_in.1", "mlp_out.1")
    assert (coder.cfg.n_latents, coder.cfg.k, coder.cfg.skip) == (n, 4, True)
    x = torch.randn(6, d)
    # sparsify's forward, written out: relu(enc) → top-k → W_dec rows + b_dec + x W_skipᵀ
    pre = torch.relu(x @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    vals, idx = pre.topk(4, dim=-1)
    expected = (vals[..., None] * tensors["W_dec"][idx]).sum(-2) + tensors["b_dec"] + x @ tensors["W_skip"].T
    torch.testing.assert_close(coder(x), expected, rtol=1e-4, atol=1e-4)


def test_sparsify_sae_folder_without_skip_uses_resid_post(tmp_path):
    d, n = 8, 16
    folder = tmp_path / "layers.0"
    folder.mkdir()
    save_file({"encoder.weight": torch.randn(n, d), "encoder.bias": torch.randn(n), "W_dec": torch.randn(n, d),
               "b_dec": torch.randn(d)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "k": 2, "d_in": d}))
    coder = load_coder(folder)
    assert (coder.cfg.kind, coder.cfg.read_site, coder.cfg.n_latents, coder.cfg.skip) == ("sae", "resid_post.0", 16, False)


def test_saelens_topk_folder_loads(tmp_path):
    d, n = 8, 24
    torch.manual_seed(1)
    w_enc, b_enc, w_dec, b_dec = torch.randn(d, n), torch.randn(n), torch.randn(n, d), torch.randn(d)
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d, "d_sae": n, "k": 3, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post", "model_name": "m"}}))
    coder = load_coder(tmp_path)
    assert (coder.cfg.kind, coder.cfg.read_site, coder.cfg.write_site) == ("sae", "resid_post.1", "resid_post.1")
    x = torch.randn(5, d)
    pre = torch.relu((x - b_dec) @ w_enc + b_enc)
    vals, idx = pre.topk(3, dim=-1)
    dense = torch.zeros(5, n).scatter_(-1, idx, vals)
    torch.testing.assert_close(coder(x), dense @ w_dec + b_dec, rtol=1e-4, atol=1e-4)


def test_saelens_relu_sae_is_refused(tmp_path):
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 4, "d_sae": 8}))
    with pytest.raises(CheckpointError, match="not a TopK SAE"):
        load_coder(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    coder = random_coder()
    save_coder(coder, tmp_path)
    state = {k: v for k, v in coder.state_dict().items() if k != "W_dec"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(CheckpointError, match="W_dec"):
        load_coder(tmp_path)


def test_corrupt_files_raise_checkpoint_error(tmp_path):
    save_coder(random_coder(), tmp_path)
    weights = tmp_path / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_coder(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_coder(tmp_path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_coder(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither"):
        load_coder(tmp_path)


def test_tensor_shape_disagreeing_with_cfg(tmp_path):
    coder = random_coder()
    save_coder(coder, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["num_latents"] = 50
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointShapeError, match="encoder.weight"):
        load_coder(tmp_path)


def test_d_in_mismatch_with_model_site(tmp_path, tiny):
    save_coder(random_coder(d=32), tmp_path / "fits")
    load_coder(tmp_path / "fits", model=tiny)  # tiny has d_model 32
    save_coder(random_coder(d=24), tmp_path / "wide")
    with pytest.raises(ShapeMismatchError, match="width 24"):
        load_coder(tmp_path / "wide", model=tiny)
    with pytest.raises(CheckpointError):
        load_coder(tmp_path / "wide", model=tiny)


def test_unknown_sites_need_overrides(tmp_path):
    folder = tmp_path / "some_name"
    folder.mkdir()
    save_file({"encoder.weight": torch.randn(4, 2), "encoder.bias": torch.randn(4), "W_dec": torch.randn(4, 2),
               "b_dec": torch.randn(2)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"num_latents": 4, "k": 1, "d_in": 2}))
    with pytest.raises(CheckpointError, match="read_site"):
        load_coder(folder)
    coder = load_coder(folder, read_site="resid_pre.0", write_site="resid_pre.0")
    assert coder.cfg.read_site == "resid_pre.0"
