"""What the memory table needs from the runner: a run that cannot fit its GPU is refused before
the model is built (and the report says it does not fit), parameters counted without
allocating, random-init models built directly on their device."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import compose_config, run_overrides

from lozo_exp import report
from lozo_exp import runner as runner_module
from lozo_exp.methods import build_method
from lozo_exp.models import load_model, load_tokenizer, parameter_count
from lozo_exp.runner import DoesNotFit, check_fits

H200 = int(139.81 * 2**30)  # what torch reports for one H200


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-roberta", "opt-125m"])
def test_parameters_are_counted_without_building_the_model(model):
    cfg = compose_config(f"model={model}", "model.random_init=true").model
    tokenizer = load_tokenizer(cfg)
    built = load_model(cfg, tokenizer, torch.device("meta"))  # built where asked: no memory
    assert {p.device.type for p in built.parameters()} == {"meta"}
    assert parameter_count(cfg, tokenizer) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize(
    "method, dtype, fits_13b, floor_gib_13b",
    [
        ("mezo", "float16", True, 23.9),  # the weights
        ("lozo-m", "float16", True, 23.9),
        ("zero-shot", "float16", True, 23.9),
        ("ft-lora", "float32", True, 47.9),  # the frozen float32 weights (fp16 autocast)
        ("ft", "float32", False, 191.5),  # + gradients and AdamW's two moments
    ],
)
def test_the_memory_floor_is_the_weights_plus_what_the_method_keeps(
    method, dtype, fits_13b, floor_gib_13b
):
    cfg = compose_config(
        "model=opt-13b", "model.random_init=true", f"method={method}", f"model.dtype={dtype}"
    )
    n_params = parameter_count(cfg.model, load_tokenizer(cfg.model))
    assert n_params == 12_853_473_280  # facebook/opt-13b's
    floor, _ = build_method(cfg).memory_floor(
        n_params, torch.finfo(getattr(torch, dtype)).bits // 8
    )
    assert floor / 2**30 == pytest.approx(floor_gib_13b, abs=0.1)
    if fits_13b:
        check_fits(cfg, build_method(cfg), n_params, H200, torch.device("cuda:0"))
        return
    with pytest.raises(DoesNotFit) as err:
        check_fits(cfg, build_method(cfg), n_params, H200, torch.device("cuda:0"))
    assert str(err.value) == (
        "out of memory before building the model: method ft on opt-13b (12.85B parameters in "
        "float32) keeps at least 191.5 GiB on the device (the weights, their gradients and "
        "AdamW's two moments), and cuda:0 has a total capacity of 139.81 GiB: the run does not "
        "fit on one GPU"
    )
    # The report's memory table turns it into its "does not fit" cell.
    assert report._does_not_fit(pd.Series([str(err.value)])) == "does not fit on one 139.81 GiB GPU"


def test_a_run_that_cannot_fit_is_refused_before_its_model_is_built(tmp_path, monkeypatch):
    """On a device of 2 MiB (as if it were a GPU that small): FT of the tiny OPT (0.2M float32
    parameters: 0.8 MB of weights, 3.2 MB with gradients and moments) does not fit, MeZO does."""
    monkeypatch.setattr(runner_module, "device_capacity", lambda device: 2 * 2**20)
    built = []
    monkeypatch.setattr(runner_module, "load_model", lambda *a: built.append(a) or load_model(*a))
    with pytest.raises(DoesNotFit, match=r"method ft on tiny-opt \(0\.00B parameters"):
        run_overrides(tmp_path / "ft", "method=ft", "trainer.max_steps=2")
    assert not built
    assert not (tmp_path / "ft" / "results.json").exists()  # the entry records it (rejected)
    results = run_overrides(tmp_path / "mezo", "method=mezo", "trainer.max_steps=2")
    assert results["status"] == "completed" and len(built) == 1
    assert json.loads((tmp_path / "mezo" / "results.json").read_text())["steps"] == 2
