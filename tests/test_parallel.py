"""Sharded stages on a local Ray cluster: the same results as one process, and a killed worker loses nothing.

One local cluster (2 CPUs) serves the module. Workers import ``nl_rewrite`` and the tests' helpers (PYTHONPATH is
set before the cluster starts); a test that kills a worker does it from inside the work (``os._exit``) once, marked
by a file, so the retry that Ray makes finds the marker and finishes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.interp.explain import ExplainConfig, explain_latents
from nl_rewrite.interp.lexical import LexicalSimulator
from nl_rewrite.interp.score import ScoreConfig, score_explanations
from nl_rewrite.interp.simulation_store import SimulationStore, simulate_into_store
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.latents.sampling import SamplingConfig, select_latents
from nl_rewrite.parallel.runner import RayOptions, RayRunner
from nl_rewrite.replacements.baselines import ZeroReplacement
from nl_rewrite.replacements.coders import TranscoderReplacement

from fakes import FakeBackend
from helpers import make_coder, make_windows

ray = pytest.importorskip("ray")
TOLERANCE = 1e-5
"""Ray against one process: the stated tolerance on floats (the same numbers up to summation order)."""
SAMPLING = SamplingConfig(n_train=6, n_heldout=4, n_negatives=4, n_bins=3)


@pytest.fixture(scope="module")
def cluster():
    """A fresh local cluster of 2 CPUs (never one `ray start` left running), its workers able to import the tests."""
    tests = str(Path(__file__).parent)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([tests, *filter(None, [os.environ.get("PYTHONPATH")])]))
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield RayRunner(RayOptions(workers=2, retries=2))
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    coder, windows = make_coder(), make_windows(n=60, window=10)
    folder = tmp_path_factory.mktemp("latents")
    cache = LatentCache.build(tiny, coder, windows, folder, shard_windows=12, batch_size=3, progress=False)
    return cache, coder, windows


def _square(_: None, x: int) -> int:
    return x * x


def test_ray_runner_reports_every_shard_once(cluster):
    seen: dict[int, int] = {}
    cluster.map(None, _square, list(range(7)), lambda i, r: seen.__setitem__(i, seen.get(i, 0) + r))
    assert seen == {i: i * i for i in range(7)}


def _slow_square(_: None, x: int) -> int:
    time.sleep(0.5)
    return x * x


def test_ray_kill_on_a_worker_mid_stage_loses_no_shard(cluster):
    """``ray.kill`` on a busy actor (restart allowed): Ray restarts it and re-runs the shard it held."""
    seen: dict[int, int] = {}

    def keep(index: int, result: int) -> None:
        if not seen:
            ray.kill(cluster.workers[0], no_restart=False)
        seen[index] = seen.get(index, 0) + result

    cluster.map(None, _slow_square, list(range(8)), keep)
    assert seen == {i: i * i for i in range(8)}


def _with_context(context: str, shard: int) -> str:
    import os

    return f"{context}{shard}@{os.getpid()}"


def test_workers_stay_from_stage_to_stage_and_each_stage_reads_its_own_context(cluster):
    """The second stage runs on the first one's worker processes (no new start-up) and sees its own context."""
    stages = {}
    with cluster:  # whoever makes a runner ends it: the workers stop with the block
        for context in ("a", "b"):
            got: dict[int, str] = {}
            cluster.map(context, _with_context, [0, 1, 2, 3], lambda i, r: got.__setitem__(i, r))
            stages[context] = got
    assert cluster.workers == []
    assert {i: r.split("@")[0] for i, r in stages["b"].items()} == {i: f"b{i}" for i in range(4)}
    pids = {context: {r.split("@")[1] for r in got.values()} for context, got in stages.items()}
    assert pids["b"] <= pids["a"], "the second stage started new worker processes"
    with pytest.raises(RuntimeError, match="between stages"), cluster:  # a run failing outside any stage
        cluster.map("c", _with_context, [0], lambda i, r: None)
        assert cluster.workers
        raise RuntimeError("between stages")
    assert cluster.workers == [], "a failure between stages left the workers holding their CPUs"


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], name: str) -> None:
    """Integers exactly; floats within TOLERANCE (workers run 1 torch thread, this process 2: sums differ in order)."""
    assert a.keys() == b.keys(), name
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], atol=TOLERANCE, rtol=TOLERANCE, equal_nan=True,
                                       msg=f"{name}: {key}")
        else:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"


def test_latent_cache_on_ray_matches_one_process(cluster, built, tiny, tmp_path):
    single, coder, windows = built
    cache = LatentCache.build(tiny, coder, windows, tmp_path / "ray", shard_windows=12, batch_size=3, progress=False,
                              runner=cluster)
    assert cache.shards_built == single.meta.n_shards == 5
    for i in range(5):
        name = f"shards/{i:05d}.safetensors"
        assert_same_tensors(load_file(single.folder / name), load_file(cache.folder / name), name)
    assert_same_tensors(load_file(single.folder / "stats.safetensors"), load_file(cache.folder / "stats.safetensors"),
                        "stats")


