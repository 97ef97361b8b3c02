"""The cost planner (nl_rewrite.pipeline.plan, ``--plan``): the paper's count, how counts scale, the simulation
alternatives, the JSON, and that planning does no LLM work."""

import json
import time

import pytest

from nl_rewrite.cli.main import main
from nl_rewrite.errors import LLMError
from nl_rewrite.interp.explain import ExplainConfig
from nl_rewrite.interp.score import ScoreConfig
from nl_rewrite.interp.simulate import SimulatorConfig
from nl_rewrite.llm.base import ChatRequest
from nl_rewrite.pipeline import plan as planner
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.plan import (PromptOnlyBackend, PromptSizes, Throughput, ThroughputOptions, count_text,
                                      plan_run, plan_text)

PROMPTS = PromptSizes(explain=5000, score=140, paper_last=400, paper_every_position=12000, all_at_once=600,
                      source="fixed for the test")
THROUGHPUT = Throughput(38 * 400, 1000, "fixed for the test: 38 paper-protocol calls/s")
REMOTE = "openai:no-such-model@http://127.0.0.1:9/v1"
"""A remote spec with no local tokenizer: planning with it loads nothing, and any real call would fail."""


def paper_cfg(**overrides) -> RunConfig:
    return RunConfig(**{"preset": "paper", "width": 32768, "simulator": SimulatorConfig(mode="paper"), **overrides})


def alternative(plan, mode: str):
    return next(s for s in plan.alternatives if s.stage == f"simulate_eval[{mode}]")


def stage(plan, name: str):
    return next(s for s in plan.stages if s.stage == name)


def test_paper_protocol_reproduces_the_papers_count_and_time():
    plan = plan_run(paper_cfg(), PROMPTS, THROUGHPUT)
    paper = alternative(plan, "paper_last")
    assert paper.predictions == paper.llm_calls == 32768 * 1000
    assert abs(paper.predictions - 3.3e7) / 3.3e7 < 0.02
    assert paper.seconds / planner.SECONDS_PER_DAY == pytest.approx(3.3e7 / 38 / 86400, rel=0.02)  # ~10 days
    assert "32,768,000 predictions (3.28e7" in plan_text(plan)


def test_counts_scale_linearly_with_latents_and_windows():
    base = plan_run(paper_cfg(), PROMPTS, THROUGHPUT)
    wider = plan_run(paper_cfg(width=65536), PROMPTS, THROUGHPUT)
    longer = plan_run(paper_cfg(eval_windows=2000, llm_eval_windows=2000), PROMPTS, THROUGHPUT)
    for name in ("simulate_eval", "score", "explain"):
        assert stage(wider, name).llm_calls == 2 * stage(base, name).llm_calls
        assert stage(wider, name).prompt_tokens == 2 * stage(base, name).prompt_tokens
    assert stage(longer, "simulate_eval").predictions == 2 * stage(base, "simulate_eval").predictions
    assert stage(longer, "score").llm_calls == stage(base, "score").llm_calls  # scoring does not read eval windows


def test_alternatives_side_by_side():
    plan = plan_run(paper_cfg(), PROMPTS, THROUGHPUT)
    paper_last, paper, aao, trained = (alternative(plan, m) for m in ("paper_last", "paper", "all_at_once", "trained"))
    window = 32
    assert aao.llm_calls == paper_last.llm_calls and aao.predictions == window * paper_last.predictions
    assert paper.llm_calls == paper.predictions == window * paper_last.llm_calls  # one prompt per position
    assert trained.llm_calls == 0 and trained.predictions == aao.predictions
    assert trained.forward_passes == 32768 * 16  # ceil(1000 / 64) passes per latent
    assert trained.forward_passes < aao.llm_calls / window
    run_stage = stage(plan, "simulate_eval")  # the run's own mode: the paper mode as implemented
    assert (run_stage.llm_calls, run_stage.predictions) == (paper.llm_calls, paper.predictions)


