"""Where a sharded stage runs: in this process, or on the workers of a Ray cluster.

A stage hands a runner a *context* (what every worker needs: a model, a coder, an LLM backend, a latent cache),
a *work* function ``work(context, shard) -> result`` and its shards. The runner calls ``on_result(index, result)``
in the calling process as each shard finishes, so the stage's store (latent-cache shards, JSONL records,
simulation files) keeps one writer, and a rerun resumes from whatever any worker finished.

On Ray (:class:`RayRunner`) the context is put in the object store once and every worker actor unpickles its own
copy: an LLM backend pickles as its recipe, so each worker loads its own embedded model or opens its own client
and cache connection. A worker killed mid-shard is restarted by Ray and the shard retried
(``max_restarts``/``max_task_retries``); its result reaches ``on_result`` once. Ray is an optional extra:
``pip install 'nl_rewrite[ray]'``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, Sequence, TypeVar, runtime_checkable

from tqdm import tqdm

from nl_rewrite.errors import NLRewriteError
from nl_rewrite.parallel.portable import dumps, loads

log = logging.getLogger(__name__)

C = TypeVar("C")
S = TypeVar("S")
R = TypeVar("R")
INSTALL_RAY = "pip install -c constraints.txt -e '.[ray]'"


class RayUnavailableError(NLRewriteError):
    """``--ray`` asked for, but Ray is not installed or its cluster cannot be reached."""


@runtime_checkable
class ShardRunner(Protocol):
    """Runs ``work(context, shard)`` for every shard and reports each result once, in the calling process."""

    parallel: bool
    """Whether shards run side by side elsewhere (a stage may then cut its work finer than it would in-process)."""

    def map(self, context: C, work: Callable[[C, S], R], shards: Sequence[S], on_result: Callable[[int, R], None],
            desc: str = "shards", progress: bool = True) -> None: ...


class InProcess:
    """The default: every shard in this process, in order, with a progress bar."""

    parallel = False

    def map(self, context: C, work: Callable[[C, S], R], shards: Sequence[S], on_result: Callable[[int, R], None],
            desc: str = "shards", progress: bool = True) -> None:
        for index, shard in enumerate(tqdm(shards, desc=desc, disable=not progress)):
            on_result(index, work(context, shard))


@dataclass(frozen=True)
class RayOptions:
    """How sharded stages use Ray."""

    address: str = "local"
    """cluster address: ``local`` starts one on this machine, ``auto`` joins ``ray start``'s, or ``ray://host:10001``"""
    workers: int | None = None
    """worker actors per stage (None: one per CPU of the cluster); each holds its own copy of the model"""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves (and torch threads it uses)"""
    gpus_per_worker: float = 0.0
    """GPUs each worker reserves (``--device cuda`` stages on a GPU cluster)"""
    retries: int = 3
    """restarts of a killed worker, and retries of the shard it was running"""


class ShardWorker(Generic[C]):
    """One Ray actor: holds its own copy of the context and runs shards against it."""

    def __init__(self, payload: bytes, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # workers share the node's cores; oversubscription slows all
        self.context = loads(payload)

    def run(self, work: Callable[[C, S], R], index: int, shard: S) -> tuple[int, R]:
        return index, work(self.context, shard)


class RayRunner:
    """Shards over a pool of :class:`ShardWorker` actors (``ray.util.ActorPool``), results in completion order."""

    parallel = True

    def __init__(self, options: RayOptions = RayOptions()) -> None:
        self.options = options
        self.ray = connect(options.address)
        self.workers: list = []
        """The running stage's actor handles (empty between stages), for monitoring or fault injection."""

    def n_workers(self, n_shards: int) -> int:
        cpus = int(self.ray.cluster_resources().get("CPU", 1) // max(self.options.cpus_per_worker, 1e-9))
        return max(1, min(n_shards, self.options.workers or cpus))

    def map(self, context: C, work: Callable[[C, S], R], shards: Sequence[S], on_result: Callable[[int, R], None],
            desc: str = "shards", progress: bool = True) -> None:
        if not shards:
            return
        from ray.util import ActorPool

        payload = self.ray.put(dumps(context))  # held until the stage ends: a restarted worker reads it again
        actors = self.workers = self._start_workers(payload, self.n_workers(len(shards)))
        try:
            results = ActorPool(actors).map_unordered(lambda actor, item: actor.run.remote(work, *item),
                                                      list(enumerate(shards)))
            for index, result in tqdm(results, total=len(shards), desc=f"{desc} (ray)", disable=not progress):
                on_result(index, result)
        finally:
            self.workers = []
            for actor in actors:
                self.ray.kill(actor)
            del payload

    def _start_workers(self, payload, n: int) -> list:
        opts = self.options
        actor = self.ray.remote(ShardWorker).options(
            num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker, max_restarts=opts.retries,
            max_task_retries=opts.retries)
        log.info("ray: %d workers", n)
        return [actor.remote(payload, int(opts.cpus_per_worker)) for _ in range(n)]


def connect(address: str):
    """The ``ray`` module, connected to ``address`` (``local``: a new cluster on this machine), with clear errors.

    Workers' log records reach this terminal (``log_to_driver``): an endpoint taken out of rotation or a NaN
    simulation is said where the run was started."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(f"--ray needs Ray, which is not installed ({exc}); install it with "
                                  f"`{INSTALL_RAY}`") from exc
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except ConnectionError as exc:
            raise RayUnavailableError(f"cannot reach the Ray cluster at {address!r} ({exc}); start one with "
                                      "`ray start --head`, or pass --ray with no address for a local one") from exc
    return ray


def make_runner(ray_address: str | None, workers: int | None = None, gpus_per_worker: float = 0.0) -> ShardRunner:
    """This process when ``ray_address`` is None, else a :class:`RayRunner` on that cluster."""
    if ray_address is None:
        return InProcess()
    return RayRunner(RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker))
