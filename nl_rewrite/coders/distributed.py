"""Data-parallel training under ``torchrun``: which rank this process is, and the few collectives training needs.

``torchrun --nproc_per_node N`` starts N copies of a command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address in their environment. :func:`ranks_from_env` reads them and joins the process group (gloo on
CPU, NCCL on CUDA); outside torchrun it returns :data:`SINGLE_PROCESS`, whose collectives return their input
untouched, so a single process computes exactly what it computed before distributed training existed.

The trainer averages gradients itself (``average_gradients``) instead of wrapping the coder in
``DistributedDataParallel``: DDP only synchronises through ``forward()``, while a training step calls the coder's
encoder, TopK and decoders one by one (the AuxK loss needs the pre-activation encoder output).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; ``world == 1`` means no process group at all."""

    rank: int = 0
    """this process's index, 0 … world - 1; rank 0 writes every file"""
    world: int = 1
    """number of training processes"""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, items: Tensor) -> Tensor:
        """This rank's interleaved share of ``items`` (rank r takes r, r + world, …): equal when world divides it."""
        return items[self.rank::self.world] if self.distributed else items

    def average_gradients(self, module: nn.Module) -> None:
        """Replace every gradient by its mean over the ranks (a missing one counts as zero on that rank)."""
        if not self.distributed:
            return
        for parameter in module.parameters():
            if parameter.grad is None:  # every rank must join every all-reduce, in the same order
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(self.world)

    def any_rank(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a boolean ``mask`` over the ranks."""
        if not self.distributed:
            return mask
        counts = mask.to(torch.int32)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return counts.bool()

    def mean(self, values: Tensor) -> Tensor:
        """The mean of a float tensor over the ranks."""
        if not self.distributed:
            return values
        total = values.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's ``rows`` (equal shapes), concatenated in rank order, on every rank."""
        if not self.distributed:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    def copy_from_main(self, module: nn.Module) -> None:
        """Overwrite this rank's parameters and buffers with rank 0's, so every rank starts from the same weights."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def float_from_main(self, value: float) -> float:
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        carrier = torch.tensor([value], dtype=torch.float64,  # NCCL reduces only CUDA tensors
                               device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(carrier, src=0)
        return float(carrier.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first, then on the others: rank 0 fills shared caches (a converted model,
        tokenised windows) that the other ranks then only read, instead of every rank writing them at once."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE_PROCESS = Ranks()


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def backend_for(device: str) -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors (NCCL cannot reduce CPU tensors, gloo is slow on GPUs)."""
    if not device.startswith("cuda"):
        return "gloo"
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asks for NCCL, but this torch sees no CUDA device; "
                           "train on device 'cpu' (gloo) or install a CUDA build of torch")
    return "nccl"


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``); anything else is ``device`` itself."""
    if device.type == "cuda" and under_torchrun():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextmanager
def ranks_from_env(device: str = "cpu") -> Iterator[Ranks]:
    """The ranks torchrun set up (joining, and at the end leaving, the process group), else :data:`SINGLE_PROCESS`.

    A process group someone else already started is used as it is and left running.
    """
    if dist.is_available() and dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size())
        return
    world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
    if world == 1:
        yield SINGLE_PROCESS
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def check_divisible(world: int, **sizes: int) -> None:
    """Each rank takes 1/world of every buffer and batch: refuse sizes that do not split evenly."""
    for name, size in sizes.items():
        if size % world:
            raise ValueError(f"{name}={size} does not split over {world} processes; under torchrun --nproc_per_node "
                             f"{world}, pass a {name} divisible by {world} (e.g. {size + world - size % world})")