def test_a_rerun_on_ray_computes_only_missing_shards(cluster, built, tiny, tmp_path):
    single, coder, windows = built
    folder = tmp_path / "partial"
    LatentCache.build(tiny, coder, windows, folder, shard_windows=12, batch_size=3, progress=False)
    (folder / "shards" / "00002.safetensors").unlink()
    cache = LatentCache.build(tiny, coder, windows, folder, shard_windows=12, batch_size=3, progress=False,
                              runner=cluster)
    assert cache.shards_built == 1
    assert torch.equal(cache.dense_window(12), single.dense_window(12))


class CrashOnce(ZeroReplacement):
    """Zero ablation whose first use kills the worker process running it (a marker file says it happened)."""

    def __init__(self, site: str, marker: str, name: str = "zero") -> None:
        super().__init__(site, name=name)
        self.marker = marker

    def forward(self, x, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)  # the worker dies mid-shard, as a preempted node would
        return super().forward(x, batch)


def _conditions(tiny, coder):
    return [TranscoderReplacement(coder), ZeroReplacement("mlp_out.1", name="zero")]


def assert_same_results(a, b) -> None:
    assert a.conditions == b.conditions
    for name in a.conditions:
        for table in ("ce", "kl"):
            torch.testing.assert_close(torch.tensor(getattr(a, table)[name]), torch.tensor(getattr(b, table)[name]),
                                       atol=TOLERANCE, rtol=TOLERANCE)


def test_evaluation_on_ray_matches_one_process(cluster, built, tiny):
    _, coder, windows = built
    evaluator = Evaluator(tiny, windows, batch_size=2, progress=False)
    single = evaluator.run(_conditions(tiny, coder))
    sharded = evaluator.run(_conditions(tiny, coder), cluster)
    assert_same_results(sharded, single)
    gap, (lo, hi) = sharded.difference("zero", "transcoder", "kl")
    expect, (expect_lo, expect_hi) = single.difference("zero", "transcoder", "kl")
    assert (gap, lo, hi) == pytest.approx((expect, expect_lo, expect_hi), abs=TOLERANCE)  # same bootstrap


def test_evaluation_survives_a_killed_worker(cluster, built, tiny, tmp_path):
    _, coder, windows = built
    evaluator = Evaluator(tiny, windows, batch_size=2, progress=False)
    crash = CrashOnce("mlp_out.1", str(tmp_path / "crashed"))
    sharded = evaluator.run([TranscoderReplacement(coder), crash], cluster)
    single = evaluator.run(_conditions(tiny, coder))
    assert (tmp_path / "crashed").is_file()  # a worker really died
    assert_same_results(sharded, single)


