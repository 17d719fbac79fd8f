"""The shared runner end to end on tiny models: every method, both families, and its guarantees."""

from __future__ import annotations

import json
import resource
from dataclasses import asdict

import pandas as pd
import pytest
import torch
from conftest import compose_config, read_metrics, run_overrides
from omegaconf import OmegaConf

from lozo_exp import runner as runner_module
from lozo_exp.config import ConfigError, RunConfig
from lozo_exp.data import DataUnavailable, sample_path
from lozo_exp.methods import METHODS
from lozo_exp.models import load_model, stand_in_tokenizer
from lozo_exp.runner import Runner, TrainingDiverged
from lozo_exp.tracking import MetricsLog

FAST = ("trainer.max_steps=6", "trainer.eval_steps=3", "trainer.log_steps=2")
TRAINED = ("mezo", "mezo-lora", "lozo", "lozo-m", "ft", "ft-lora")


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-roberta"])
@pytest.mark.parametrize("method", [*TRAINED, "zero-shot"])
def test_every_method_runs_end_to_end(tmp_path, model, method):
    results = run_overrides(tmp_path, f"model={model}", f"method={method}", *FAST)
    assert results["status"] == "completed"
    assert (results["model"], results["task"], results["method"]) == (model, "sst2", method)
    assert 0 <= results["test"]["accuracy"] <= 1 and 0 <= results["dev"]["accuracy"] <= 1
    assert results["peak_mem_mb"] > 0 and results["wall_time_s"] > 0
    records = read_metrics(tmp_path)
    train = [r for r in records if "loss" in r]
    dev = [r for r in records if r.get("split") == "dev"]
    if method == "zero-shot":
        assert results["steps"] == 0 and not train and len(dev) == 1
        return
    assert results["steps"] == 6 and [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in dev] == [3, 6]
    backprop = method in ("ft", "ft-lora")
    for r in train:
        assert {"step", "loss", "lr", "step_time_s", "mem_peak_mb"} <= set(r)
        assert ("projected_grad" in r) != backprop
        assert ("grad_norm" in r) == backprop  # the smoke FT recipe clips, as published
    assert all(r["dev_loss"] > 0 for r in dev)
    assert results["dev"]["accuracy"] == max(r["accuracy"] for r in dev)  # select_by=metric
    assert results["method_config"]["name"] == method
    assert ("rank" in results["method_config"]) == method.startswith("lozo")
    assert results["trainer_config"]["max_steps"] == 6 and results["model_config"]["name"] == model


def test_results_describe_the_run_without_hydra(tmp_path):
    """The run's config rebuilt from results.json alone is the config it ran with."""
    overrides = ("model=tiny-roberta", "method=lozo", "method.rank=3", "task.k=4", "seed=5", *FAST)
    results = run_overrides(tmp_path, *overrides)
    schema = RunConfig(method=METHODS[results["method"]].config())
    groups = {group: results[f"{group}_config"] for group in ("model", "task", "method", "trainer")}
    rebuilt = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(schema), {**groups, "seed": results["seed"]})
    )
    assert asdict(rebuilt) == asdict(compose_config(*overrides))
    assert (rebuilt.method.rank, rebuilt.task.k, rebuilt.seed) == (3, 4, 5)


def _params(runner: Runner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in runner.state.model.named_parameters()}


@pytest.mark.parametrize(
    "method, base_moves",
    [("mezo-lora", False), ("ft-lora", False), ("mezo", True), ("lozo", True), ("ft", True)],
)
def test_methods_move_the_right_parameters(tmp_path, method, base_moves):
    cfg = compose_config(f"method={method}", *FAST)
    runner = Runner(cfg, tmp_path)
    before = _params(runner)
    runner.train(MetricsLog(tmp_path, cfg.logger, "t", {}))
    after = _params(runner)
    lora = [n for n in after if "lora_" in n]
    base = [n for n in after if "lora_" not in n]
    assert bool(lora) == method.endswith("-lora")
    assert any(not torch.equal(before[n], after[n]) for n in (base if base_moves else lora))
    if not base_moves:
        assert all(torch.equal(before[n], after[n]) for n in base)


def test_lozo_changes_each_matrix_by_low_rank(tmp_path):
    cfg = compose_config(
        "model=tiny-roberta", "method=lozo", "method.rank=2", "trainer.max_steps=1"
    )
    runner = Runner(cfg, tmp_path)
    before = _params(runner)
    runner.train(MetricsLog(tmp_path, cfg.logger, "t", {}))
    for name, p in _params(runner).items():
        if p.dim() == 2 and min(p.shape) > 2:
            sv = torch.linalg.svdvals((p - before[name]).double())  # float32 rounding aside:
            assert sv[2] < 1e-3 * sv[0], name  # rank 2


