"""Sparse-coder checkpoints on disk.

Our format is EleutherAI sparsify's: one folder per hookpoint holding ``cfg.json`` and ``sae.safetensors``
with tensors ``encoder.weight``, ``encoder.bias``, ``W_dec``, ``b_dec`` and optionally ``W_skip``. We add our
own keys to ``cfg.json`` (``d_out``, ``kind``, ``read_site``, ``write_site``, ``model``); sparsify ignores
extra keys, and folders written by sparsify (which lack them) get sites inferred from the folder name
(``layers.6.mlp`` → transcoder ``mlp_in.6`` → ``mlp_out.6``; ``layers.6`` → SAE on ``resid_post.6``) or
passed explicitly.

SAELens local folders (``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec``, ``b_dec``) load too when they are TopK SAEs; other SAELens architectures (ReLU/L1, JumpReLU, gated)
compute something a TopK coder cannot and are refused with a clear error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from nl_rewrite import io
from nl_rewrite.errors import CheckpointError, ShapeMismatchError, SiteError
from nl_rewrite.model.hub import HF_SPEC, snapshot, split_spec
from nl_rewrite.model.sites import SITE_HOOKS, Site
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
from nl_rewrite.placement import module_device

CFG_FILE = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
_OUR_KEYS = ("d_out", "kind", "read_site", "write_site", "model")


class CheckpointShapeError(CheckpointError, ShapeMismatchError):
    """A checkpoint whose tensors disagree with its config or with the model it is loaded for."""




# ---- saving ---------------------------------------------------------------------------------------------------
def sparsify_cfg(cfg: CoderConfig) -> dict:
    """cfg.json contents: sparsify's fields first (so sparsify can read it), then ours."""
    return {
        "activation": "topk", "expansion_factor": max(1, cfg.n_latents // cfg.d_in), "normalize_decoder": True,
        "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip,
        "transcode": cfg.kind == "transcoder", "d_in": cfg.d_in,
        **{key: getattr(cfg, key) for key in _OUR_KEYS},
    }


def save_coder(coder: SparseCoder, folder: "str | Path") -> Path:
    """Write ``folder/cfg.json`` + ``folder/sae.safetensors``. Weights first, so a complete cfg means complete weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    io.save_tensors(folder / SPARSIFY_WEIGHTS, dict(coder.state_dict()), metadata={"format": "pt"})  # on the CPU
    io.write_text(folder / CFG_FILE, json.dumps(sparsify_cfg(coder.cfg), indent=1))
    return folder


# ---- reading files with clear errors -------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return io.read_json_object(path, CheckpointError, "checkpoint config",
                               "save the checkpoint again (save_coder) or point to the folder holding cfg.json")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read checkpoint weights {path}: {exc}; is the file truncated or corrupt?") from exc


def _require(tensors: dict[str, Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensor(s) {missing}; it holds {sorted(tensors)}")


def _cfg_int(cfg: dict, key: str, path: Path) -> int:
    try:
        return int(cfg[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config {path} lacks a valid integer {key!r}") from exc


# ---- sites for folders written by other tools ----------------------------------------------------------------
def _sites_from_hookpoint(name: str, transcode: bool) -> tuple[str, str] | None:
    """sparsify hookpoint folder names (``layers.6.mlp``, ``layers.6``, ``gpt_neox.layers.6.mlp``) → sites."""
    match = re.search(r"layers\.(\d+)(\.mlp)?$", name)
    if not match:
        return None
    layer = int(match.group(1))
    if transcode or match.group(2):
        return f"mlp_in.{layer}", f"mlp_out.{layer}"
    return f"resid_post.{layer}", f"resid_post.{layer}"


def _site_from_hook_name(hook_name: str) -> str | None:
    """A TransformerLens hook name (``blocks.8.hook_resid_pre``) → our site string."""
    for kind, template in SITE_HOOKS.items():
        pattern = "^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$"
        match = re.match(pattern, hook_name)
        if match:
            return str(Site(kind, int(match.group(1))))
    return None


def _build_config(path: Path, values: dict, overrides: dict[str, str | None]) -> CoderConfig:
    values = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    if values.get("read_site") is None or values.get("write_site") is None:
        raise CheckpointError(f"cannot tell which hook sites {path} was trained on; pass read_site=... and "
                              "write_site=... (e.g. 'mlp_in.6', 'mlp_out.6')")
    try:
        return CoderConfig(**values)
    except (ValueError, TypeError, SiteError) as exc:
        raise CheckpointError(f"checkpoint config {path} is invalid: {exc}") from exc


# ---- sparsify -----------------------------------------------------------------------------------------------
def _sparsify_config(folder: Path, raw: dict, overrides: dict[str, str | None]) -> CoderConfig:
    path = folder / CFG_FILE
    if raw.get("activation", "topk") != "topk":
        raise CheckpointError(f"{path}: activation {raw['activation']!r} is not supported (only topk)")
    d_in = _cfg_int(raw, "d_in", path)
    n_latents = int(raw.get("num_latents") or 0) or d_in * _cfg_int(raw, "expansion_factor", path)
    transcode = bool(raw.get("transcode", False))
    values = {"d_in": d_in, "d_out": int(raw.get("d_out", d_in)), "n_latents": n_latents,
              "k": _cfg_int(raw, "k", path), "skip": bool(raw.get("skip_connection", False)),
              "kind": raw.get("kind", "transcoder" if transcode else "sae"),
              "model": raw.get("model", "unknown")}
    sites = _sites_from_hookpoint(folder.name, transcode)
    values["read_site"] = raw.get("read_site", sites[0] if sites else None)
    values["write_site"] = raw.get("write_site", sites[1] if sites else None)
    return _build_config(path, values, overrides)


def _load_sparsify(folder: Path, overrides: dict[str, str | None], dtype: torch.dtype) -> SparseCoder:
    cfg = _sparsify_config(folder, _read_json(folder / CFG_FILE), overrides)
    tensors = _read_tensors(folder / SPARSIFY_WEIGHTS)
    _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec") + (("W_skip",) if cfg.skip else ()),
             folder / SPARSIFY_WEIGHTS)
    return _assemble(cfg, tensors, folder, dtype)


# ---- SAELens ------------------------------------------------------------------------------------------------
def _saelens_config(folder: Path, raw: dict, overrides: dict[str, str | None]) -> CoderConfig:
    path = folder / CFG_FILE
    meta = raw.get("metadata") or {}
    arch = raw.get("architecture") or raw.get("activation_fn_str")
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    if arch != "topk" or not k:
        raise CheckpointError(f"{path}: SAELens architecture {arch!r} is not a TopK SAE; only TopK SAEs can be "
                              "loaded as a SparseCoder (ReLU/JumpReLU/gated SAEs compute a different function)")
    unsupported = {key: raw[key] for key, plain in (("normalize_activations", "none"), ("reshape_activations", "none"),
                                                    ("rescale_acts_by_decoder_norm", False))
                   if raw.get(key, plain) not in (plain, None)}
    if unsupported:
        raise CheckpointError(f"{path}: SAELens options {unsupported} change what the SAE computes and are not "
                              "supported; load an SAE saved without them")
    hook = raw.get("hook_name") or meta.get("hook_name") or ""
    site = _site_from_hook_name(hook)
    d_in = _cfg_int(raw, "d_in", path)
    values = {"d_in": d_in, "d_out": d_in, "n_latents": _cfg_int(raw, "d_sae", path), "k": int(k), "skip": False,
              "kind": "sae", "read_site": site, "write_site": site,
              "model": raw.get("model_name") or meta.get("model_name") or "unknown"}
    return _build_config(path, values, overrides)


def _load_saelens(folder: Path, overrides: dict[str, str | None], dtype: torch.dtype) -> SparseCoder:
    raw = _read_json(folder / CFG_FILE)
    cfg = _saelens_config(folder, raw, overrides)
    tensors = _read_tensors(folder / SAELENS_WEIGHTS)
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), folder / SAELENS_WEIGHTS)
    w_enc, b_enc = tensors["W_enc"].T.contiguous(), tensors["b_enc"]
    if not raw.get("apply_b_dec_to_input", True):
        # our SAE encodes (x - b_dec); fold b_dec back into the encoder bias so the function is unchanged
        b_enc = b_enc + w_enc.to(torch.float64) @ tensors["b_dec"].to(torch.float64)
    ours = {"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    return _assemble(cfg, ours, folder, dtype)


# ---- shared ---------------------------------------------------------------------------------------------------
def _expected_shapes(cfg: CoderConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"encoder.weight": (cfg.n_latents, cfg.d_in), "encoder.bias": (cfg.n_latents,),
              "W_dec": (cfg.n_latents, cfg.d_out), "b_dec": (cfg.d_out,)}
    if cfg.skip:
        shapes["W_skip"] = (cfg.d_out, cfg.d_in)
    return shapes


def _assemble(cfg: CoderConfig, tensors: dict[str, Tensor], folder: Path, dtype: torch.dtype) -> SparseCoder:
    expected = _expected_shapes(cfg)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointShapeError(f"checkpoint {folder}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                       f"but its config implies {shape}")
    coder = SparseCoder(cfg, dtype=dtype, seed=0)
    coder.load_state_dict({name: tensors[name].to(dtype) for name in expected}, strict=True)
    return coder


def is_checkpoint(folder: "str | Path") -> bool:
    folder = Path(folder)
    return (folder / CFG_FILE).is_file() and ((folder / SPARSIFY_WEIGHTS).is_file() or
                                              (folder / SAELENS_WEIGHTS).is_file())


def checkpoint_folder(spec: "str | Path") -> Path:
    """A coder's folder: a local path, or ``hf:ORG/REPO[/SUBFOLDER]`` from the huggingface_hub cache (downloaded
    into it if needed; see :mod:`nl_rewrite.model.hub`)."""
    if str(spec).startswith(HF_SPEC):
        repo_id, subfolder = split_spec(str(spec))
        return snapshot(repo_id, "coder", CFG_FILE, subfolder)
    return Path(spec)


def load_coder(folder: "str | Path", model=None, dtype: torch.dtype = torch.float32,
               read_site: str | None = None, write_site: str | None = None) -> SparseCoder:
    """Load a sparsify- or SAELens-layout folder (or ``hf:ORG/REPO[/SUBFOLDER]``). Sites can be overridden; with
    ``model``, check the widths fit and put the coder on the model's device."""
    folder = checkpoint_folder(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    overrides = {"read_site": read_site, "write_site": write_site}
    if (folder / SPARSIFY_WEIGHTS).exists():
        coder = _load_sparsify(folder, overrides, dtype)
    elif (folder / SAELENS_WEIGHTS).exists():
        coder = _load_saelens(folder, overrides, dtype)
    else:
        raise CheckpointError(f"{folder} holds neither {SPARSIFY_WEIGHTS} (sparsify) nor {SAELENS_WEIGHTS} "
                              f"(SAELens); found {sorted(p.name for p in folder.iterdir())}")
    if model is not None:
        coder.to(module_device(model))  # the coder follows the model it reads
        try:
            coder.check_fits(model)
        except ShapeMismatchError as exc:
            raise CheckpointShapeError(f"checkpoint {folder} does not fit the model: {exc}") from exc
    return coder
