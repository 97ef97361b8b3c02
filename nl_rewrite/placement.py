"""Where tensors live and in what precision: ``--device`` and ``--dtype``, on every command that runs a model.

:class:`Placement` is the option pair (a config dataclass, so its field docs are the ``--help``); it is checked
while the options are parsed, so ``--device cuda`` on a machine without CUDA fails before any model loads, with
the fix. The subject model runs in the chosen dtype on the chosen device; coders, the latent cache's inputs, the
Evaluator and the replacements follow the model's device. What is saved (checkpoints, caches) is always on the CPU,
so a coder trained on a GPU loads on a laptop. The Evaluator accumulates CE and KL in float32 whatever the dtype.
"""

import itertools
import logging
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from nl_rewrite.errors import NLRewriteError

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")
CPU_SLOWDOWN = {"bfloat16": "about 5x slower than float32 on this kind of CPU (measured on SmolLM2-135M)",
                "float16": "slower than float32 on most CPUs, and not faster anywhere"}
"""Why a half-precision dtype on the CPU gets a warning (docs: ../shared/reference/environment.md)."""


class DeviceError(NLRewriteError, ValueError):
    """A device that this machine cannot provide, or tensors on two devices that must share one (a ValueError too:
    as an option value it is a usage error, reported while parsing)."""


@dataclass(frozen=True)
class Placement:
    """The device and precision a command runs its models in."""

    device: str = "auto"
    """auto (CUDA where torch sees it, else CPU), cpu, cuda or cuda:N"""
    dtype: DType = "float32"
    """the subject model's precision (float32, bfloat16, float16); CE and KL are accumulated in float32"""

    def __post_init__(self) -> None:
        if self.dtype not in get_args(DType):
            raise ValueError(f"--dtype {self.dtype!r}: valid are {', '.join(get_args(DType))}")
        resolve_device(self.device)  # an unusable device fails while parsing, before any work

    @property
    def placement(self) -> "Placement":
        """The device and dtype alone (for a config that is a Placement among other options)."""
        return Placement(self.device, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def warn_if_slow(self) -> None:
        """Log once per call when a half precision is asked for on the CPU, where it is slower, not faster."""
        if self.torch_device.type == "cpu" and self.dtype in CPU_SLOWDOWN:
            log.warning("--dtype %s on the CPU is %s; --dtype float32 is the fast choice here",
                        self.dtype, CPU_SLOWDOWN[self.dtype])


def resolve_device(spec: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device this machine has; otherwise an error naming
    the fix."""
    if not DEVICE_SPEC.fullmatch(spec):
        raise ValueError(f"--device {spec!r}: valid are auto, cpu, cuda and cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: this torch ({torch.__version__}) sees no CUDA device; use "
                              "--device cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def same_device(what: str, tensor_device: torch.device, other: str, other_device: torch.device) -> None:
    """Refuse to combine two objects on different devices, naming both (instead of torch's error deep in a
    matmul)."""
    if normal(tensor_device) != normal(other_device):
        raise DeviceError(f"{what} is on {tensor_device} but {other} is on {other_device}; load both with the same "
                          f"--device (or move one with .to({str(other_device)!r}))")


def place(module: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """``module`` moved to the placement's device, its parameters cast to its dtype. Buffers keep their precision:
    rotary embeddings' ``inv_freq`` in bfloat16 would blur every position angle (transformers and TransformerLens
    keep such buffers in float32 too). Warns when the placement is a slow one here (:meth:`Placement.warn_if_slow`)."""
    placement.warn_if_slow()
    module.to(placement.torch_device)
    for param in module.parameters():
        param.data = param.data.to(placement.torch_dtype)
    return module


def normal(device: torch.device | str) -> tuple[str, int]:
    """A device as (type, index), ``cuda`` meaning ``cuda:0``: torch compares ``cuda`` and ``cuda:0`` as unequal."""
    device = torch.device(device)
    return device.type, device.index or 0


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module with neither): where its inputs go."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device
