"""compare_backends on two backends that must agree: the tiny model with and without its prefix KV cache."""

from __future__ import annotations

from nl_rewrite.interp.backend_parity import compare_backends
from nl_rewrite.llm.embedded import EmbeddedBackend
from nl_rewrite.model.loading import TINY_SMOLLM2


def test_a_backend_agrees_with_itself_without_its_prefix_cache():
    reference = EmbeddedBackend(TINY_SMOLLM2)
    candidate = EmbeddedBackend(TINY_SMOLLM2, reuse_prefix=False)
    tokenizer = reference.tokenizer
    report = compare_backends(reference, candidate,
                              lambda text: [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False).input_ids])
    assert set(report) == {"all_at_once", "paper", "detection"}
    for kind, agreement in report.items():
        assert agreement["n"] > 0 and agreement["unknown"] == 0, (kind, agreement)
        assert agreement["max_abs_logprob_diff"] < 1e-3, (kind, agreement)
        assert agreement["pearson"] > 0.999, (kind, agreement)
