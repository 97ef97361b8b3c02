"""The custom replacement shown in docs/replacements.md runs as written (on the tiny model)."""

import re
from pathlib import Path

import torch

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.evaluation.evaluator import Evaluator

DOC = Path(__file__).parents[1] / "docs" / "replacements.md"


def test_custom_replacement_example_is_short_and_works(tiny):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    class_src = code[code.index("class LowRankMLP"):code.index("model = load_model")]
    assert len([line for line in code.splitlines() if line.strip()]) < 20
    namespace: dict = {}
    exec("import torch\nfrom nl_rewrite.replacements import Replacement\n" + class_src.replace("mlp_out.15", "mlp_out.1"),
         namespace)
    basis = torch.linalg.qr(torch.randn(tiny.cfg.d_model, 4))[0]
    windows = TokenWindows(torch.randint(1, 90, (4, 10)), ["a"] * 4, "eval")
    res = Evaluator(tiny, windows, progress=False).run([namespace["LowRankMLP"](basis)])
    assert res.summaries["rank4"].kl_mean > 0


def test_the_plugin_file_in_the_docs_loads_through_its_spec(tiny, tmp_path):
    from nl_rewrite.replacements.plugin import load_plugin

    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[1]
    assert code.startswith("# lowrank.py")
    (tmp_path / "lowrank.py").write_text(code)
    spec = re.search(r"--replacement (\./lowrank\.py:make):'(\{.*?\})'", DOC.read_text())
    rep = load_plugin(f"{tmp_path / 'lowrank.py'}:make:{spec.group(2).replace('64', '4')}", tiny, 1)
    assert rep.name == "rank4" and str(rep.write_site) == "mlp_out.1"