def test_the_runs_mode_decides_the_simulate_stages():
    plan = plan_run(RunConfig(preset="paper", width=4096), PROMPTS, THROUGHPUT)  # all_at_once by default
    assert stage(plan, "simulate_eval").llm_calls == 4096 * 1000
    assert stage(plan, "simulate_explain").items == 4096 * 64
    assert plan.totals().llm_calls == sum(s.llm_calls for s in plan.stages)


def test_pool_limits_the_llm_stages():
    plan = plan_run(RunConfig(preset="default"), PROMPTS, THROUGHPUT)
    assert stage(plan, "explain").llm_calls == 6
    assert stage(plan, "score").llm_calls == 6 * (4 + 4)
    assert stage(plan, "simulate_eval").items == 6 * 24


def test_unknown_counts_are_said_in_words():
    plan = planner.plan_cache(None, 32)
    text = plan_text(plan)
    assert "unknown" in text and "not estimated" in text and "nothing to time" in text
    assert plan.to_json()["totals"]["forward_passes"] is None


def test_prompt_only_backend_renders_but_refuses_llm_work():
    tokenizer = planner.prompt_tokenizer(REMOTE)
    backend = PromptOnlyBackend(tokenizer)
    assert "hello" in backend.chat_prompt(ChatRequest((("user", "hello"),)))
    with pytest.raises(LLMError):
        backend.chat([ChatRequest((("user", "hello"),))])
    with pytest.raises(LLMError):
        backend.score([])


def test_prompt_sizes_come_from_the_real_prompt_builders():
    tokenizer = planner.prompt_tokenizer(REMOTE)
    sizes = planner.measure_prompts(tokenizer, 32, 40, ExplainConfig(), ScoreConfig())
    assert "characters per token" in sizes.source
    assert sizes.paper_last < sizes.all_at_once < sizes.paper_every_position
    assert sizes.explain > 10 * sizes.score  # 40 marked examples against one window


def test_remote_backends_use_the_stated_paper_assumption():
    tokenizer = planner.prompt_tokenizer(REMOTE)
    throughput = planner.choose_throughput(REMOTE, PROMPTS, tokenizer, 32, ThroughputOptions())
    assert throughput.prompt_tokens_per_second == 38 * PROMPTS.paper_last
    assert "Paulo & Belrose" in throughput.source
    given = planner.choose_throughput(REMOTE, PROMPTS, tokenizer, 32, ThroughputOptions(calls_per_second=100))
    assert given.prompt_tokens_per_second == 100 * PROMPTS.paper_last and "given" in given.source


class CountingBackend:
    backend_id = "counting"

    def __init__(self):
        self.requests = 0

    def score(self, requests):
        import torch

        self.requests += len(requests)
        time.sleep(0.01)
        return [torch.zeros(1, 10) for _ in requests]

    def chat(self, requests):
        self.requests += len(requests)
        return ["one two three" for _ in requests]


def test_the_probe_is_bounded_and_measures(monkeypatch):
    import nl_rewrite.llm.factory as factory

    fake = CountingBackend()
    monkeypatch.setattr(factory, "make_backend", lambda spec, cache=None: fake)
    tokenizer = planner.prompt_tokenizer(REMOTE)
    start = time.perf_counter()
    throughput = planner.choose_throughput("embedded", PROMPTS, tokenizer, 32, ThroughputOptions(probe_seconds=0.2))
    assert time.perf_counter() - start < 2
    assert "measured by a probe" in throughput.source and throughput.prompt_tokens_per_second > 0
    assert 2 <= fake.requests < 100
    skipped = planner.choose_throughput("embedded", PROMPTS, tokenizer, 32, ThroughputOptions(probe=False))
    assert "assumed" in skipped.source


def table_row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.split() and line.split()[0] == name)
    return line.split()


