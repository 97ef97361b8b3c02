"""Which MLP matters? Zero- and mean-ablation ΔCE and KL for every MLP layer of a model, in one Evaluator run.

The clean pass runs once per batch; each ablation starts at its own layer from the clean residual
(:mod:`.prefix`), so a sweep over all layers costs about half a forward pass per layer and condition.
Mean ablation uses each layer's mean MLP output over ``train`` windows, gathered in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.evaluation.evaluator import EvalResults, Evaluator
from nl_rewrite.evaluation.stats import CIBounds
from nl_rewrite.replacements.baselines import MeanReplacement, ZeroReplacement
from nl_rewrite.model.capture import capture
from nl_rewrite.model.sites import mlp_out, resolve

MIN_DELTA_CE = 0.15
"""Zero-ablating the rewritten MLP must cost at least this much CE (nats), or there is no gap to recover."""
MAX_DELTA_CE = 1.0
"""...and at most this much: above it the MLP is a catastrophic outlier (SmolLM2's layers 0, 2, 11 and 29 write
massive activations the rest of the model depends on), not the typical computation we want to rewrite."""


@torch.no_grad()
def mlp_out_means(model, windows: TokenWindows, layers: list[int], batch_size: int = 8
                  ) -> dict[int, Float[Tensor, " d_model"]]:
    """Mean MLP output of each layer over ``windows``, from one forward pass per batch."""
    hooks = {resolve(model, mlp_out(layer)): layer for layer in layers}
    sums: dict[int, Tensor] = {}
    count = 0
    for _, tokens in windows.batches(batch_size):
        cache = capture(model, tokens, list(hooks))
        for hook, layer in hooks.items():
            sums[layer] = sums.get(layer, 0) + cache[hook].float().sum((0, 1))
        count += tokens.numel()
    return {layer: total / count for layer, total in sums.items()}


def ablations(layers: list[int], means: dict[int, Tensor]) -> list:
    """``zero.L`` and ``mean.L`` for every layer."""
    reps: list = []
    for layer in layers:
        reps.append(ZeroReplacement(mlp_out(layer), name=f"zero.{layer}"))
        reps.append(MeanReplacement(mlp_out(layer), means[layer], name=f"mean.{layer}"))
    return reps


@dataclass(frozen=True)
class LayerRow:
    layer: int
    zero_delta_ce: tuple[float, float, float]
    """mean, 95% CI low, high (nats)."""
    mean_delta_ce: tuple[float, float, float]
    zero_kl: tuple[float, float, float]
    mean_kl: tuple[float, float, float]


def layer_rows(results: EvalResults, layers: list[int]) -> list[LayerRow]:
    def triple(value: float, ci: CIBounds) -> tuple[float, float, float]:
        return (value, ci[0], ci[1])

    rows = []
    for layer in layers:
        z, m = results.summaries[f"zero.{layer}"], results.summaries[f"mean.{layer}"]
        rows.append(LayerRow(layer, triple(z.ce_delta, z.ce_delta_ci), triple(m.ce_delta, m.ce_delta_ci),
                             triple(z.kl_mean, z.kl_ci), triple(m.kl_mean, m.kl_ci)))
    return rows


def sweep_layers(model, eval_windows: TokenWindows, mean_windows: TokenWindows, layers: list[int] | None = None,
                 batch_size: int = 8, seed: int = 0) -> list[LayerRow]:
    """Zero and mean ablation of every MLP in ``layers`` (default: all) on ``eval_windows``."""
    layers = list(range(len(model.blocks))) if layers is None else layers
    means = mlp_out_means(model, mean_windows, layers, batch_size)
    results = Evaluator(model, eval_windows, batch_size, seed=seed).run(ablations(layers, means))
    return layer_rows(results, layers)


def choose_layer(rows: list[LayerRow], n_layers: int, min_delta: float = MIN_DELTA_CE,
                 max_delta: float = MAX_DELTA_CE) -> int | None:
    """The layer nearest the middle (the paper took a middle layer) whose zero ablation costs between
    ``min_delta`` and ``max_delta`` nats with a CI above 0. The first two and the last layer are excluded
    as well. None if no layer qualifies."""
    usable = [r for r in rows if 2 <= r.layer < n_layers - 1
              and min_delta <= r.zero_delta_ce[0] <= max_delta and r.zero_delta_ce[1] > 0]
    if not usable:
        return None
    middle = (n_layers - 1) / 2
    return min(usable, key=lambda r: (abs(r.layer - middle), -r.zero_delta_ce[0])).layer


def table(rows: list[LayerRow]) -> str:
    def fmt(t: tuple[float, float, float]) -> str:
        return f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"

    lines = [f"{'layer':>5}  {'zero ΔCE [95% CI]':<28}{'mean ΔCE [95% CI]':<28}{'zero KL':>9}{'mean KL':>9}"]
    for r in rows:
        lines.append(f"{r.layer:>5}  {fmt(r.zero_delta_ce):<28}{fmt(r.mean_delta_ce):<28}"
                     f"{r.zero_kl[0]:>9.3f}{r.mean_kl[0]:>9.3f}")
    return "\n".join(lines)


def plot(rows: list[LayerRow], path: Path, chosen: int | None) -> None:
    from nl_rewrite.evaluation.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    layers = [r.layer for r in rows]
    for ax, (zero, mean, label) in zip(axes, ((lambda r: r.zero_delta_ce, lambda r: r.mean_delta_ce, "ΔCE (nats)"),
                                             (lambda r: r.zero_kl, lambda r: r.mean_kl, "KL(clean‖ablated)"))):
        for get, name in ((zero, "zero ablation"), (mean, "mean ablation")):
            mid = [get(r)[0] for r in rows]
            err = [[get(r)[0] - get(r)[1] for r in rows], [get(r)[2] - get(r)[0] for r in rows]]
            ax.errorbar(layers, mid, yerr=err, marker="o", ms=3, capsize=2, label=name)
        if chosen is not None:
            ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen layer {chosen}")
        ax.set_yscale("symlog", linthresh=0.05)
        ax.set_xlabel("MLP layer")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].axhline(MIN_DELTA_CE, color="red", lw=0.8, ls=":")
    fig.suptitle("Ablating one MLP: cost per layer (95% window-bootstrap CIs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

