"""`nl-rewrite run`'s configuration: presets (None = the preset's in Python, the defaults on the command line), nested
stage configs, choices checked while parsing, TOML files (--config) and the resolved config a run writes
(docs/configuration.md)."""

from __future__ import annotations

import dataclasses
import tomllib
import typing

import pytest

from nl_rewrite.cli.main import COMMANDS, build_parser, main
from nl_rewrite.coders.train import DEFAULT_LAYER
from nl_rewrite.evaluation.evaluator import POSITION_MODES
from nl_rewrite.interp.calibrate import CALIBRATIONS
from nl_rewrite.interp.explain import ExplainConfig
from nl_rewrite.interp.score import ScoreConfig
from nl_rewrite.interp.simulate import SimulatorConfig
from nl_rewrite.latents.sampling import SamplingConfig
from nl_rewrite.model.sites import SITE_HOOKS, SiteKind
from nl_rewrite.pipeline.config import PRESETS, STAGE_PRESETS, Calibration, PositionMode, RunConfig

# What each preset resolved to before the configs were nested, in the flat names of then (RunConfig after its
# __post_init__, the layer run_experiment set, and the stage configs run_experiment built from it).
BEFORE_COMMON = dict(model="smollm2-135m", layer=10, out="runs/nl_rewrite", llm="embedded", simulator_mode="all_at_once",
                     calibrations=("linear", "quantile", "isotonic"), order="explanation_score", pool_selection="mass",
                     lexical_budget=12, lexical_budgets=(3, 6, 12, 24), noise_targets=(0.9, 0.7, 0.5, 0.3),
                     sweep_fractions=(0.01, 0.1, 0.5), window=32, seed=0, batch_size=8,
                     coder="transcoder", sae_site="resid_post",  # added with the SAE runs; defaults keep the old run
                     trained_simulator="none", trained_eval_windows=8, trained_calib_windows=16,  # off by default
                     device="auto", dtype="float32")  # --device/--dtype: CUDA where it exists, float32 as before
BEFORE = {
    "smoke": dict(coder_checkpoint="small", train_tokens=16_000, width=1024, pool=2, explain_windows=96,
                  calib_windows=4, eval_windows=8, llm_eval_windows=4, lexical_calib_windows=16, fractions=(1.0,),
                  position_modes=("all", "last"), n_train_examples=6, n_heldout=3, n_negatives=3, explain_max_tokens=24),
    "default": dict(coder_checkpoint="default", train_tokens=0, width=4096, pool=6, explain_windows=768,
                    calib_windows=6, eval_windows=128, llm_eval_windows=24, lexical_calib_windows=128,
                    fractions=(0.5, 1.0), position_modes=("all",), n_train_examples=10, n_heldout=4, n_negatives=4,
                    explain_max_tokens=32),
    "paper": dict(coder_checkpoint="default", train_tokens=0, width=4096, pool=0, explain_windows=20_000,
                  calib_windows=64, eval_windows=1000, llm_eval_windows=1000, lexical_calib_windows=1000,
                  fractions=(0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0), position_modes=("all", "last"),
                  n_train_examples=40, n_heldout=20, n_negatives=20, explain_max_tokens=120),
}


def flat_view(cfg: RunConfig) -> dict:
    """A resolved config in the flat names the presets used before nesting."""
    r = cfg.resolved()
    flat = {k: v for k, v in dataclasses.asdict(r).items() if k not in ("preset", "sampling", "explain", "score",
                                                                         "simulator", "trained")}
    return {**flat, "simulator_mode": r.simulator.mode, "n_train_examples": r.sampling.n_train,
            "n_heldout": r.sampling.n_heldout, "n_negatives": r.sampling.n_negatives,
            "explain_max_tokens": r.explain.max_tokens}