@pytest.mark.parametrize(
    "select_by, accuracy, dev_loss",
    [
        ("metric", [0.5, 0.9, 0.9], [0.3, 0.5, 0.4]),  # highest accuracy; the tie keeps step 6
        ("loss", [0.9, 0.5, 0.7], [0.8, 0.6, 0.6]),  # lowest dev loss; the tie keeps step 6
    ],
)
def test_the_test_sets_are_evaluated_with_each_best_dev_state(
    tmp_path, monkeypatch, select_by, accuracy, dev_loss
):
    """No copy of the weights is kept: the test sets are evaluated when a dev evaluation
    becomes the best, with the same weights, and those of the last best are reported."""
    cfg = compose_config(
        "method=lozo",
        "trainer.max_steps=9",
        "trainer.eval_steps=3",
        f"trainer.select_by={select_by}",
    )
    runner = Runner(cfg, tmp_path)
    dev_params, tested = {}, []
    scores, losses = iter(accuracy), iter(dev_loss)
    real_evaluate = runner.adapter.evaluate

    def fake_evaluate(rows, batch_size):
        step = runner.state.step
        if rows is runner.splits.dev:
            dev_params[step] = _params(runner)
            return {"accuracy": next(scores)}
        assert all(torch.equal(p, dev_params[step][n]) for n, p in _params(runner).items())
        tested.append((step, real_evaluate(rows, batch_size)))
        return tested[-1][1]

    monkeypatch.setattr(runner.adapter, "evaluate", fake_evaluate)
    monkeypatch.setattr(runner.adapter, "dev_loss", lambda rows, batch_size: next(losses))
    results = runner.run()
    assert [step for step, _ in tested] == [3, 6]  # the first evaluation, then the better one
    assert results["best_step"] == 6 and results["select_by"] == select_by
    assert results["dev"] == {"accuracy": accuracy[1], "dev_loss": dev_loss[1]}
    assert results["test_sets"] == {"test": tested[1][1]} and results["test"] == tested[1][1]
    assert json.loads((tmp_path / "results.json").read_text())["best_step"] == 6
    assert not hasattr(runner.state, "best_params")


def test_big_models_are_built_on_their_device_not_in_host_memory(tmp_path, monkeypatch):
    """OPT-66B (132 GB in float16) built on the meta device: no weight ever exists in host
    memory. The runner builds on its own device (`trainer.device`), never on the host first."""
    cfg = compose_config("model=opt-66b", "model.random_init=true", "model.dtype=float16")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(cfg.model, stand_in_tokenizer("causal"), "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 65e9
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # < 1 GB (KB)
    devices = []

    def spy(model_cfg, tokenizer, device):
        devices.append(device)
        return load_model(model_cfg, tokenizer, device)

    monkeypatch.setattr(runner_module, "load_model", spy)
    runner = Runner(compose_config(*FAST), tmp_path)
    assert devices == [runner.device]


def test_linear_schedule_decays_the_logged_lr(tmp_path):
    run_overrides(tmp_path, "method=ft", "trainer.lr_schedule=linear", "method.lr=0.1", *FAST)
    lrs = [r["lr"] for r in read_metrics(tmp_path) if "lr" in r]
    assert lrs == pytest.approx([0.1 * (1 - s / 6) for s in (1, 3, 5)])  # lr of steps 2, 4, 6


def test_non_finite_loss_stops_and_keeps_the_log(tmp_path, monkeypatch):
    cfg = compose_config("method=lozo", "trainer.max_steps=20", "trainer.log_steps=2")
    runner = Runner(cfg, tmp_path)
    real_loss, calls = runner.adapter.loss, [0]

    def loss(batch):
        calls[0] += 1
        return real_loss(batch) * (float("nan") if calls[0] > 10 else 1.0)  # step 6 on

    monkeypatch.setattr(runner.adapter, "loss", loss)
    with pytest.raises(TrainingDiverged, match="became nan at step 6") as err:
        runner.run()
    assert f"(method lozo, lr {cfg.method.lr}, eps {cfg.method.eps}, model.dtype" in str(err.value)
    assert "a smaller method.lr, a method.eps the weights' precision resolves" in str(err.value)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged" and results["steps"] == 6
    logged = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]


def test_an_interrupted_run_still_writes_its_results(tmp_path, monkeypatch):
    runner = Runner(compose_config("method=mezo", *FAST), tmp_path)

    def interrupt(rows, batch_size):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.adapter, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["steps"] == 3
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [2]


def test_a_run_never_overwrites_another(tmp_path):
    run_overrides(tmp_path, *FAST)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_overrides(tmp_path, *FAST)


def _write(df: pd.DataFrame, path) -> None:
    if path.suffix == ".parquet":
        df.to_parquet(path)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)


def test_local_data_files_in_every_format(tmp_path):
    splits = {s: pd.read_json(sample_path("sst2", s), lines=True) for s in ("train", "validation")}
    for fmt in ("parquet", "csv", "jsonl"):
        for split, df in splits.items():
            _write(df, tmp_path / f"{split}.{fmt}")
        results = run_overrides(
            tmp_path / fmt,
            "task.source=hub",
            f"task.data_files.train={tmp_path / f'train.{fmt}'}",
            f"task.data_files.validation={tmp_path / f'validation.{fmt}'}",
            *FAST,
        )
        assert results["status"] == "completed"


def test_bad_input_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner_module, "load_model", no_model)
    with pytest.raises(DataUnavailable, match=r"task\.data_files\.train=/path/train\.parquet"):
        Runner(compose_config("model=opt-13b", "method=lozo"), tmp_path / "a")  # hub offline
    with pytest.raises(ConfigError, match=r"method\.rank=0"):
        Runner(compose_config("method=lozo", "method.rank=0"), tmp_path / "b")
    with pytest.raises(ConfigError, match="does not exist"):
        Runner(compose_config("task.data_files.train=/no/such.csv"), tmp_path / "c")
