"""Plugin specs: the user's factory becomes a replacement, and every kind of bad spec says what to fix."""

import textwrap

import pytest

from nl_rewrite.replacements import ZeroReplacement
from nl_rewrite.replacements.plugin import PluginError, is_plugin_spec, load_plugin, parse_spec

MODULE = '''
from nl_rewrite.replacements import Replacement, ZeroReplacement


class Scaled(Replacement):
    def __init__(self, layer, scale=0.5):
        super().__init__(f"mlp_out.{layer}", name=f"scaled{scale:g}")
        self.scale = scale

    def forward(self, x, batch):
        return x * self.scale


def make(model, layer, scale=0.5):
    assert model is not None
    return Scaled(layer, scale)


def zero_only():
    return ZeroReplacement("mlp_out.0", name="plugin_zero")


def broken(layer):
    raise RuntimeError("no basis for layer %d" % layer)


def not_a_replacement(model):
    return 42
'''


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_reps.py"
    path.write_text(textwrap.dedent(MODULE))
    return path


def test_a_file_factory_gets_model_layer_and_json_kwargs(plugin_file, tiny):
    rep = load_plugin(f'{plugin_file}:make:{{"scale": 0.25}}', tiny, 1)
    assert rep.name == "scaled0.25" and str(rep.write_site) == "mlp_out.1" and rep.scale == 0.25
    assert isinstance(load_plugin(f"{plugin_file}:zero_only", tiny, 1), ZeroReplacement)  # takes neither


def test_a_dotted_module_is_imported(plugin_file, tiny, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_file.parent))
    assert load_plugin("my_reps:Scaled", tiny, 0).name == "scaled0.5"  # a class is a factory too


def test_spec_syntax():
    assert is_plugin_spec("pkg.mod:make") and is_plugin_spec("./f.py:make:{}")
    assert not is_plugin_spec("zero") and not is_plugin_spec("coder:/tmp/x")
    assert parse_spec('m:f:{"a": [1, 2]}') == ("m", "f", {"a": [1, 2]})
    assert parse_spec("m:f") == ("m", "f", {})


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:make", "no module 'no_such_module_xyz'; install it, add its folder to PYTHONPATH"),
    ("{file}:missing", "has no attribute 'missing'; callables defined there: Scaled, broken, make"),
    ("{file}:broken", "broken(layer) raised RuntimeError: no basis for layer 1"),
    ("{file}:not_a_replacement", "not_a_replacement returned int, not a nl_rewrite.Replacement"),
    ("{file}:make:{{scale: 2}}", "keyword arguments are not JSON"),
    ("{file}:make:[1]", "must be a JSON object"),
    ('{file}:make:{{"rank": 2}}', "takes no argument(s) ['rank']; it takes model, layer, scale"),
    ("{dir}/absent.py:make", "no file"),
    ("mod:", "is not MODULE:FACTORY[:JSON]"),
])
def test_each_bad_spec_names_the_spec_and_the_fix(plugin_file, tiny, spec, message):
    spec = spec.format(file=plugin_file, dir=plugin_file.parent)
    with pytest.raises(PluginError) as err:
        load_plugin(spec, tiny, 1)
    assert message in str(err.value) and spec in str(err.value)


def test_a_module_that_fails_to_import_is_reported_with_its_error(tmp_path, tiny):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nraise ImportError('needs a GPU build')\n")
    with pytest.raises(PluginError, match="importing .*bad.py raised ImportError: needs a GPU build"):
        load_plugin(f"{bad}:make", tiny, 0)
