"""Exceptions with messages that name the problem, raised at the boundary instead of deep in torch."""


class NLRewriteError(Exception):
    """Base class of every error nl_rewrite raises on purpose."""


class ModelLoadError(NLRewriteError):
    """Unknown model name, or a missing/corrupt model file."""


class SiteError(NLRewriteError, ValueError):
    """A hook site or layer that the model does not have."""


class ShapeMismatchError(NLRewriteError, ValueError):
    """A replacement or checkpoint whose shapes do not fit the model."""


class CorpusError(NLRewriteError, ValueError):
    """An empty corpus, or one too short for a single window."""


class CheckpointError(NLRewriteError):
    """A checkpoint folder with a missing tensor, a corrupt file or a config that does not fit."""


class LLMError(NLRewriteError):
    """An LLM backend that cannot give what was asked (dead server, no logprobs, unparseable reply)."""


class MissingSimulationError(NLRewriteError, KeyError):
    """A (latent, window) never simulated with this explanation and simulator, asked for by a store read or by an
    evaluation of the simulated replacement."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
