"""The test session runs nl_rewrite under runtime type and shape checks (jaxtyping + beartype, see tests/conftest.py).

These tests fail if the import hook is not active, so a conftest change that imports nl_rewrite too early (or drops
the hook) cannot silently turn the checks off. Set NL_REWRITE_TYPECHECK=0 to run the suite without them; these
tests are then skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
from jaxtyping import TypeCheckError

from nl_rewrite.evaluation.scoring import CleanPrediction, token_ce_and_kl
from nl_rewrite.evaluation.stats import bootstrap_indices
from nl_rewrite.replacements.base import BatchInfo

pytestmark = pytest.mark.skipif(os.environ.get("NL_REWRITE_TYPECHECK", "1") == "0",
                                reason="runtime type checks turned off with NL_REWRITE_TYPECHECK=0")


def test_a_function_rejects_inconsistent_dimensions():
    logits, targets = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    ce, kl = token_ce_and_kl(logits, CleanPrediction.of(logits), targets)  # consistent: runs
    assert ce.shape == kl.shape == (2, 3)
    with pytest.raises(TypeCheckError, match=r"targets[\s\S]*pos=4"):
        token_ce_and_kl(torch.randn(2, 4, 10), CleanPrediction.of(torch.randn(2, 4, 10)), targets)


def test_a_function_rejects_the_wrong_dtype_and_rank():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(TypeCheckError, match="targets"):
        token_ce_and_kl(logits, CleanPrediction.of(logits), torch.zeros(2, 3))  # float targets
    with pytest.raises(TypeCheckError, match="output"):
        CleanPrediction.of(torch.randn(6, 10))


def test_a_dataclass_checks_its_fields():
    BatchInfo(tokens=torch.zeros(2, 5, dtype=torch.long), window_ids=torch.arange(2))
    with pytest.raises(TypeCheckError, match="batch=2"):
        BatchInfo(tokens=torch.zeros(2, 5, dtype=torch.long), window_ids=torch.arange(3))


def test_plain_annotations_are_checked_too():
    with pytest.raises(TypeCheckError, match="n_bootstrap"):
        bootstrap_indices(10, "100", seed=0)  # type: ignore[arg-type]
