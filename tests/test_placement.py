"""--device and --dtype: parsed and checked on every command before any work, carried to the objects, and a
half-precision model evaluated with float32 statistics. CUDA itself is checked by benchmarks/gpu_check.py."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from helpers import make_coder, make_windows
from nl_rewrite.cli.main import COMMANDS, build_parser, command_name, main
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.evaluation.scoring import CleanPrediction, token_ce_and_kl
from nl_rewrite.model.loading import TINY_HF, load_model
from nl_rewrite.placement import DeviceError, Placement, module_device, resolve_device
from nl_rewrite.replacements import TranscoderReplacement, ZeroReplacement

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
COMMAND_NAMES = [command_name(module) for module in COMMANDS if not module.endswith("compare")]
"""Every command that runs a model (compare only merges result files)."""


def test_auto_is_cuda_where_torch_sees_it_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda0", "cuda:", "mps", ""])
def test_a_device_that_is_no_device_is_a_value_error(spec):
    with pytest.raises(ValueError, match="valid are auto, cpu, cuda and cuda:N"):
        resolve_device(spec)


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_the_fix(spec):
    with pytest.raises(DeviceError, match="sees no CUDA device; use --device cpu"):
        Placement(device=spec)


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_every_command_takes_device_and_dtype_and_they_reach_its_config(command):
    required = {"generate": ["--prompt", "The"]}.get(command, [])
    args = build_parser().parse_args([command, *required, "--device", "cpu", "--dtype", "bfloat16"])
    placements = [v for v in vars(args).values() if isinstance(v, Placement)]
    assert placements, f"nl-rewrite {command} parsed no Placement"
    assert all((p.device, p.dtype) == ("cpu", "bfloat16") for p in placements)
    assert all(p.placement == Placement("cpu", "bfloat16") for p in placements)


@NO_CUDA
def test_device_cuda_fails_while_parsing_with_the_message(capsys, real_model_loads):
    assert main(["run", "--preset", "smoke", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this torch" in err and "use --device cpu" in err and "Traceback" not in err
    assert not real_model_loads


def test_half_precision_on_the_cpu_warns_that_it_is_slower(caplog):
    caplog.set_level(logging.WARNING)
    Placement("cpu", "float32").warn_if_slow()
    assert not caplog.records
    Placement("cpu", "bfloat16").warn_if_slow()
    assert "slower than float32" in caplog.text and "--dtype float32" in caplog.text


def test_a_coder_on_another_device_than_the_model_is_an_error_naming_both(tiny):
    coder = make_coder().to("meta")  # a second device on a CPU-only machine
    with pytest.raises(DeviceError, match="the coder is on meta but the model .* is on cpu"):
        coder.check_fits(tiny)


def test_a_bfloat16_model_evaluates_close_to_float32_with_float32_statistics():
    """The tiny model in bfloat16: weights in bfloat16 on the device asked for, the coder in float32 beside it, the
    patched activations written back in bfloat16, and CE/KL accumulated in float32 within 0.05 nats of float32."""
    windows = make_windows(n=8, window=12)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(TINY_HF, Placement("cpu", dtype))
        coder = make_coder().to(module_device(model))
        coder.check_fits(model)
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
        assert module_device(model) == module_device(coder) == torch.device("cpu")
        reps = [ZeroReplacement("mlp_out.1"), TranscoderReplacement(coder, name="tc")]
        results[dtype] = Evaluator(model, windows, batch_size=4, progress=False, n_bootstrap=50).run(reps)
    fp32, bf16 = results["float32"], results["bfloat16"]
    for name in ("clean", "zero", "tc"):
        ce32, ce16 = (torch.tensor(r.ce[name]) for r in (fp32, bf16))
        assert torch.isfinite(ce16).all()
        assert (ce16 - ce32).abs().max() < 0.05, f"{name}: bfloat16 CE differs from float32 by more than 0.05"
    assert all(kl >= 0 for kl in bf16.kl["zero"])
    logits = torch.randn(2, 3, 97).to(torch.bfloat16)
    ce, kl = token_ce_and_kl(logits, CleanPrediction.of(torch.randn(2, 3, 97)), torch.zeros(2, 3, dtype=torch.long))
    assert ce.dtype == kl.dtype == torch.float32  # accumulated in float32 whatever the logits' dtype


def test_placement_is_a_run_option_but_the_device_keys_no_cached_result():
    from nl_rewrite.pipeline.config import RunConfig
    from nl_rewrite.pipeline.run_context import result_options

    cfg = RunConfig(device="cpu", dtype="bfloat16")
    assert cfg.placement == Placement("cpu", "bfloat16")
    options = result_options(cfg)
    assert "device" not in options and options["dtype"] == "bfloat16"
    assert result_options(dataclasses.replace(cfg, device="auto")) == options


@NO_CUDA
def test_the_gpu_check_reports_no_cuda_and_exits_0():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["benchmark"] == "gpu_check" and last["cuda"] is False and "no CUDA device" in last["reason"]


def test_ray_gpus_per_worker_reaches_the_ray_options(monkeypatch):
    from nl_rewrite.cli.ray_option import runner_from
    from nl_rewrite.parallel import runner

    monkeypatch.setattr(runner, "connect", lambda address: None)  # the runner's options, without starting Ray
    args = build_parser().parse_args(["evaluate", "--ray", "--ray-gpus-per-worker", "0.5", "--device", "cpu"])
    assert runner_from(args).options.gpus_per_worker == 0.5
    assert runner_from(build_parser().parse_args(["evaluate", "--ray"])).options.gpus_per_worker == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--ray", "--ray-gpus-per-worker", "-1"])


def tensors_in(obj, path: str = "", seen: set[int] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor reachable from ``obj`` through modules, dataclass fields, attributes, dicts and lists."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, torch.nn.Module):
        return [(f"{path}.{name}", t) for name, t in obj.state_dict(keep_vars=True).items()]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("nl_rewrite"):
        items = vars(obj).items()
    else:
        return []
    return [found for key, value in items for found in tensors_in(value, f"{path}.{key}", seen)]


def test_a_bfloat16_run_builds_its_objects_where_and_as_asked(tmp_path, monkeypatch):
    """The plumbing run's model, coder and explain latent cache built with --device cpu --dtype bfloat16: the model's
    floating tensors in bfloat16, the coder's in float32 on the model's device, every cached tensor on the CPU."""
    from helpers import TINY_RUN, empty_cache
    from nl_rewrite.parallel.runner import InProcess
    from nl_rewrite.pipeline.experiment import open_run

    monkeypatch.setenv("NL_REWRITE_CACHE", str(empty_cache(tmp_path / "cache")))
    # fewer training tokens and explain windows than the plumbing run: bfloat16 matmuls are slow on a CPU, and
    # where the objects are built does not depend on how many tokens went through them
    argv = ["run", *TINY_RUN, "--device", "cpu", "--dtype", "bfloat16", "--train-tokens", "2000",
            "--explain-windows", "32", "--out", str(tmp_path / "run")]
    ctx, _ = open_run(build_parser().parse_args(argv).cfg.resolved(), InProcess())
    model, coder, cache = tensors_in(ctx.model, "model"), tensors_in(ctx.coder, "coder"), tensors_in(ctx.cache, "cache")
    assert model and coder and cache
    assert {t.dtype for _, t in model if t.is_floating_point()} == {torch.bfloat16}
    assert {t.dtype for _, t in coder} == {torch.float32}
    wrong = [(p, t.device) for p, t in model + coder + cache if t.device != torch.device("cpu")]
    assert not wrong, f"tensors off the device asked for: {wrong}"
    assert module_device(ctx.coder) == module_device(ctx.model)


def test_what_another_dtype_computed_is_not_reused_as_float32s(tmp_path):
    """A latent cache built in bfloat16 is refused by a float32 build of the same folder (and named for it), and the
    embedded LLM's replies are cached under a bfloat16 key; float32 keeps the keys it always had."""
    from nl_rewrite.errors import NLRewriteError
    from nl_rewrite.latents.cache import LatentCache
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.model.loading import TINY_SMOLLM2

    windows, folder = make_windows(n=8, window=12), tmp_path / "latents"
    bf16 = load_model(TINY_HF, Placement("cpu", "bfloat16"))
    LatentCache.build(bf16, make_coder(), windows, folder, progress=False)
    with pytest.raises(NLRewriteError, match="dtype: folder has 'bfloat16', this build has 'float32'"):
        LatentCache.build(load_model(TINY_HF, Placement("cpu")), make_coder(), windows, folder, progress=False)
    assert EmbeddedBackend(TINY_SMOLLM2, placement=Placement("cpu")).backend_id == "embedded:tiny-smollm2"
    assert EmbeddedBackend(TINY_SMOLLM2, placement=Placement("cpu", "bfloat16")).backend_id == \
        "embedded:tiny-smollm2@bfloat16"