def parse(*argv: str) -> RunConfig:
    return build_parser().parse_args(["run", *argv]).cfg


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_resolve_to_the_same_settings_as_before(preset):
    before = {**BEFORE_COMMON, **BEFORE[preset]}
    cfg = RunConfig(preset=preset)
    assert flat_view(cfg) == before
    assert parse("--preset", preset) == cfg.resolved(), "the CLI's defaults are the resolved preset"
    resolved = cfg.resolved()
    assert resolved.sampling_config() == SamplingConfig(n_train=before["n_train_examples"], n_heldout=before["n_heldout"],
                                                        n_negatives=before["n_negatives"], seed=0)
    assert resolved.explain_config() == ExplainConfig(max_tokens=before["explain_max_tokens"])
    assert resolved.score == ScoreConfig() and resolved.simulator == SimulatorConfig()
    assert (SimulatorConfig().placeholder, SimulatorConfig().requests_per_call) == ("0", 64)  # Simulator's defaults


def test_none_means_the_preset_and_explicit_values_win():
    cfg = RunConfig(preset="smoke", eval_windows=6, seed=3)
    assert cfg.eval_windows == 6 and cfg.calib_windows is None and cfg.layer is None
    assert cfg.sampling is None and cfg.explain is None
    r = cfg.resolved()
    assert (r.eval_windows, r.calib_windows, r.layer, r.coder_checkpoint) == (6, 4, DEFAULT_LAYER, "small")
    assert r.sampling == SamplingConfig(n_train=6, n_heldout=3, n_negatives=3, seed=3), "the preset's, seeded by the run"
    assert r.explain == ExplainConfig(max_tokens=24)
    assert r.llm_eval_windows == 4 and RunConfig(preset="smoke", eval_windows=2).resolved().llm_eval_windows == 2
    assert r.is_resolved and not cfg.is_resolved and r.resolved() == r
    # a stage config given is used whole: the preset fills in only what is left None
    own = dataclasses.replace(r.sampling, n_train=5)
    assert RunConfig(preset="smoke", sampling=own).resolved().sampling is own
    assert RunConfig(preset="paper", explain=ExplainConfig(max_tokens=7)).resolved().explain.max_tokens == 7


def test_configs_are_frozen_and_resolving_makes_a_new_one():
    cfg = RunConfig(preset="smoke")
    resolved = cfg.resolved()
    assert resolved is not cfg and cfg.eval_windows is None and cfg.sampling is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.sampling.n_train = 3  # type: ignore[misc]


def test_every_preset_key_is_an_option_left_to_the_preset():
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    none_default = {name for name, f in fields.items() if f.default is None} - {"layer"}
    for preset, values in PRESETS.items():
        top = {k for k in values if k not in STAGE_PRESETS}
        assert top | set(STAGE_PRESETS) == none_default, preset
        SamplingConfig(**values["sampling"]), ExplainConfig(**values["explain"])  # keys of the stage configs


