"""A TopK sparse coder: encoder → ReLU → keep the k largest latents → unit-norm decoder (+ optional linear skip).

Two roles share one class (``CoderConfig.kind``):
- ``"transcoder"`` reads one site (``mlp_in.L``) and predicts another (``mlp_out.L``);
- ``"sae"`` reads and reconstructs one site (e.g. ``resid_post.L``). As in sparsify, an SAE subtracts
  ``b_dec`` from its input before encoding (the pre-encoder bias); a transcoder does not.

Parameter names and shapes follow EleutherAI's sparsify so its checkpoints load unchanged:
``encoder.weight [n_latents, d_in]``, ``encoder.bias [n_latents]``, ``W_dec [n_latents, d_out]``,
``b_dec [d_out]``, ``W_skip [d_out, d_in]`` (output += x @ W_skipᵀ).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.model.sites import Site, resolve, site_width
from nl_rewrite.placement import module_device, same_device

Kind = Literal["transcoder", "sae"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass
class CoderConfig:
    """Shapes and roles of a sparse coder. Saved in the checkpoint's ``cfg.json`` next to sparsify's fields."""

    d_in: int = field(metadata={"help": "width of the activation read"})
    d_out: int = field(metadata={"help": "width of the activation written"})
    n_latents: int = field(default=4096, metadata={"help": "number of latents (dictionary width)"})
    k: int = field(default=32, metadata={"help": "latents kept per token (TopK)"})
    skip: bool = field(default=True, metadata={"help": "linear skip path W_skip (a 'skip transcoder')"})
    kind: str = field(default="transcoder", metadata={"help": "transcoder or sae"})
    read_site: str = field(default="mlp_in.15", metadata={"help": "hook site read, e.g. mlp_in.15"})
    write_site: str = field(default="mlp_out.15", metadata={"help": "hook site written, e.g. mlp_out.15"})
    model: str = field(default="smollm2-135m", metadata={"help": "model the coder was trained on"})

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "n_latents", "k"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"CoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.k > self.n_latents:
            raise ValueError(f"CoderConfig.k={self.k} exceeds n_latents={self.n_latents}")
        if self.kind not in KINDS:
            raise ValueError(f"CoderConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "sae" and self.d_in != self.d_out:
            raise ValueError(f"an SAE reconstructs its input: d_in ({self.d_in}) must equal d_out ({self.d_out})")
        # normalise site spelling ("mlp_in(6)" → "mlp_in.6"); raises SiteError on nonsense
        self.read_site = str(Site.parse(self.read_site))
        self.write_site = str(Site.parse(self.write_site))

    def to_dict(self) -> dict:
        return asdict(self)


class SparseLatents(NamedTuple):
    """The k active latents of each token: their values and latent ids."""

    values: Float[Tensor, "... k"]
    indices: Int[Tensor, "... k"]

    def dense(self, n_latents: int) -> Float[Tensor, "... n_latents"]:
        """Every latent's value: the active ones', 0 for the rest."""
        out = self.values.new_zeros(*self.values.shape[:-1], n_latents)
        return out.scatter_(-1, self.indices, self.values)


class SparseCoder(nn.Module):
    """See the module docstring. All methods accept any number of leading dimensions."""

    def __init__(self, cfg: CoderConfig, dtype: torch.dtype = torch.float32, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.encoder = nn.Linear(cfg.d_in, cfg.n_latents, dtype=dtype)
        bound = cfg.d_in ** -0.5  # nn.Linear's default range, drawn from our own generator for determinism
        with torch.no_grad():
            self.encoder.weight.uniform_(-bound, bound, generator=gen)
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(self._initial_decoder(gen, dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dtype)) if cfg.skip else None

    def _initial_decoder(self, gen: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        if self.cfg.d_out == self.cfg.d_in:  # tied init, as sparsify does for SAEs: encoder and decoder agree
            w = self.encoder.weight.detach().clone()
        else:
            w = torch.randn(self.cfg.n_latents, self.cfg.d_out, generator=gen, dtype=dtype)
        return w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).eps)

    # ---- encoding -------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeMismatchError(
                f"sparse coder for {self.cfg.read_site} expects inputs of width d_in={self.cfg.d_in}, "
                f"got shape {tuple(x.shape)}")

    def encoder_out(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """The encoder's affine output, before ReLU (training's AuxK loss needs it for latents that never fire)."""
        self._check_input(x)
        if self.cfg.kind == "sae":
            x = x - self.b_dec
        return self.encoder(x.to(self.encoder.weight.dtype))

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... n_latents"]:
        """ReLU of the encoder, before TopK."""
        return F.relu(self.encoder_out(x))

    def topk(self, dense: Float[Tensor, "... n_latents"]) -> SparseLatents:
        values, indices = dense.topk(self.cfg.k, dim=-1, sorted=True)
        return SparseLatents(values, indices)

    def encode(self, x: Float[Tensor, "... d_in"]) -> SparseLatents:
        return self.topk(self.pre_acts(x))

    # ---- decoding -------------------------------------------------------------------------------------------
    def decode(self, latents: "SparseLatents | Float[Tensor, '... n_latents']") -> Float[Tensor, "... d_out"]:
        """Latents · W_dec + b_dec (no skip). Sparse latents use a gather (embedding_bag), not a dense matmul."""
        if isinstance(latents, SparseLatents):
            return self.decode_sparse(latents.values, latents.indices) + self.b_dec
        if latents.shape[-1] != self.cfg.n_latents:
            raise ShapeMismatchError(f"dense latents must have {self.cfg.n_latents} columns, got {tuple(latents.shape)}")
        return latents @ self.W_dec + self.b_dec

    def decode_sparse(self, values: Float[Tensor, "... k"], indices: Int[Tensor, "... k"]) -> Float[Tensor, "... d_out"]:
        """Σ values · W_dec[indices], without b_dec: the latents' own contribution (the trainer fits residuals with it)."""
        if values.shape != indices.shape:
            raise ShapeMismatchError(f"latent values {tuple(values.shape)} and indices {tuple(indices.shape)} differ")
        lead, width = values.shape[:-1], values.shape[-1]
        flat = F.embedding_bag(indices.reshape(-1, width), self.W_dec, per_sample_weights=values.reshape(-1, width).to(
            self.W_dec.dtype), mode="sum")
        return flat.reshape(*lead, self.cfg.d_out)

    def skip(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The linear skip path x @ W_skipᵀ; zeros when the coder has none."""
        self._check_input(x)
        if self.W_skip is None:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out, dtype=self.b_dec.dtype)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    # ---- the whole coder, with optional latent edits ---------------------------------------------------------
    def forward(self, x: Float[Tensor, "... d_in"], overwrite_ids: Int[Tensor, " m"] | None = None,
                overwrite_values: Float[Tensor, "... m"] | None = None, retopk: bool = True
                ) -> Float[Tensor, "... d_out"]:
        """decode(TopK(pre_acts(x))) + skip(x), optionally with some latents overwritten.

        With ``overwrite_ids``: the dense pre-activations of those latents are replaced by
        ``overwrite_values`` (broadcast over leading dims). ``retopk=True`` then keeps the top k of all
        latents (the paper's protocol); ``retopk=False`` keeps the original top k and adds the overwritten
        latents on top of them (so more than k may be active).
        """
        dense = self.pre_acts(x)
        if overwrite_ids is None:
            return self.decode(self.topk(dense)) + self.skip(x)
        ids, values = self._check_overwrite(dense, overwrite_ids, overwrite_values)
        if retopk:
            dense = dense.clone()
            dense[..., ids] = values
            return self.decode(self.topk(dense)) + self.skip(x)
        kept = self.topk(dense).dense(self.cfg.n_latents)
        kept[..., ids] = values
        return self.decode(kept) + self.skip(x)

    def _check_overwrite(self, dense: Tensor, ids: Tensor | None, values: Tensor | None) -> tuple[Tensor, Tensor]:
        if values is None:
            raise ValueError("overwrite_ids given without overwrite_values")
        ids = torch.as_tensor(ids, dtype=torch.long, device=dense.device)
        if ids.ndim != 1 or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.n_latents)):
            raise ShapeMismatchError(f"overwrite_ids must be a 1-d tensor of latent ids in [0, {self.cfg.n_latents})")
        if ids.unique().numel() != ids.numel():
            raise ValueError("overwrite_ids contains repeated latent ids")
        values = torch.as_tensor(values, dtype=dense.dtype, device=dense.device)
        target = (*dense.shape[:-1], ids.numel())
        try:
            values = values.expand(target)
        except RuntimeError as exc:
            raise ShapeMismatchError(f"overwrite_values of shape {tuple(values.shape)} do not broadcast to "
                                     f"{target} (leading dims of x, then one column per overwritten id)") from exc
        return ids, values

    # ---- helpers -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (latent values then carry the scale)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    def check_fits(self, model) -> None:
        """Raise ShapeMismatchError unless ``model``'s read/write sites have this coder's widths, and DeviceError
        unless the two are on one device."""
        same_device("the coder", module_device(self), f"the model {getattr(model, 'nl_rewrite_name', '')}".strip(),
                    module_device(model))
        for site, width in ((self.cfg.read_site, self.cfg.d_in), (self.cfg.write_site, self.cfg.d_out)):
            resolve(model, site)
            have = site_width(model, site)
            if have != width:
                raise ShapeMismatchError(f"coder expects width {width} at {site}, but the model's {site} has width "
                                         f"{have}; was it trained on another model ({self.cfg.model!r})?")
