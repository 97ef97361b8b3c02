"""Pickling a stage's context for Ray workers, models included.

transformers 5 installs "output capturing" forward hooks on a model's layers the first time it runs; they are
closures over a ``ContextVar``, which cannot be pickled, so a model that has run once cannot be sent as is. Each
such hook is pickled as its recipe (the key, index and flag it was made with) and rebuilt in the worker by
transformers' own ``install_output_capuring_hook``, so it reads the worker's collector.
"""

from __future__ import annotations

import io
import pickle
from typing import Callable

CAPTURE_HOOK = "install_output_capuring_hook.<locals>.output_capturing_hook"


class HookCatcher:
    """Stands in for a module: keeps the hook transformers registers on it."""

    hook: Callable | None = None

    def register_forward_hook(self, hook: Callable) -> None:
        self.hook = hook


def capture_hook(key: str, index: int, capture_initial_hidden_state: bool) -> Callable:
    """transformers' output-capturing hook for ``key``, made afresh in this process."""
    from transformers.utils.output_capturing import install_output_capuring_hook

    catcher = HookCatcher()
    install_output_capuring_hook(catcher, key, index, capture_initial_hidden_state)
    return catcher.hook


def hook_recipe(hook: Callable) -> tuple[str, int, bool]:
    cells = dict(zip(hook.__code__.co_freevars, (cell.cell_contents for cell in hook.__closure__ or ())))
    return cells["key"], cells["index"], cells["capture_initial_hidden_state"]


def dumps(context: object) -> bytes:
    """``context`` pickled with cloudpickle (closures and test-local classes travel by value), hooks as recipes."""
    from ray import cloudpickle

    class ContextPickler(cloudpickle.Pickler):
        def reducer_override(self, obj):
            if callable(obj) and getattr(obj, "__qualname__", None) == CAPTURE_HOOK:
                return capture_hook, hook_recipe(obj)
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    ContextPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(context)
    return buffer.getvalue()


def loads(payload: bytes) -> object:
    return pickle.loads(payload)