def test_literal_types_match_the_runtime_lists():
    assert typing.get_args(PositionMode) == POSITION_MODES
    assert typing.get_args(Calibration) == CALIBRATIONS
    assert set(typing.get_args(SiteKind)) == set(SITE_HOOKS)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_help_shows_the_chosen_presets_values(preset, capsys):
    assert main(["run", "--preset", preset, "--seed", "5", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    values = PRESETS[preset]
    assert f"--eval-windows int, --eval_windows int eval-split windows evaluated " \
           f"(default: {values['eval_windows']})" in text
    assert "(default: -1)" not in text and "(default: None)" not in text
    assert f"--explain.max-tokens int, --explain.max_tokens int reply length limit in tokens " \
           f"(default: {values['explain']['max_tokens']})" in text, "a nested option, with its field's docstring"
    assert "--sampling.seed int sampling seed (combined with the latent id) (default: 5)" in text, "the run's --seed"


def test_every_stage_option_is_an_option_of_run(capsys):
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for table, cls in (("sampling", SamplingConfig), ("explain", ExplainConfig), ("score", ScoreConfig),
                       ("simulator", SimulatorConfig)):
        for f in dataclasses.fields(cls):
            assert f"--{table}.{f.name}" in text, (table, f.name)


def test_nested_and_top_level_flags_reach_the_config():
    cfg = parse("--preset", "smoke", "--explain.max_tokens", "16", "--sampling.n_train", "5", "--sampling.n-heldout",
                "2", "--score.batch_size", "8", "--simulator.mode", "paper", "--simulator.requests-per-call", "7",
                "--explain.retry-temperatures", "0.5", "--explain.variant", "contrastive", "--eval-windows", "6",
                "--eval_windows", "5", "--llm", "openai:m@http://h/v1", "--out", "somewhere")
    assert (cfg.explain.max_tokens, cfg.explain.retry_temperatures, cfg.explain.variant) == (16, (0.5,), "contrastive")
    assert (cfg.sampling.n_train, cfg.sampling.n_heldout, cfg.score.batch_size) == (5, 2, 8)
    assert cfg.simulator == SimulatorConfig(mode="paper", requests_per_call=7)
    assert (cfg.eval_windows, cfg.llm, cfg.out) == (5, "openai:m@http://h/v1", "somewhere")  # the last one wins
    r = cfg.resolved()
    assert r.sampling_config().n_train == 5 and r.explain_config().max_tokens == 16


def test_list_options_take_several_values_or_repeat():
    assert parse("--fractions", "0.5", "1").fractions == (0.5, 1.0)
    assert parse("--fractions", "0.5", "--fractions", "1").fractions == (0.5, 1.0)
    assert parse("--position-modes", "last", "all").position_modes == ("last", "all")
    assert parse("--calibrations", "linear", "isotonic").calibrations == ("linear", "isotonic")
    assert build_parser().parse_args(["evaluate", "--replacement", "zero", "--replacement", "mean"]).cfg.replacement \
        == ("zero", "mean")


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: options must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    import nl_rewrite.model.loading
    import nl_rewrite.pipeline.experiment
    import nl_rewrite.pipeline.run_context

    monkeypatch.setattr(nl_rewrite.model.loading, "load_model", refuse)
    monkeypatch.setattr(nl_rewrite.pipeline.experiment, "load_model", refuse)
    monkeypatch.setattr(nl_rewrite.pipeline.run_context, "load_model", refuse)


@pytest.mark.parametrize("argv", [
    ["run", "--preset", "huge"], ["run", "--simulator.mode", "token_by_token"], ["run", "--order", "best"],
    ["run", "--position-modes", "all", "first"], ["run", "--calibrations", "linear", "spline"],
    ["run", "--pool-selection", "largest"], ["run", "--explain.variant", "short"],
    ["run", "--sampling.train-source", "bottom"], ["generate", "--prompt", "x", "--order", "best"],
    ["evaluate", "--split", "test"], ["evaluate", "--positions", "first"], ["layers", "--split", "test"],
    ["cache", "--split", "test"], ["train", "--kind", "mlp"], ["train", "--skip", "maybe"],
    ["train", "--sae-site", "mlp_mid"], ["explain", "--select", "best"], ["explain", "--variant", "short"],
    ["explain", "--train-source", "bottom"],
])
def test_choices_are_refused_while_parsing(argv, no_model, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["run", "--eval-windows", "0"], "eval_windows must be at least 1"),
    (["run", "--fractions", "2"], "fractions must lie in [0, 1]"),
    (["run", "--preset", "smoke", "--lexical-calib-windows", "200"], "must be fewer than explain_windows"),
    (["run", "--explain.threshold", "2"], "threshold must be in (0, 1]"),
    (["run", "--sampling.n-train", "0"], "n_train must be >= 1"),
    (["run", "--simulator.placeholder", "\t"], "placeholder must not contain"),
    (["run", "--score.yes", " No"], "yes and .no must differ"),
    (["evaluate", "--replacement", "half"], "unknown replacement"),
    (["explain", "--latents", "0"], "--latents must be >= 1"),
])
def test_invalid_values_are_usage_errors_before_any_model(argv, message, no_model, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---- TOML files ------------------------------------------------------------------------------------------------

RUN_TOML = """
preset = "smoke"
eval_windows = 6
fractions = [0.5, 1]

[explain]
max_tokens = 16

[sampling]
n_train = 5
"""


def test_config_file_sets_options_and_flags_override_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN_TOML)
    from_file = parse("--config", str(path))
    assert from_file == RunConfig.from_toml(path).resolved()
    assert (from_file.preset, from_file.eval_windows, from_file.fractions) == ("smoke", 6, (0.5, 1.0))
    smoke = PRESETS["smoke"]
    assert from_file.explain == ExplainConfig(max_tokens=16), "a table sets keys of the preset's stage config"
    assert from_file.sampling == SamplingConfig(**{**smoke["sampling"], "n_train": 5})
    both = parse("--eval-windows", "7", "--config", str(path), "--explain.max-tokens", "20", "--preset", "default")
    assert (both.preset, both.eval_windows, both.explain.max_tokens, both.sampling.n_train) == ("default", 7, 20, 5)
    assert (both.calib_windows, both.fractions) == (PRESETS["default"]["calib_windows"], (0.5, 1.0)), \
        "the file's values, then --preset's for the rest"


