import pytest
import torch

from nl_rewrite.errors import ModelLoadError
from nl_rewrite.model.loading import load_hf, load_model, tiny_model


def test_unknown_model_name_lists_choices(tmp_cache):
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model("no-such-model")


def test_missing_gguf_is_named(tmp_cache, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "absent.gguf"))


def test_corrupt_gguf_is_reported(tmp_cache, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(str(bad))


def test_truncated_gguf_is_reported(tmp_cache, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        load_model(str(bad))


def test_directory_without_config_is_rejected(tmp_cache, tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_tiny_model_is_deterministic():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    tokens = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


@pytest.mark.slow
def test_bridge_logits_match_plain_transformers(smol):
    hf, tok = load_hf("smollm2-135m")
    tokens = torch.tensor([tok("The president spoke to Congress about the economy.")["input_ids"]])
    with torch.no_grad():
        ref = hf(tokens).logits
        got = smol(tokens)
    diff = float((got - ref).abs().max())
    print(f"max abs logit diff bridge vs transformers: {diff:.3g}")
    assert diff < 1e-4
