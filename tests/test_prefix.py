import pytest
import torch

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.evaluation.prefix import capture_block_inputs, resumed_at
from nl_rewrite.replacements import MeanReplacement, ZeroReplacement


def windows(n=6, pos=10, seed=0):
    tokens = torch.randint(1, 90, (n, pos), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(tokens, ["doc"] * n, "eval")


def test_resumed_run_equals_full_run_and_skips_earlier_blocks(tiny):
    tokens = windows().tokens
    with capture_block_inputs(tiny, [1]) as resid:
        clean = tiny(tokens)
    calls = []
    hook = tiny.blocks[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with resumed_at(tiny, 1, resid[1]):
            resumed = tiny(tokens)
    finally:
        hook.remove()
    assert torch.equal(resumed, clean)
    assert calls == [], "block 0's MLP ran although the run resumed at block 1"
    assert "forward" not in tiny.blocks[0].__dict__, "the original forward must be restored"


def test_evaluator_with_prefix_reuse_matches_full_recompute(tiny):
    w = windows()
    reps = [ZeroReplacement("mlp_out.1", name="z1"), ZeroReplacement("mlp_out.0", name="z0"),
            MeanReplacement("mlp_out.1", torch.ones(32), name="m1")]
    fast = Evaluator(tiny, w, 4, progress=False).run(reps)
    slow = Evaluator(tiny, w, 4, progress=False, reuse_prefix=False).run(reps)
    for name in fast.ce:
        assert fast.ce[name] == pytest.approx(slow.ce[name], abs=1e-6)
        assert fast.kl[name] == pytest.approx(slow.kl[name], abs=1e-7)
    assert fast.ce["z1"] != fast.ce["clean"], "the patch must change something for the test to mean anything"


def test_resuming_on_other_tokens_is_a_clear_error(tiny):
    with capture_block_inputs(tiny, [1]) as resid:
        tiny(windows(n=2).tokens)
    with pytest.raises(ShapeMismatchError, match="resume only on the clean pass"):
        with resumed_at(tiny, 1, resid[1]):
            tiny(windows(n=3).tokens)


def test_evaluator_falls_back_to_full_recompute_when_resuming_breaks(tiny, monkeypatch, caplog):
    import nl_rewrite.evaluation.evaluator as evaluator_module

    monkeypatch.setattr(evaluator_module, "resume_reproduces", lambda *a, **k: False)
    ev = Evaluator(tiny, windows(), 4, progress=False)
    res = ev.run([ZeroReplacement("mlp_out.1", name="z1")])
    assert ev._start_layer(ZeroReplacement("mlp_out.1")) == 0 and "full recomputation" in caplog.text
    assert res.ce["z1"] == pytest.approx(Evaluator(tiny, windows(), 4, progress=False).run(
        [ZeroReplacement("mlp_out.1", name="z1")]).ce["z1"], abs=1e-6)


def test_resume_check_passes_on_a_conforming_model(tiny):
    from nl_rewrite.evaluation.prefix import resume_reproduces

    assert resume_reproduces(tiny, windows(n=2).tokens, 1)


def test_resuming_restores_a_forward_installed_by_someone_else(tiny):
    block = tiny.blocks[0]
    wrapper = block.forward
    block.__dict__["forward"] = wrapper
    try:
        with capture_block_inputs(tiny, [1]) as resid:
            tiny(windows(n=2).tokens)
        with resumed_at(tiny, 1, resid[1]):
            tiny(windows(n=2).tokens)
        assert block.__dict__["forward"] is wrapper
    finally:
        block.__dict__.pop("forward", None)