def test_the_command_line_overrides_the_file_which_overrides_the_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "smoke"\neval_windows = 6\ncalib_windows = 3\n')
    cfg = parse("--config", str(path), "--calib-windows", "2")
    assert (cfg.calib_windows, cfg.eval_windows, cfg.explain_windows) == (2, 6, PRESETS["smoke"]["explain_windows"])
    assert cfg.sampling == SamplingConfig(**PRESETS["smoke"]["sampling"], seed=0)
    assert parse("--seed", "4", "--sampling.n-train", "2").sampling == \
        SamplingConfig(**{**PRESETS["default"]["sampling"], "n_train": 2}, seed=4), "the preset's, seeded by --seed"


def test_a_file_may_rely_on_the_command_line_to_be_valid(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('preset = "smoke"\nlexical_calib_windows = 200\n')  # smoke explains on 96 windows
    cfg = parse("--config", str(path), "--explain-windows", "300")
    assert (cfg.lexical_calib_windows, cfg.explain_windows) == (200, 300)
    assert main(["run", "--config", str(path), "--help"]) == 0, "--help reads a file that is valid only with flags"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse("--config", str(path))
    assert "must be fewer than explain_windows" in capsys.readouterr().err


def test_the_resolved_config_round_trips_through_its_toml_file(tmp_path):
    cfg = parse("--preset", "smoke", "--explain.max-tokens", "20", "--fractions", "0.5", "1", "--simulator.mode",
                "paper", "--out", str(tmp_path / "run"), "--sampling.n-bins", "3").resolved()
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.from_toml(path) == cfg
    assert parse("--config", str(path)) == cfg
    assert parse("--config", str(path)).resolved() == cfg
    assert tomllib.loads(cfg.to_toml()) == tomllib.loads(path.read_text())


def test_run_experiment_writes_its_resolved_config_first(tmp_path, monkeypatch):
    import nl_rewrite.pipeline.experiment as experiment

    def stop(*args, **kwargs):
        raise RuntimeError("stop before the model")

    monkeypatch.setattr(experiment, "load_model", stop)
    cfg = RunConfig(preset="smoke", out=str(tmp_path / "run"), explain=ExplainConfig(max_tokens=20))
    with pytest.raises(RuntimeError, match="stop before the model"):
        experiment.run_experiment(cfg)
    assert cfg.layer is None and cfg.eval_windows is None, "the caller's config is never changed"
    written = tmp_path / "run" / experiment.CONFIG_FILE
    assert RunConfig.from_toml(written) == cfg.resolved()
    assert parse("--config", str(written)).resolved() == cfg.resolved()


@pytest.mark.parametrize("text,message", [
    ("n_train_examples = 6",
     "unknown key 'n_train_examples'; valid keys at the top level: device, dtype, preset, model, layer"),
    ("[explain]\nmax_tokenz = 3", "unknown key 'explain.max_tokenz'; valid keys at table [explain]: variant"),
    ("[sampler]\nn_train = 3", "unknown key 'sampler'"),
    ('transcoder = "small"', "key 'transcoder' was renamed 'coder_checkpoint': rename it in the file"),
    ('eval_windows = "many"', "eval_windows: Input should be a valid integer, got 'many' (str)"),
    ("eval_windows = true", "eval_windows: Input should be a valid integer, got True (bool)"),
    ('preset = "huge"', "preset: Input should be 'smoke', 'default' or 'paper', got 'huge'"),
    ('position_modes = ["all", "first"]', "position_modes[1]: Input should be 'all' or 'last', got 'first'"),
    ("[sampling]\nn_train = 1.5", "sampling.n_train: Input should be a valid integer, got 1.5"),
    ("explain = 3", "explain: Input should be a table, got 3 (int)"),
    ("fractions = 0.5", "fractions: Input should be a valid array, got 0.5"),
    ("eval_windows = 0", "eval_windows must be at least 1"),
    ("[explain]\nthreshold = 2.0", "explain: Value error, ExplainConfig.threshold must be in (0, 1], got 2.0"),
    ("fractions = [1, 0.5, true]", "fractions[2]: Input should be a valid number, got True (bool)"),
    ("eval_windows = ", "is not valid TOML"),
    ('coder_checkpoint = "small"\ntrain_tokens = 0', "give --train-tokens and --width of at least 1"),
])
def test_config_file_errors_name_the_key(tmp_path, capsys, no_model, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with pytest.raises(ValueError, match="."):
        RunConfig.from_toml(path)


@pytest.mark.parametrize("option", ["--transcoder", "--transcoder=small"])
def test_a_renamed_option_on_the_command_line_names_its_new_name(option, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", option] + ([] if "=" in option else ["small"]))
    assert exc.value.code == 2 and "--transcoder was renamed --coder-checkpoint" in capsys.readouterr().err

def test_a_missing_config_file_is_a_usage_error(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nowhere.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_run_without_all_positions_is_refused_before_it_starts(capsys):
    from nl_rewrite.cli.main import main

    assert main(["run", "--preset", "smoke", "--position-modes", "last"]) == 2
    assert "position_modes must include 'all'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--layer"], ["--eval-windows"], ["evaluate", "--suite"]])
def test_an_optional_option_needs_its_value(argv, capsys):
    """A bare ``--layer`` is an error, not None (parsed only: nothing runs even if it were accepted)."""
    command = ["run", *argv] if argv[0] != "evaluate" else argv
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(command)
    assert exc.value.code == 2 and "expected one argument" in capsys.readouterr().err


def test_a_renamed_option_keys_cached_results_under_its_old_name():
    """A run finished before ``transcoder`` became ``coder_checkpoint`` reruns from its cached results."""
    from nl_rewrite.pipeline.run_context import result_options

    options = result_options(RunConfig(coder_checkpoint="small", train_tokens=1000))
    assert options["transcoder"] == "small" and "coder_checkpoint" not in options


def test_a_named_subcommand_imports_only_its_own_module(monkeypatch):
    """`nl-rewrite train` (every torchrun worker) must not pay for the run pipeline's imports; --help lists them all."""
    import importlib

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    build_parser(["-v", "train", "--help"])
    assert [name for name in imported if name in COMMANDS] == ["nl_rewrite.cli.train"]
    for argv in (["--help"], ["--help", "train"]):
        imported.clear()
        build_parser(argv)
        assert [name for name in imported if name in COMMANDS] == COMMANDS, argv
