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