def test_cli_run_plan_prints_the_papers_count_and_writes_the_same_json(tmp_cache, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--preset", "paper", "--width", "32768", "--simulator.mode", "paper", "--plan", "--no-probe",
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "32,768 latents × 1,000 eval windows = 32,768,000 predictions (3.28e7; the paper: ~3.3e7)" in text
    data = json.loads((out / "plan.json").read_text())
    paper = next(s for s in data["simulation_alternatives"] if s["stage"] == "simulate_eval[paper_last]")
    assert paper["predictions"] == 32_768_000
    for s in data["stages"] + data["simulation_alternatives"]:
        printed = table_row(text, s["stage"])
        assert printed[1:8] == [count_text(s[k]) for k in planner.COUNT_FIELDS]
    assert not (tmp_cache / "llm_calls.sqlite").exists()  # no LLM call was made or cached
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]  # nothing of a run was started


def test_cli_stage_commands_plan_their_own_stage(tmp_path, capsys):
    explanations = tmp_path / "explanations.jsonl"
    record = {"latent": 3, "text": "money words", "ok": True, "prompt": "", "examples": []}
    explanations.write_text(json.dumps(record) + "\n" + json.dumps({**record, "latent": 4, "ok": False}) + "\n")
    assert main(["score", "--plan", "--no-probe", "--backend", REMOTE, "--explanations", str(explanations),
                 "--plan-json", str(tmp_path / "score.json")]) == 0
    score = json.loads((tmp_path / "score.json").read_text())
    assert [s["stage"] for s in score["stages"]] == ["score"] and score["stages"][0]["llm_calls"] == 1 * (20 + 20)
    assert main(["explain", "--plan", "--no-probe", "--backend", REMOTE, "--latents", "7",
                 "--plan-json", str(tmp_path / "explain.json")]) == 0
    assert json.loads((tmp_path / "explain.json").read_text())["stages"][0]["llm_calls"] == 7
    assert main(["evaluate", "--plan", "--suite", "smoke", "--out", str(tmp_path / "ev")]) == 0
    evaluate = json.loads((tmp_path / "ev" / "plan.json").read_text())
    assert evaluate["stages"][0]["forward_tokens"] == 2 * 2 * 3 * 6 * 16  # splits × positions × (clean+2) × windows
    assert main(["cache", "--plan", "--max-windows", "100", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "plan.json").read_text())["stages"][0]["forward_tokens"] == 100 * 32
    assert "no LLM work done" in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["smoke", "default", "paper"])
def test_the_planner_counts_the_declared_conditions_of_every_preset(preset):
    from nl_rewrite.pipeline.main_arm import main_planned
    from nl_rewrite.pipeline.pool_arm import pool_planned

    cfg = RunConfig(preset=preset).resolved()
    main_list = main_planned(cfg)
    pool_list = pool_planned(cfg, planner.pool_size(cfg) / cfg.width)
    assert planner.main_condition_count(cfg) == len(main_list)
    assert planner.pool_condition_count(cfg) == len(pool_list)
    for planned in (main_list, pool_list):
        names = [p.name for p in planned]
        assert len(set(names)) == len(names), names
    evaluate = next(s for s in plan_run(cfg, PROMPTS, THROUGHPUT).stages if s.stage == "evaluate")
    assert f"{len(main_list)} conditions" in evaluate.what


def test_a_run_evaluates_and_reports_exactly_the_declared_conditions(tiny_run):
    """The shared tiny run: what it evaluated, what results.json holds and the rows of results.csv are the declared
    lists, in order, with nothing added or lost."""
    import csv

    from nl_rewrite.pipeline.main_arm import main_planned
    from nl_rewrite.pipeline.pool_arm import pool_planned

    cfg = RunConfig.from_toml(tiny_run.out / "config.toml")
    data = tiny_run.results
    main_names = [p.name for p in main_planned(cfg)]
    pool_names = [p.name for p in pool_planned(cfg, data["pool"]["size"] / cfg.width)]
    for mode in ("all", "last"):
        assert list(data["modes"][mode]["conditions"]) == ["clean", *main_names], mode
    assert list(data["conditions_info"]) == main_names
    assert list(data["pool_run"]["conditions_info"]) == pool_names
    with open(tiny_run.out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    for mode in ("all", "last"):
        assert [r["condition"] for r in rows if r["run"] == f"eval_{mode}"] == ["clean", *main_names], mode
    assert [r["condition"] for r in rows if r["run"] == "eval_pool"] == ["clean", *pool_names]
