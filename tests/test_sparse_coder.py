"""SparseCoder: TopK sparsity, shapes, the skip path, the SAE pre-encoder bias and latent edits."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder, SparseLatents


def make_coder(skip: bool = True, kind: str = "transcoder", d_in: int = 16, d_out: int = 12, seed: int = 0) -> SparseCoder:
    if kind == "sae":
        d_out = d_in
    cfg = CoderConfig(d_in=d_in, d_out=d_out, n_latents=64, k=4, skip=skip, kind=kind,
                      read_site="mlp_in.1", write_site="mlp_out.1" if kind == "transcoder" else "mlp_in.1")
    coder = SparseCoder(cfg, seed=seed)
    with torch.no_grad():  # give every parameter non-trivial values so tests see all terms
        gen = torch.Generator().manual_seed(seed + 1)
        for p in coder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        coder.encoder.bias.add_(0.5)
    return coder


def test_topk_sparsity_and_shapes():
    coder = make_coder()
    x = torch.randn(3, 5, 16)
    latents = coder.encode(x)
    assert latents.values.shape == latents.indices.shape == (3, 5, 4)
    dense = coder.pre_acts(x)
    assert dense.shape == (3, 5, 64) and (dense >= 0).all()
    # the kept values are exactly the 4 largest pre-activations of each token
    expected = dense.sort(dim=-1, descending=True).values[..., :4]
    torch.testing.assert_close(latents.values, expected)
    assert coder.decode(latents).shape == (3, 5, 12)
    assert coder(x).shape == (3, 5, 12)


def test_sparse_and_dense_decode_agree():
    coder = make_coder()
    x = torch.randn(7, 16)
    latents = coder.encode(x)
    dense = torch.zeros(7, 64).scatter_(-1, latents.indices, latents.values)
    assert (dense != 0).sum(-1).le(4).all()
    torch.testing.assert_close(coder.decode(latents), coder.decode(dense), rtol=1e-5, atol=1e-6)


def test_skip_path_is_linear_and_optional():
    coder = make_coder(skip=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(coder.skip(x), x @ coder.W_skip.T)
    torch.testing.assert_close(coder(x), coder.decode(coder.encode(x)) + x @ coder.W_skip.T)
    plain = make_coder(skip=False)
    assert plain.W_skip is None
    assert torch.equal(plain.skip(x), torch.zeros(4, 12))
    torch.testing.assert_close(plain(x), plain.decode(plain.encode(x)))


def test_sae_subtracts_b_dec_before_encoding():
    sae = make_coder(kind="sae", skip=False)
    x = torch.randn(4, 16)
    manual = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    torch.testing.assert_close(sae.pre_acts(x), manual)


def test_decoder_rows_unit_norm_after_init_and_normalize():
    cfg = CoderConfig(d_in=16, d_out=12, n_latents=64, k=4, read_site="mlp_in.0", write_site="mlp_out.0")
    coder = SparseCoder(cfg, seed=3)
    torch.testing.assert_close(coder.W_dec.norm(dim=-1), torch.ones(64))
    with torch.no_grad():
        coder.W_dec.mul_(torch.rand(64, 1) * 5 + 0.1)
    coder.normalize_decoder()
    torch.testing.assert_close(coder.W_dec.norm(dim=-1), torch.ones(64))


def test_init_is_deterministic_given_seed():
    a, b, c = (make_coder(seed=s) for s in (5, 5, 6))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.encoder.weight, c.encoder.weight)


def test_overwrite_retopk_changes_exactly_the_requested_latents():
    coder = make_coder()
    x = torch.randn(2, 3, 16)
    dense = coder.pre_acts(x)
    ids = torch.tensor([7, 20])
    values = torch.full((2, 3, 2), 100.0)  # huge: both must enter the top k
    out = coder(x, overwrite_ids=ids, overwrite_values=values)
    edited = dense.clone()
    edited[..., ids] = values
    top = edited.topk(4, dim=-1)
    assert set(ids.tolist()) <= set(top.indices[0, 0].tolist())
    torch.testing.assert_close(out, coder.decode(SparseLatents(top.values, top.indices)) + coder.skip(x))
    # overwriting with the true values is a no-op
    same = coder(x, overwrite_ids=ids, overwrite_values=dense[..., ids])
    torch.testing.assert_close(same, coder(x))


def test_overwrite_without_retopk_keeps_original_topk_plus_edits():
    coder = make_coder()
    x = torch.randn(5, 16)
    dense = coder.pre_acts(x)
    latents = coder.encode(x)
    outside = torch.tensor([int(i) for i in range(64) if i not in set(latents.indices[0].tolist())][:1])
    out = coder(x[:1], overwrite_ids=outside, overwrite_values=torch.tensor([2.0]), retopk=False)
    kept = torch.zeros(1, 64).scatter_(-1, latents.indices[:1], latents.values[:1])
    kept[0, outside] = 2.0
    assert (kept != 0).sum() == 5  # k + 1 active: the edit did not evict anything
    torch.testing.assert_close(out, kept @ coder.W_dec + coder.b_dec + coder.skip(x[:1]))
    # zeroing a latent in the top k removes exactly its contribution
    victim = latents.indices[0, :1]
    zeroed = coder(x[:1], overwrite_ids=victim, overwrite_values=torch.zeros(1), retopk=False)
    torch.testing.assert_close(coder(x[:1]) - zeroed, dense[0, victim] * coder.W_dec[victim], rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    coder = make_coder()
    with pytest.raises(ShapeMismatchError, match="d_in=16"):
        coder(torch.randn(2, 15))
    with pytest.raises(ShapeMismatchError, match="overwrite_ids"):
        coder(torch.randn(2, 16), overwrite_ids=torch.tensor([64]), overwrite_values=torch.zeros(1))
    # 3 values for 2 ids: the annotation ``Float[Tensor, "... m"]`` rejects it first when shapes are checked at runtime
    with pytest.raises((ShapeMismatchError, TypeCheckError), match="broadcast|parameter 'overwrite_values'"):
        coder(torch.randn(2, 16), overwrite_ids=torch.tensor([1, 2]), overwrite_values=torch.zeros(3))
    with pytest.raises(ValueError, match="overwrite_values"):
        coder(torch.randn(2, 16), overwrite_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="k=99"):
        CoderConfig(d_in=4, d_out=4, n_latents=8, k=99)
    with pytest.raises(ValueError, match="d_in"):
        CoderConfig(d_in=4, d_out=5, kind="sae", read_site="resid_post.0", write_site="resid_post.0")


def test_check_fits_model(tiny):
    good = SparseCoder(CoderConfig(d_in=32, d_out=32, n_latents=16, k=2, read_site="mlp_in.1", write_site="mlp_out.1"))
    good.check_fits(tiny)
    bad = SparseCoder(CoderConfig(d_in=576, d_out=576, n_latents=16, k=2, read_site="mlp_in.1", write_site="mlp_out.1"))
    with pytest.raises(ShapeMismatchError, match="576"):
        bad.check_fits(tiny)
