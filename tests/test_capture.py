"""model.capture: the activations run_with_cache gives, without computing what comes after the last one."""

from __future__ import annotations

import pytest
import torch

from nl_rewrite.model.capture import capture
from nl_rewrite.model.sites import mlp_in, mlp_out, resolve


def _unembed_calls(model) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = model.unembed.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("layer", [0, 1])
def test_capture_equals_run_with_cache_and_stops_before_the_unembedding(tiny, layer):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(layer))
    hooks = [resolve(tiny, mlp_in(layer)), resolve(tiny, mlp_out(layer))]
    calls, handle = _unembed_calls(tiny)
    try:
        with torch.no_grad():
            got = capture(tiny, tokens, hooks)
            assert not calls, "the unembedding ran after the last hook needed (the last block's, for layer 1)"
            _, cache = tiny.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        assert calls, "the check above would not have seen an unembedding"
    finally:
        handle.remove()
    assert got.keys() == set(hooks)
    for hook in hooks:
        assert got[hook].shape == (3, 7, tiny.cfg.d_model)
        torch.testing.assert_close(got[hook], cache[hook], rtol=0, atol=0)


def test_a_capture_leaves_no_hook_behind(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 5))
    with torch.no_grad():
        before = tiny(tokens)
        capture(tiny, tokens, [resolve(tiny, mlp_out(0))])
        torch.testing.assert_close(tiny(tokens), before, rtol=0, atol=0)
