"""nl_rewrite: partially rewrite a transformer in natural language, and measure what it costs.

The public API, importable from here. Names load lazily on first use, so ``import nl_rewrite`` loads neither torch
nor a model:

- model and data: :func:`load_model`, :func:`tiny_model`, :class:`Site`, :func:`token_windows`, :class:`TokenWindows`
- sparse coders: :class:`SparseCoder`, :class:`CoderConfig`, :func:`load_coder`, :func:`save_coder`
- latents: :class:`LatentCache`
- replacements: :class:`Replacement` and the shipped ones (baselines, coders, oracles, simulated, live)
- simulators and calibrators: :class:`Simulator`, :class:`LexicalSimulator`, :class:`LinearCalibrator`,
  :class:`QuantileCalibrator`, :class:`IsotonicCalibrator`, :func:`make_calibrator`
- evaluation: :class:`Evaluator`, :class:`EvalResults`
- LLM backends: :func:`make_backend`, :class:`EmbeddedBackend`, :class:`OpenAIBackend`, :class:`SGLangBackend`,
  :class:`CachedBackend`, :class:`ChatRequest`, :class:`ScoreRequest`
- errors: :class:`NLRewriteError` and its subclasses

Subpackages (``nl_rewrite.model``, ``.data``, ``.coders``, ``.latents``, ``.interp``, ``.replacements``,
``.evaluation``, ``.llm``, ``.pipeline``) re-export more of their own names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nl_rewrite._lazy import by_module, lazy_exports

_EXPORTS = by_module({
    "nl_rewrite.model.loading": ("load_model", "tiny_model"),
    "nl_rewrite.model.sites": ("Site",),
    "nl_rewrite.data.windows": ("token_windows", "TokenWindows"),
    "nl_rewrite.coders.sparse_coder": ("SparseCoder", "CoderConfig"),
    "nl_rewrite.coders.checkpoint": ("load_coder", "save_coder"),
    "nl_rewrite.latents.cache": ("LatentCache",),
    # the subpackage resolves these lazily itself (nl_rewrite/replacements/__init__.py says which module holds each)
    "nl_rewrite.replacements": ("Replacement", "BatchInfo", "ZeroReplacement", "IdentityReplacement",
                                "MeanReplacement", "CoderReplacement", "TranscoderReplacement", "SAEReplacement",
                                "ZeroLatentsReplacement", "RandomLatentsReplacement", "OracleReplacement",
                                "NLSimulatorReplacement", "LiveSimulatorReplacement"),
    "nl_rewrite.interp.simulate": ("Simulator", "SimulationItem"),
    "nl_rewrite.interp.lexical": ("LexicalSimulator",),
    "nl_rewrite.interp.calibrate": ("Calibrator", "LinearCalibrator", "QuantileCalibrator", "IsotonicCalibrator",
                                    "make_calibrator", "calibrator_from_dict"),
    "nl_rewrite.evaluation.evaluator": ("Evaluator", "EvalResults"),
    "nl_rewrite.llm.base": ("LLMBackend", "ChatRequest", "ScoreRequest"),
    "nl_rewrite.llm.factory": ("make_backend",),
    "nl_rewrite.llm.cache": ("CachedBackend",),
    "nl_rewrite.llm.embedded": ("EmbeddedBackend",),
    "nl_rewrite.llm.openai_backend": ("OpenAIBackend",),
    "nl_rewrite.llm.sglang_backend": ("SGLangBackend",),
    "nl_rewrite.errors": ("NLRewriteError", "ModelLoadError", "SiteError", "ShapeMismatchError", "CorpusError",
                          "CheckpointError", "LLMError", "MissingSimulationError"),
})

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and IDEs (tests/test_public_api.py checks they agree)
    from nl_rewrite.coders.checkpoint import load_coder, save_coder
    from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
    from nl_rewrite.data.windows import TokenWindows, token_windows
    from nl_rewrite.errors import (CheckpointError, CorpusError, LLMError, MissingSimulationError, ModelLoadError,
                                   NLRewriteError, ShapeMismatchError, SiteError)
    from nl_rewrite.evaluation.evaluator import EvalResults, Evaluator
    from nl_rewrite.interp.calibrate import (Calibrator, IsotonicCalibrator, LinearCalibrator, QuantileCalibrator,
                                             calibrator_from_dict, make_calibrator)
    from nl_rewrite.interp.lexical import LexicalSimulator
    from nl_rewrite.interp.simulate import SimulationItem, Simulator
    from nl_rewrite.latents.cache import LatentCache
    from nl_rewrite.llm.base import ChatRequest, LLMBackend, ScoreRequest
    from nl_rewrite.llm.cache import CachedBackend
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.llm.factory import make_backend
    from nl_rewrite.llm.openai_backend import OpenAIBackend
    from nl_rewrite.llm.sglang_backend import SGLangBackend
    from nl_rewrite.model.loading import load_model, tiny_model
    from nl_rewrite.model.sites import Site
    from nl_rewrite.replacements import (BatchInfo, CoderReplacement, IdentityReplacement, LiveSimulatorReplacement,
                                         MeanReplacement, NLSimulatorReplacement, OracleReplacement,
                                         RandomLatentsReplacement, Replacement, SAEReplacement, TranscoderReplacement,
                                         ZeroLatentsReplacement, ZeroReplacement)
