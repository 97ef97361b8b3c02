"""Five model families at the hook level, on tiny random HF models built from configs (nothing is downloaded):
GPT-NeoX with a parallel residual (Pythia's layout), GPT-2, Llama, Qwen2 and Gemma-3.

For each: ``load_model(<saved dir>)`` works, every site kind resolves, ``mlp_in.L`` is exactly what the HF MLP
module receives, ``mlp_out.L`` is what the docs promise (docs/replacements.md, "What mlp_out means"), the identity
replacement leaves CE unchanged, and a transcoder trains for a few steps on the site pair.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nl_rewrite.coders.train import TrainConfig, train
from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.errors import SiteError
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.model.loading import load_hf, load_model
from nl_rewrite.model.sites import SITE_HOOKS, resolve
from nl_rewrite.replacements import IdentityReplacement

LAYER = 1
SIZE = dict(hidden=32, mlp=64, layers=2, heads=4)


def _configs(vocab: int) -> dict:
    from transformers import Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    h, m, n, a = SIZE["hidden"], SIZE["mlp"], SIZE["layers"], SIZE["heads"]
    return {
        "gpt_neox": GPTNeoXConfig(vocab_size=vocab, hidden_size=h, intermediate_size=m, num_hidden_layers=n,
                                  num_attention_heads=a, use_parallel_residual=True, max_position_embeddings=128,
                                  rotary_pct=0.25),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=h, n_inner=m, n_layer=n, n_head=a, n_positions=128),
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=m, num_hidden_layers=n,
                             num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=128),
        "qwen2": Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=m, num_hidden_layers=n,
                             num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=128),
        "gemma3": Gemma3TextConfig(vocab_size=vocab, hidden_size=h, intermediate_size=m, num_hidden_layers=n,
                                   num_attention_heads=a, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=128, sliding_window=16),
    }


def mlp_module(hf, family: str, layer: int) -> torch.nn.Module:
    """The HF module whose output the docs call the MLP's output (before any post-MLP norm)."""
    blocks = {"gpt_neox": lambda: hf.gpt_neox.layers, "gpt2": lambda: hf.transformer.h}.get(
        family, lambda: hf.model.layers)()
    return blocks[layer].mlp


def _save_tiny(family: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from nl_rewrite.model.loading import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_configs(len(tok))[family])
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


FAMILIES = ("gpt_neox", "gpt2", "llama", "qwen2", "gemma3")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    folder = _save_tiny(request.param, tmp_path_factory.mktemp(request.param) / request.param)
    hf, _ = load_hf(str(folder))
    return request.param, load_model(str(folder)), hf


def _tokens(n: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(1, 90, (n, length), generator=torch.Generator().manual_seed(1))


def _hf_mlp_io(hf, family: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    module = mlp_module(hf, family, LAYER)
    handles = [module.register_forward_pre_hook(lambda mod, args: seen.setdefault("in", args[0].detach())),
               module.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out.detach()))]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return seen["in"], seen["out"]


def kinds(family: str) -> list[str]:
    """Site kinds the family has: a parallel block (GPT-NeoX) has no residual between attention and MLP."""
    return [k for k in SITE_HOOKS if not (family == "gpt_neox" and k == "resid_mid")]


def _bridge_sites(model, family: str, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    names = {kind: resolve(model, f"{kind}.{LAYER}") for kind in kinds(family)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=list(names.values()))
    return {kind: cache[name] for kind, name in names.items()}


def test_every_site_resolves_and_mlp_in_is_what_the_hf_mlp_receives(family_model):
    family, model, hf = family_model
    tokens = _tokens()
    sites = _bridge_sites(model, family, tokens)
    assert set(sites) == set(kinds(family))
    if family == "gpt_neox":
        with pytest.raises(SiteError, match="in parallel .* use resid_pre.1"):
            resolve(model, f"resid_mid.{LAYER}")
    hf_in, _ = _hf_mlp_io(hf, family, tokens)
    assert torch.allclose(sites["mlp_in"], hf_in, atol=1e-5), (sites["mlp_in"] - hf_in).abs().max()
    assert sites["mlp_in"].shape == (*tokens.shape, SIZE["hidden"])


def test_mlp_out_is_what_the_docs_promise(family_model):
    """The MLP module's output, except Gemma-3: its post-feedforward norm applied to it (what reaches the residual)."""
    family, model, hf = family_model
    tokens = _tokens()
    out = _bridge_sites(model, family, tokens)["mlp_out"]
    _, hf_out = _hf_mlp_io(hf, family, tokens)
    if family == "gemma3":
        with torch.no_grad():
            expected = hf.model.layers[LAYER].post_feedforward_layernorm(hf_out)
        assert (out - hf_out).abs().max() > 1e-3  # so the difference documented for Gemma-3 is real
    else:
        expected = hf_out
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


def test_identity_replacement_leaves_ce_unchanged(family_model):
    _, model, _ = family_model
    windows = TokenWindows(_tokens(4, 16), ["a"] * 4, "eval")
    results = Evaluator(model, windows, progress=False).run([IdentityReplacement(f"mlp_out.{LAYER}")])
    assert abs(results.summaries["identity"].ce_delta) < 1e-5
    assert results.summaries["identity"].kl_mean < 1e-5


def test_a_transcoder_trains_a_few_steps(family_model, tmp_path):
    family, model, _ = family_model
    cfg = TrainConfig(model=family, layer=LAYER, width=32, k=4, tokens=16 * 32 * 4, window=16, batch_size=128,
                      buffer_windows=16, out=str(tmp_path / "tc"), checkpoint_every=100, dead_tokens=500)
    coder = train(cfg, model=model, windows=torch.randint(1, 90, (32, 16), generator=torch.Generator().manual_seed(2)),
                  progress=False)
    assert coder.cfg.read_site == f"mlp_in.{LAYER}" and coder.cfg.write_site == f"mlp_out.{LAYER}"
    assert all(torch.isfinite(p).all() for p in coder.parameters())