class DiesOnceBackend(FakeBackend):
    """A fake LLM whose first chat kills its worker; pickles with its marker so every worker shares it."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (DiesOnceBackend, (self.marker,))

    def chat(self, requests):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().chat(requests)


def test_explain_and_score_on_ray_match_one_process_and_survive_a_kill(cluster, built, tmp_path):
    cache, _, _ = built
    latents = select_latents(cache, 6)
    cfg = ExplainConfig(batch_size=2)
    single = explain_latents(FakeBackend(), cache, latents, cfg, SAMPLING, tmp_path / "one.jsonl", progress=False)
    path = tmp_path / "ray.jsonl"
    explain_latents(FakeBackend(), cache, latents[:2], cfg, SAMPLING, path, progress=False)  # a run killed early
    backend = DiesOnceBackend(str(tmp_path / "died"))
    sharded = explain_latents(backend, cache, latents, cfg, SAMPLING, path, progress=False, runner=cluster)
    assert (tmp_path / "died").is_file()
    assert [r.text for r in sharded] == [r.text for r in single]
    lines = [json.loads(line)["latent"] for line in path.read_text().splitlines()]
    assert sorted(lines) == sorted(latents)  # every latent written exactly once, the early two reused
    scores = score_explanations(FakeBackend(), cache, sharded, ScoreConfig(), SAMPLING, tmp_path / "s.jsonl",
                                progress=False, runner=cluster)
    expect = score_explanations(FakeBackend(), cache, single, ScoreConfig(), SAMPLING, progress=False)
    assert [(s.latent, s.balanced_accuracy, s.auroc) for s in scores] == \
        [(s.latent, s.balanced_accuracy, s.auroc) for s in expect]


def test_simulation_on_ray_fills_the_same_store(cluster, built, tmp_path):
    cache, _, _ = built
    texts = {3: 'Fires on " a" (3).', 5: 'Fires on " e" (2), " t" (1).'}
    windows = {w: cache.token_strings(cache.window_tokens(w)) for w in range(6)}
    one = SimulationStore(tmp_path / "one", LexicalSimulator().identity)
    other = SimulationStore(tmp_path / "ray", LexicalSimulator().identity)
    simulate_into_store(LexicalSimulator(), one, texts, windows, chunk=2, progress=False)
    run = simulate_into_store(LexicalSimulator(), other, texts, windows, chunk=2, progress=False, runner=cluster)
    assert run.windows_simulated == 12
    for latent, text in texts.items():
        assert torch.equal(one.get(latent, text, windows), other.get(latent, text, windows))


def test_an_embedded_backend_pickles_as_its_recipe(tmp_path):
    from nl_rewrite.llm.cache import CachedBackend
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.model.loading import TINY_HF

    backend = CachedBackend(EmbeddedBackend(TINY_HF, batch_size=2), tmp_path / "calls.sqlite")
    copy = pickle.loads(pickle.dumps(backend))
    assert copy is not backend and copy.inner.model is not backend.inner.model  # its own model and connection
    assert (copy.backend_id, copy.path, copy.inner.batch_size) == (backend.backend_id, backend.path, 2)


def test_ray_without_ray_installed_says_how_to_install(monkeypatch):
    from nl_rewrite.parallel.runner import RayUnavailableError, connect

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=r"not installed.*\[ray\]"):
        connect("")


def test_an_openai_backend_pickles_as_its_recipe(monkeypatch):
    from nl_rewrite.llm.openai_backend import OpenAIBackend

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = OpenAIBackend("http://127.0.0.1:9/v1,http://127.0.0.1:10/v1", "m", "secret-key", concurrency=3,
                            score_mode="per_read")
    copy = pickle.loads(pickle.dumps(backend))
    assert copy is not backend and copy.calls is not backend.calls  # its own client
    assert (copy.base_url, copy.backend_id, copy.score_mode) == (backend.base_url, backend.backend_id, "per_read")
    assert b"secret-key" in pickle.dumps(backend)  # the worker's client authenticates like this one
    assert "secret-key" not in repr(copy) and "secret-key" not in str(vars(copy))


def test_the_plumbing_run_on_ray_resumes_and_matches_one_process(cluster, tiny_run, tmp_path, monkeypatch):
    """The shared plumbing run (``helpers.TINY_RUN``), copied with a latent-cache shard, the explanations, scores,
    eval simulations and the "all" and pool evaluations removed, finished by `nl-rewrite run --ray` (LLM calls
    answered by the run's cache): the same explanations and, within 1e-4, the same numbers."""
    from helpers import TINY_RUN
    from nl_rewrite.cli.main import main

    cluster.stop()  # the module's runner would hold both CPUs of the cluster the command's own runner needs
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out, out)
    # one of each sharded kind of stage (each unpickles its context on every worker): the eval simulations stand
    # for the explain split's (kept: the same explanations find them again), the "all" evaluation for the "last" one;
    # the pool's evaluation reads the eval simulations, so it reruns and shows whether they came back the same
    for lost in ["latents/shards/00000.safetensors", "explanations.jsonl", "scores.jsonl", "simulations/eval",
                 "eval_all.json", "eval_pool.json"]:
        shutil.rmtree(out / lost) if (out / lost).is_dir() else (out / lost).unlink()
    monkeypatch.setenv("NL_REWRITE_CACHE", str(tiny_run.cache))
    assert main(["run", *TINY_RUN, "--out", str(out), "--ray"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert {"latent_cache", "explain", "score", "simulate_eval", "evaluate_eval_all", "evaluate_eval_pool"} <= \
        set(data["stage_seconds"]), "every removed stage ran again"
    before = [json.loads(line)["text"] for line in (tiny_run.out / "explanations.jsonl").read_text().splitlines()]
    after = [json.loads(line)["text"] for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert sorted(after) == sorted(before)
    blocks = {"all": (tiny_run.results["modes"]["all"], data["modes"]["all"]),
              "pool": (tiny_run.results["pool_run"], data["pool_run"])}
    for block, (before_block, after_block) in blocks.items():
        expect, got = before_block["conditions"], after_block["conditions"]
        assert expect.keys() == got.keys()
        for name in expect:
            assert got[name]["mean_ce"] == pytest.approx(expect[name]["mean_ce"], abs=1e-4), (block, name)


def test_a_cache_opened_by_a_relative_path_reopens_from_another_directory(built, tmp_path, monkeypatch):
    """Ray workers run where the cluster started, not here: a cache travels as its absolute folder."""
    cache, _, _ = built
    monkeypatch.chdir(cache.folder.parent)
    relative = LatentCache.open(cache.folder.name)
    payload = pickle.dumps(relative)
    monkeypatch.chdir(tmp_path)
    assert pickle.loads(payload).folder == cache.folder.resolve()
