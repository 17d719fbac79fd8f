"""Methods: the registry, dev-state selection and the dev loss, the FT recipe (epochs, clipping,
mixed precision, warmup) and LoRA's trainable set, on tiny models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch
from conftest import compose_config, read_metrics, run_overrides
from hydra.core.config_store import ConfigStore
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from large_models.adapter import PromptBatch
from lozo_exp.config import ConfigError
from lozo_exp.methods import METHODS, lr_factor, register
from lozo_exp.methods.zo import MeZOConfig, MeZOMethod
from lozo_exp.runner import Runner
from lozo_exp.tracking import MetricsLog

ONE_EVAL = ("trainer.eval_steps=100", "trainer.log_steps=1")
SMALL = ("task.num_dev=4", "task.num_eval=4")


def _train(runner: Runner) -> list[dict]:
    runner.out_dir.mkdir(parents=True, exist_ok=True)
    runner.train(MetricsLog(runner.out_dir, runner.cfg.logger, "t", {}))
    return [r for r in read_metrics(runner.out_dir) if "loss" in r]


def _params(runner: Runner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in runner.state.model.named_parameters()}


# -- the registry -------------------------------------------------------------------------------


@dataclass
class ScaledMeZOConfig(MeZOConfig):
    name: str = "scaled-mezo"
    lr_scale: float = 0.5


class ScaledMeZO(MeZOMethod):
    """A new method: MeZO at a scaled learning rate, with a key of its own."""

    config = ScaledMeZOConfig

    def learning_rate(self, step: int, total_steps: int) -> float:
        return super().learning_rate(step, total_steps) * self.cfg.lr_scale


@pytest.fixture
def scaled_mezo():
    """ScaledMeZO registered, and its schema as `method=scaled-mezo` (what its yaml would be)."""
    register(ScaledMeZO)
    store = ConfigStore.instance()
    store.store(group="method", name="scaled-mezo", node=ScaledMeZOConfig)
    yield
    del METHODS["scaled-mezo"]
    store.repo["method"].pop("scaled-mezo.yaml")
    store.repo.pop("scaled-mezo_schema.yaml", None)  # stored by the next compose


def test_a_new_method_is_a_registered_class_and_its_schema(run_dir, scaled_mezo):
    results = run_overrides(
        run_dir,
        "method=scaled-mezo",
        "method.lr_scale=0.25",
        "trainer.max_steps=2",
        *ONE_EVAL,
        *SMALL,
    )
    assert results["status"] == "completed" and results["method_config"]["lr_scale"] == 0.25
    logged = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["lr"] for r in logged] == [0.25e-6, 0.25e-6] and "projected_grad" in logged[0]
    with pytest.raises(ConfigError, match=r"^method\.rank is not a key of method scaled-mezo; "):
        compose_config("method=scaled-mezo", "method.rank=2")
    with pytest.raises(ValueError, match="two methods are named 'scaled-mezo'"):
        register(ScaledMeZO)


# -- which dev state is tested ------------------------------------------------------------------


def test_select_by_loss_tests_the_state_of_the_lowest_dev_loss(run_dir):
    results = run_overrides(
        run_dir,
        "method=ft",
        "trainer.select_by=loss",
        "trainer.max_steps=8",
        "trainer.eval_steps=2",
    )
    dev = [r for r in read_metrics(run_dir) if r.get("split") == "dev"]
    best = min(dev, key=lambda r: r["dev_loss"])  # the first of equals
    assert len({r["dev_loss"] for r in dev}) > 1  # the run moved, so the choice means something
    assert results["best_step"] == best["step"] and results["dev"]["dev_loss"] == best["dev_loss"]
    assert results["dev"]["accuracy"] == best["accuracy"]


def test_dev_loss_is_the_mean_objective_in_eval_mode(tmp_path):
    runner = Runner(compose_config("method=ft", "task.num_dev=7"), tmp_path)
    adapter, rows = runner.adapter, runner.splits.dev
    assert runner.state.model.training  # FT trains in train mode; the dev loss is eval mode
    with torch.no_grad():
        runner.state.model.eval()
        per_row = [float(adapter.objective_loss([row])) for row in rows]
        runner.state.model.train()
    for batch_size in (1, 3, len(rows)):  # batch losses weighted by their rows: no bias
        assert adapter.dev_loss(rows, batch_size) == pytest.approx(sum(per_row) / len(rows))
    assert runner.state.model.training


def test_non_diff_dev_loss_is_the_teacher_forced_loss_of_the_gold_answer(tmp_path):
    cfg = compose_config("task=squad", "task.non_diff=true", "method=mezo", "task.num_dev=2")
    runner = Runner(cfg, tmp_path)
    adapter, rows = runner.adapter, runner.splits.dev
    assert isinstance(adapter.collate(rows), PromptBatch)  # trains on generations
    dev = adapter.dev_loss(rows, 2)
    adapter.non_diff = False
    assert dev == pytest.approx(adapter.dev_loss(rows, 2)) and dev > 0


# -- the FT recipe ------------------------------------------------------------------------------


def test_epochs_set_the_steps_and_a_dev_evaluation_ends_each_epoch(tmp_path):
    overrides = (
        "method=ft",
        "trainer.max_steps=null",
        "trainer.epochs=2",
        "trainer.eval_steps=null",
    )
    cfg = compose_config(*overrides, "method.batch_size=5", "trainer.lr_schedule=linear")
    runner = Runner(cfg, tmp_path)
    per_epoch = math.ceil(len(runner.splits.train) / 5)  # the last batch of an epoch is short
    assert per_epoch * 5 != len(runner.splits.train)
    results = runner.run()
    records = read_metrics(tmp_path)
    assert results["steps"] == 2 * per_epoch
    epochs = []  # the batches of an epoch cover every row once, in a new order each epoch
    for epoch in range(2):
        runner.state.step, order = epoch * per_epoch, []
        for _ in range(per_epoch):
            order += [id(r) for r in runner.state.next_batch(runner.splits.train, 5)]
            runner.state.step += 1
        assert sorted(order) == sorted(id(r) for r in runner.splits.train)
        epochs.append(order)
    assert epochs[0] != epochs[1]
    assert [r["step"] for r in records if r.get("split") == "dev"] == [per_epoch, 2 * per_epoch]
    lrs = [r["lr"] for r in records if "lr" in r]  # linear decay to 0 over the derived steps
    logged_steps = [r["step"] for r in records if "lr" in r]
    assert lrs == pytest.approx([1e-3 * (1 - (s - 1) / (2 * per_epoch)) for s in logged_steps])


@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedules_are_hf_trainers(warmup):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    linear = get_linear_schedule_with_warmup(opt, warmup, 10).lr_lambdas[0]
    constant = get_constant_schedule_with_warmup(opt, warmup).lr_lambdas[0]
    for step in range(12):
        assert lr_factor("linear", step, 10, warmup) == pytest.approx(linear(step))
        assert lr_factor("constant", step, 10, warmup) == pytest.approx(constant(step))


def test_clipping_bounds_the_gradient_the_optimizer_sees(tmp_path, monkeypatch):
    final = {}
    for clip in ("null", "1e-3"):
        cfg = compose_config(
            "method=ft", f"trainer.max_grad_norm={clip}", "trainer.max_steps=3", *ONE_EVAL
        )
        runner = Runner(cfg, tmp_path / clip)
        optimizer, seen = runner.state.optimizer, []
        real_step = optimizer.step

        def step(*args, real_step=real_step, seen=seen, optimizer=optimizer, **kwargs):
            grads = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return real_step(*args, **kwargs)

        monkeypatch.setattr(optimizer, "step", step)
        records = _train(runner)
        final[clip] = _params(runner)
        if clip == "null":
            assert all(n > 1e-2 for n in seen) and all("grad_norm" not in r for r in records)
            unclipped = seen[0]
        else:  # the optimizer sees the clipped gradient; the log shows the norm before clipping
            assert seen == pytest.approx([1e-3] * 3, rel=1e-3)
            assert records[0]["grad_norm"] == pytest.approx(unclipped, rel=1e-5)
            assert all(r["grad_norm"] > 1e-2 for r in records)
    moved = [n for n, p in final["null"].items() if not torch.equal(p, final["1e-3"][n])]
    assert moved  # Adam's first step ignores a uniform scale; the later ones do not


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_autocasts_the_loss_over_float32_weights(tmp_path, monkeypatch, amp, dtype):
    cfg = compose_config("method=ft", f"trainer.amp={amp}", "trainer.max_steps=4", *ONE_EVAL)
    runner = Runner(cfg, tmp_path)
    real_loss, seen, weights = runner.adapter.loss, [], []

    def loss(batch):
        if torch.is_inference_mode_enabled():  # the dev loss
            return real_loss(batch)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        weights.append(_params(runner))  # before this step
        scale = 1e8 if len(seen) == 2 else 1.0  # step 2's fp16 gradients overflow
        return real_loss(batch) * scale

    monkeypatch.setattr(runner.adapter, "loss", loss)
    records = _train(runner)
    weights.append(_params(runner))
    assert seen == [(True, dtype)] * 4
    assert all(p.dtype == torch.float32 for p in weights[-1].values())
    moved = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in pairwise(weights)]
    scaler = runner.method.scaler
    assert scaler.is_enabled() == ("scaler" in runner.method.state_dict()) == (amp == "fp16")
    if amp == "fp16":  # the loss scaler skips the overflowing step and halves its scale
        assert moved == [True, False, True, True] and scaler.get_scale() == 2.0**15
        assert not math.isfinite(records[1]["grad_norm"]) and math.isfinite(records[2]["grad_norm"])
    else:
        assert moved == [True] * 4


# -- LoRA's trainable set -----------------------------------------------------------------------

LAYERS, HIDDEN, R = 2, 64, 8  # tiny-opt and tiny-roberta


def _lora(prefix: str, modules: tuple[str, str]) -> set[str]:
    return {
        f"{prefix}.{layer}.{m}.lora_{ab}.weight"
        for layer in range(LAYERS)
        for m in modules
        for ab in "AB"
    }


ROBERTA_LORA = _lora("roberta.encoder.layer", ("attention.self.query", "attention.self.value"))
OPT_LORA = _lora("model.decoder.layers", ("self_attn.q_proj", "self_attn.v_proj"))
# What the published medium_models code trains with --apply_lora: every parameter outside
# `roberta.*`, i.e. the whole LM head (its decoder untied from the input embeddings).
ROBERTA_HEAD = {f"lm_head.{m}.{w}" for m in ("dense", "layer_norm") for w in ("weight", "bias")}
ROBERTA_HEAD |= {"lm_head.decoder.weight", "lm_head.bias"}


@pytest.mark.parametrize(
    "overrides, names",
    [
        (("model=tiny-roberta", "method=mezo-lora"), ROBERTA_LORA | ROBERTA_HEAD),
        (("model=tiny-roberta", "method=ft-lora"), ROBERTA_LORA | ROBERTA_HEAD),
        (("model=tiny-roberta", "method=ft-lora", "method.modules_to_save=[]"), ROBERTA_LORA),
        (("model=tiny-opt", "method=mezo-lora"), OPT_LORA),  # published OPT LoRA: adapters only
        (("model=tiny-opt", "method=ft-lora"), OPT_LORA),
    ],
)
def test_lora_trains_what_the_published_code_trains(tmp_path, overrides, names):
    runner = Runner(compose_config(*overrides), tmp_path)
    trainable = {
        n.removeprefix("base_model.model.")
        .replace(".modules_to_save", "")
        .replace(".default", ""): p
        for n, p in runner.state.model.named_parameters()
        if p.requires_grad
    }
    assert set(trainable) == names
    vocab = len(runner.adapter.tokenizer)
    head = HIDDEN * HIDDEN + 3 * HIDDEN + vocab * HIDDEN + vocab if names >= ROBERTA_HEAD else 0
    lora = LAYERS * 2 * 2 * R * HIDDEN
    assert sum(p.numel() for p in trainable.values()) == lora + head


def test_the_lm_head_trains_as_an_untied_copy_that_scores(tmp_path):
    cfg = compose_config("model=tiny-roberta", "method=ft-lora", "trainer.max_steps=3")
    runner = Runner(cfg, tmp_path)
    before = _params(runner)
    _train(runner)
    after = _params(runner)
    changed = {n for n, p in after.items() if not torch.equal(before[n], p)}
    assert any(".modules_to_save.default.decoder.weight" in n for n in changed)
    assert not any("embeddings" in n or "original_module" in n for n in changed)
    head = runner.adapter.lm_head
    hidden = torch.randn(3, HIDDEN)
    torch.testing.assert_close(head(hidden), head.modules_to_save["default"](hidden))


# -- RoBERTa's untied head ------------------------------------------------------------------------
EMBEDDINGS, DECODER = "roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight"


def test_roberta_large_unties_its_head_by_default_and_other_models_keep_theirs():
    assert compose_config("model=roberta-large").model.tie_word_embeddings is False
    for model in ("tiny-roberta", "tiny-opt", "opt-13b"):
        assert compose_config(f"model={model}").model.tie_word_embeddings is None


@pytest.mark.parametrize(
    "method, engine", [("mezo", "fast"), ("mezo", "plain"), ("lozo", "fast"), ("ft", "fast")]
)
def test_an_untied_head_is_its_own_parameter_that_trains_apart(tmp_path, method, engine):
    overrides = ("model=tiny-roberta", f"method={method}", "trainer.max_steps=2", *ONE_EVAL)
    tied = Runner(compose_config(*overrides), tmp_path / "tied")
    engine_key = () if method == "ft" else (f"method.engine={engine}",)
    untie = ("model.tie_word_embeddings=false", *engine_key)
    untied = Runner(compose_config(*overrides, *untie), tmp_path / "untied")
    assert set(untied.state.trainable()) - set(tied.state.trainable()) == {DECODER}
    assert set(tied.state.trainable()) <= set(untied.state.trainable())
    vocab = len(untied.adapter.tokenizer)

    def count(runner: Runner) -> int:
        return sum(p.numel() for p in runner.state.trainable().values())

    assert count(untied) - count(tied) == vocab * HIDDEN
    model = untied.state.model
    embeddings, decoder = model.get_input_embeddings().weight, model.lm_head.decoder.weight
    assert decoder is not embeddings and torch.equal(decoder, embeddings)  # a copy at load
    assert untied.adapter.lm_head.decoder.weight is decoder  # the head that scores
    before = _params(untied)
    _train(untied)
    after = _params(untied)
    assert not torch.equal(before[EMBEDDINGS], after[EMBEDDINGS])
    assert not torch.equal(before[DECODER], after[DECODER])
    assert not torch.equal(after[EMBEDDINGS], after[DECODER])  # each moved its own way
