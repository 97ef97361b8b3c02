import torch

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.evaluation.layer_sweep import LayerRow, choose_layer, sweep_layers, table


def row(layer, zero, lo=None):
    lo = zero - 0.05 if lo is None else lo
    return LayerRow(layer, (zero, lo, zero + 0.05), (zero, lo, zero + 0.05), (0.1, 0.0, 0.2), (0.1, 0.0, 0.2))


def test_choose_layer_prefers_the_middle_among_layers_that_matter():
    rows = [row(0, 8.0), row(1, 0.3), row(2, 1.2), row(3, 0.05), row(4, 0.2), row(5, 0.31), row(6, 0.2),
            row(7, 2.0), row(8, 0.4), row(9, 1.5)]
    # layers 0-1 and the last are excluded, 2 and 7 are catastrophic (> 1 nat), 3 costs too little
    assert choose_layer(rows, 10) == 5
    assert choose_layer([row(4, 0.2, lo=-0.01)], 10) is None, "a CI reaching 0 does not qualify"
    assert choose_layer([row(4, 0.1)], 10) is None


def test_sweep_measures_every_layer_on_a_tiny_model(tiny):
    tokens = torch.randint(1, 90, (4, 8), generator=torch.Generator().manual_seed(0))
    w = TokenWindows(tokens, ["d"] * 4, "eval")
    rows = sweep_layers(tiny, w, w, batch_size=2)
    assert [r.layer for r in rows] == [0, 1]
    for r in rows:
        assert r.zero_kl[0] > 0 and r.zero_delta_ce[1] <= r.zero_delta_ce[0] <= r.zero_delta_ce[2]
    assert "layer" in table(rows)
