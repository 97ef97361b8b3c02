"""Where a sharded stage runs: in this process, or on the workers of a Ray cluster.

A stage hands a runner a *context* (what every worker needs: a model, a coder, an LLM backend, a latent cache),
a *work* function ``work(context, shard) -> result`` and its shards. The runner calls ``on_result(index, result)``
in the calling process as each shard finishes, so the stage's store (latent-cache shards, JSONL records,
simulation files) keeps one writer, and a rerun resumes from whatever any worker finished.

On Ray (:class:`RayRunner`) the context is put in the object store once per stage and every worker actor unpickles
its own copy (the actors live from the first stage to the last, so only the first pays their start-up): an LLM
backend pickles as its recipe, so each worker loads its own embedded model or opens its own client and cache
connection. A worker killed mid-shard is restarted by Ray and the shard retried
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

    def stop(self) -> None:
        """Free what the runner holds between stages (its workers); the next stage may start again."""

    def __enter__(self) -> "ShardRunner": ...

    def __exit__(self, *exc_info: object) -> None: ...


class StopsOnExit:
    """``with runner:`` stops the runner when the block ends, however it ends: whoever makes a runner ends it."""

    def stop(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class InProcess(StopsOnExit):
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
    """One Ray actor, kept from stage to stage: it holds the running stage's context (its own copy, unpickled once
    per stage) and runs that stage's shards against it."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # workers share the node's cores; oversubscription slows all
        self.stage: int | None = None
        self.context: C | None = None

    def run(self, stage: int, payload: list, work: Callable[[C, S], R], index: int, shard: S) -> tuple[int, R]:
        """``work`` on ``shard`` (the ``index``-th of stage number ``stage``, whose context is ``payload[0]``: an
        object reference in a list, so Ray passes it unread and only a worker new to the stage fetches it)."""
        if self.stage != stage:
            import ray

            self.context = None  # the last stage's copy goes before this one's is read
            self.context, self.stage = loads(ray.get(payload[0])), stage
        return index, work(self.context, shard)  # type: ignore[arg-type]

    def release(self) -> None:
        """Drop the stage's context (the process stays, warm, for the next stage), and its GPU memory."""
        import gc

        import torch

        self.stage, self.context = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # cached blocks would stay reserved in this idle process


class RayRunner(StopsOnExit):
    """Shards over a pool of :class:`ShardWorker` actors (``ray.util.ActorPool``), results in completion order.

    The actors are started by the first stage that needs them and kept for the next ones (a new worker process spends
    seconds importing torch and the package); each stage's context is dropped when the stage ends. A stage that fails
    stops them all, so the next one starts from fresh workers. Kept workers keep their CPUs (and GPUs) reserved until
    :meth:`stop` (``with RayRunner(...) as runner:`` calls it) or until the runner is dropped: on a small cluster,
    stop one runner before another starts its workers, or the second waits for resources forever."""

    parallel = True

    def __init__(self, options: RayOptions = RayOptions()) -> None:
        self.options = options
        self.ray = connect(options.address)
        self.workers: list = []
        """The worker actors' handles (empty until the first stage), for monitoring or fault injection."""
        self.stages = 0

    def n_workers(self, n_shards: int) -> int:
        cpus = int(self.ray.cluster_resources().get("CPU", 1) // max(self.options.cpus_per_worker, 1e-9))
        return max(1, min(n_shards, self.options.workers or cpus))

    def map(self, context: C, work: Callable[[C, S], R], shards: Sequence[S], on_result: Callable[[int, R], None],
            desc: str = "shards", progress: bool = True) -> None:
        if not shards:
            return
        from ray.util import ActorPool

        self.stages += 1
        stage, payload = self.stages, [self.ray.put(dumps(context))]  # a restarted worker reads the payload again
        actors = self._workers(self.n_workers(len(shards)))
        try:
            results = ActorPool(actors).map_unordered(lambda actor, item: actor.run.remote(stage, payload, work, *item),
                                                      list(enumerate(shards)))
            for index, result in tqdm(results, total=len(shards), desc=f"{desc} (ray)", disable=not progress):
                on_result(index, result)
        except BaseException:
            self.stop()
            raise
        try:  # waited for: a release still queued when stop() kills its actor would be retried, and logged
            self.ray.get([actor.release.remote() for actor in actors])
        except self.ray.exceptions.RayError:
            self.stop()  # a worker that cannot drop its context is not kept

    def stop(self) -> None:
        """Kill the worker actors (the next stage starts new ones). Ray also ends them when the runner is dropped."""
        workers, self.workers = self.workers, []
        for actor in workers:
            self.ray.kill(actor)

    def _workers(self, n: int) -> list:
        """The first ``n`` worker actors, starting the missing ones."""
        opts = self.options
        if len(self.workers) < n:
            # restarts unbounded: a kept worker lives through many stages, and each shard's retries are the limit
            actor = self.ray.remote(ShardWorker).options(
                num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker, max_restarts=-1,
                max_task_retries=opts.retries)
            log.info("ray: starting %d workers", n - len(self.workers))
            self.workers += [actor.remote(int(opts.cpus_per_worker)) for _ in range(n - len(self.workers))]
        return self.workers[:n]


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
