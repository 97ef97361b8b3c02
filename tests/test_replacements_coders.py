"""Coder replacements patched into a tiny model: each writes exactly what its definition says."""

from __future__ import annotations

import pytest
import torch

from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.coders import (RandomLatentsReplacement, SAEReplacement, TranscoderReplacement,
                                            ZeroLatentsReplacement)
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder


def coder(kind: str = "transcoder") -> SparseCoder:
    sites = ("mlp_in.1", "mlp_out.1") if kind == "transcoder" else ("resid_post.0", "resid_post.0")
    c = SparseCoder(CoderConfig(d_in=32, d_out=32, n_latents=64, k=4, kind=kind, skip=kind == "transcoder",
                                read_site=sites[0], write_site=sites[1], model="tiny"), seed=0)
    with torch.no_grad():
        if c.W_skip is not None:
            c.W_skip.copy_(0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
        c.b_dec.fill_(0.3)
        c.encoder.bias.fill_(0.2)
    return c


def batch(n: int = 2, pos: int = 6) -> BatchInfo:
    tokens = torch.randint(1, 90, (n, pos), generator=torch.Generator().manual_seed(0))
    return BatchInfo(tokens=tokens, window_ids=torch.arange(10, 10 + n))


def patched_acts(model, replacement, info: BatchInfo, names: list[str]):
    with replacement.attached(model, info):
        _, cache = model.run_with_cache(info.tokens, names_filter=lambda n: n in names)
    return [cache[n] for n in names]


def test_transcoder_writes_coder_of_mlp_input(tiny):
    c, info = coder(), batch()
    mlp_in, mlp_out = patched_acts(tiny, TranscoderReplacement(c), info, ["blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"])
    torch.testing.assert_close(mlp_out, c(mlp_in))
    _, clean = tiny.run_with_cache(info.tokens, names_filter=lambda n: n == "blocks.1.hook_mlp_out")
    assert not torch.allclose(clean["blocks.1.hook_mlp_out"], mlp_out)


def test_sae_writes_reconstruction(tiny):
    c, info = coder("sae"), batch()
    _, clean = tiny.run_with_cache(info.tokens, names_filter=lambda n: n == "blocks.0.hook_resid_post")
    (patched,) = patched_acts(tiny, SAEReplacement(c), info, ["blocks.0.hook_resid_post"])
    torch.testing.assert_close(patched, c(clean["blocks.0.hook_resid_post"]))


def test_zero_latents_is_skip_plus_bias(tiny):
    c, info = coder(), batch()
    mlp_in, mlp_out = patched_acts(tiny, ZeroLatentsReplacement(c), info, ["blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"])
    torch.testing.assert_close(mlp_out, mlp_in @ c.W_skip.T + c.b_dec)


def test_random_latents_shuffle_true_values_onto_random_ids():
    c, info = coder(), batch(n=3, pos=5)
    x = torch.randn(3, 5, 32)
    rep = RandomLatentsReplacement(c, seed=4)
    true = c.encode(x)
    rand = rep.random_latents(true, info.window_ids)
    assert all(len(set(row.tolist())) == 4 for row in rand.indices.reshape(-1, 4))  # k distinct ids
    torch.testing.assert_close(rand.values.sort(-1).values, true.values.sort(-1).values)  # same values, permuted
    assert not torch.equal(rand.indices, true.indices)
    out = rep(x, info)
    torch.testing.assert_close(out, c.decode(rand) + c.skip(x))
    # deterministic per window: same result alone or inside another batch, different for another seed
    alone = rep(x[1:2], BatchInfo(info.tokens[1:2], info.window_ids[1:2]))
    torch.testing.assert_close(alone, out[1:2])
    other = RandomLatentsReplacement(c, seed=5)(x, info)
    assert not torch.allclose(other, out)


def test_kind_is_checked():
    with pytest.raises(ValueError, match="transcoder"):
        TranscoderReplacement(coder("sae"))
    with pytest.raises(ValueError, match="SAE"):
        SAEReplacement(coder("transcoder"))
