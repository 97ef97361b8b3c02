"""A small vocabulary of hook sites, mapped to TransformerLens bridge hook names.

``mlp_in`` is exactly what the MLP receives (after its norm weight): ``blocks.L.mlp.hook_in``.
``blocks.L.ln2.hook_normalized`` is before the norm weight and ``hook_mlp_in`` is the pre-norm
residual, so neither is the MLP input. ``mlp_out`` is what the block adds to the residual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from nl_rewrite.errors import SiteError

SITE_HOOKS: dict[str, str] = {
    "mlp_in": "blocks.{layer}.mlp.hook_in",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
}

SiteKind = Literal["mlp_in", "mlp_out", "resid_pre", "resid_mid", "resid_post", "attn_out"]
"""The keys of ``SITE_HOOKS``, as a type (config fields that name a site kind)."""

_PATTERN = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*(-?\d+)\s*\)|\.(-?\d+))\s*$")


@dataclass(frozen=True)
class Site:
    """A hook site: a kind from ``SITE_HOOKS`` at a layer. Written ``mlp_out.6`` or ``mlp_out(6)``."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_HOOKS:
            raise SiteError(f"unknown hook site kind {self.kind!r}; valid kinds: {', '.join(SITE_HOOKS)}")

    @classmethod
    def parse(cls, text: "str | Site") -> "Site":
        if isinstance(text, Site):
            return text
        match = _PATTERN.match(text)
        if not match:
            raise SiteError(f"cannot parse hook site {text!r}; write e.g. 'mlp_out.6' or 'mlp_in(6)' "
                            f"with a kind from: {', '.join(SITE_HOOKS)}")
        return cls(match.group(1), int(match.group(2) or match.group(3)))

    @property
    def hook_name(self) -> str:
        return SITE_HOOKS[self.kind].format(layer=self.layer)

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"


def mlp_in(layer: int) -> Site:
    return Site("mlp_in", layer)


def mlp_out(layer: int) -> Site:
    return Site("mlp_out", layer)


def resid_pre(layer: int) -> Site:
    return Site("resid_pre", layer)


def resid_post(layer: int) -> Site:
    return Site("resid_post", layer)


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise SiteError(f"layer {layer} out of range for a model with {n_layers} layers (valid: 0..{n_layers - 1})")


def resolve(model, site: "str | Site") -> str:
    """The bridge hook name of ``site``, after checking that ``model`` has that layer and hook."""
    site = Site.parse(site)
    check_layer(site.layer, model.cfg.n_layers)
    name = site.hook_name
    if name not in model.hook_dict and site.kind == "resid_mid" and getattr(model.cfg, "parallel_attn_mlp", False):
        raise SiteError(f"site {site}: this model's blocks run attention and the MLP in parallel on the same input "
                        "(GPT-NeoX/Pythia's parallel residual), so there is no residual stream between them; use "
                        f"resid_pre.{site.layer} (what both read) or resid_post.{site.layer}")
    if name not in model.hook_dict:
        raise SiteError(f"model has no hook {name!r} for site {site}; valid kinds: {', '.join(SITE_HOOKS)}")
    return name


def site_width(model, site: "str | Site") -> int:
    """The activation width at ``site`` (d_model for all current kinds)."""
    resolve(model, site)
    return int(model.cfg.d_model)
