"""Chat templates for remote models: where they come from, and the errors when there is none."""

from __future__ import annotations

import pytest

from nl_rewrite.errors import LLMError
from nl_rewrite.llm.base import ChatRequest
from nl_rewrite.llm.templates import TEMPLATE_ENV, find_template, load_template

REQUEST = ChatRequest((("system", "S"), ("user", "hi")), prefill="Sure:")


def test_gguf_and_embedded_name_render_the_same_text():
    from nl_rewrite.model.loading import EMBEDDED

    gguf = str(EMBEDDED["smollm2-135m"].locate_gguf())
    by_name, by_file = find_template(None, "smollm2-135m"), find_template(None, gguf)
    assert by_name.render(REQUEST) == by_file.render(REQUEST)
    assert by_name.render(REQUEST).endswith("<|im_start|>assistant\nSure:")
    assert by_name.encode_prefix("hi there") == by_file.encode_prefix("hi there")


def test_explicit_and_environment_sources_win_over_the_model_name(monkeypatch):
    assert find_template("smollm2-135m", "served-name").source == "smollm2-135m"
    monkeypatch.setenv(TEMPLATE_ENV, "smollm2-135m")
    assert find_template(None, "served-name").source == "smollm2-135m"


def test_unknown_names_give_none_and_bad_sources_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(TEMPLATE_ENV, raising=False)
    assert find_template(None, "served-name") is None
    assert find_template(None, "nobody/not-in-the-local-cache") is None  # never downloaded
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOPE")
    with pytest.raises(LLMError, match="could not read a chat template.*NL_REWRITE_CHAT_TEMPLATE"):
        load_template(str(bad))


def test_choices_that_are_not_single_tokens_are_named():
    with pytest.raises(LLMError, match=r"\[' 3'\] are not single tokens"):
        load_template("smollm2-135m").choice_ids(["1", " 3"])
