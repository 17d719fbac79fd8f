"""Every config composes into the typed schema; typos and bad values fail at start."""

import dataclasses
from pathlib import Path

import pytest
from conftest import CONF, compose_config

from lozo_exp.config import ConfigError, validate
from lozo_exp.methods import METHODS

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
RECIPE_OF = {"tiny": "smoke", "opt": "opt", "roberta": "roberta"}


def test_config_groups_match_the_code():
    assert sorted(p.stem for p in (CONF / "method").glob("*.yaml")) == sorted(METHODS)
    assert {"opt-13b", "opt-66b", "roberta-large", "tiny-opt", "tiny-roberta"} <= set(MODELS)


# model=local takes a checkpoint directory, whose config gives the family (resolve_model).
CHECKPOINT = {"local": ("model.hub_id=/path/to/checkpoint", "model.family=causal")}


@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_method_composes(model):
    """Each method's yaml and its hparams for the model's recipe compose onto its own schema."""
    for method in METHODS:
        cfg = compose_config(f"model={model}", f"method={method}", *CHECKPOINT.get(model, ()))
        assert (cfg.model.name, cfg.method.name) == (model, method)
        assert type(cfg.method) is METHODS[method].config
        if method == "icl" and cfg.model.family == "masked":
            with pytest.raises(ConfigError, match="needs a causal model"):
                validate(cfg)
        else:
            validate(cfg)


@pytest.mark.parametrize("model", ["tiny-opt", "opt-13b", "roberta-large"])
def test_every_task_composes(model):
    for task in TASKS:
        cfg = compose_config(f"model={model}", f"task={task}", "logger=wandb")
        validate(cfg)
        assert cfg.task.name == task and cfg.logger.wandb


def test_recipes_follow_the_model_family():
    opt = compose_config("model=opt-13b", "method=lozo")
    assert (opt.trainer.max_steps, opt.trainer.eval_steps, opt.method.batch_size) == (
        20000,
        4000,
        16,
    )
    assert (opt.method.lr, opt.method.eps, opt.model.dtype) == (1e-6, 1e-3, "float16")
    rob = compose_config("model=roberta-large", "method=lozo-m")
    assert (rob.trainer.max_steps, rob.method.batch_size, rob.method.rank) == (100000, 64, 4)
    assert (rob.method.interval, rob.method.beta, rob.task.k) == (100, 0.9, 16)
    ft = compose_config("model=roberta-large", "method=ft")
    assert (ft.trainer.max_steps, ft.method.batch_size, ft.method.lr) == (1000, 8, 1e-5)
    assert (ft.trainer.lr_schedule, opt.trainer.lr_schedule) == ("linear", "constant")
    assert (ft.trainer.max_grad_norm, ft.trainer.amp, ft.trainer.select_by) == (
        1.0,
        "off",
        "metric",
    )
    assert (opt.trainer.select_by, rob.trainer.select_by) == ("loss", "metric")
    # finetune.sh: 5 epochs, evaluated at each epoch's end, clipped at 1.0, --fp16 (fp32 weights)
    opt_ft = compose_config("model=opt-13b", "method=ft")
    tr = opt_ft.trainer
    assert (tr.max_steps, tr.epochs, tr.eval_steps, tr.select_by) == (None, 5, None, "loss")
    assert (tr.max_grad_norm, tr.amp, tr.lr_schedule, opt_ft.model.dtype) == (
        1.0,
        "fp16",
        "linear",
        "float32",
    )
    assert (opt_ft.method.batch_size, opt_ft.method.lr, opt_ft.method.betas) == (
        8,
        1e-5,
        [0.9, 0.999],
    )
    tiny = compose_config("model=tiny-roberta")
    assert tiny.task.source == "sample" and tiny.trainer.max_steps < 100
    # The user's overrides beat every default.
    assert compose_config("model=opt-13b", "method=lozo", "method.lr=1e-7").method.lr == 1e-7


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.lrr=1", r"^method\.lrr is not a key of method mezo; its keys are: name, lr, "),
        ("+method.lrr=1", r"^method\.lrr is not a key of method mezo; its keys are: name, lr, "),
        ("task.data_files.training=x.csv", r"^task\.data_files\.training is not a key of "),
        ("trainer.max_steps=many", "^trainer.max_steps: Value 'many' of type 'str' could not be"),
        ("method=adam", "^method=adam is not an option of method; its options are: ft, ft-lora"),
        ("model=opt-14b", "^model=opt-14b is not an option of model; its options are: local, opt-"),
        ("task=imdb", "^task=imdb is not an option of task; its options are: boolq, cb"),
    ],
)
def test_typos_fail_when_composing(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(override)


@pytest.mark.parametrize(
    "method, key",
    [
        ("mezo", "rank=7"),
        ("mezo", "lora_r=4"),
        ("lozo", "beta=0.5"),
        ("lozo-m", "num_demos=3"),
        ("mezo-lora", "betas=[0.9,0.99]"),
        ("ft", "eps=1e-3"),
        ("ft", "engine=plain"),
        ("ft-lora", "interval=10"),
        ("zero-shot", "lr=1e-6"),
        ("icl", "batch_size=4"),
    ],
)
def test_a_key_the_method_does_not_use_fails_when_composing(method, key):
    name = key.split("=")[0]
    keys = ", ".join(f.name for f in dataclasses.fields(METHODS[method].config))
    with pytest.raises(ConfigError) as err:
        compose_config(f"method={method}", f"method.{key}")
    assert str(err.value) == f"method.{name} is not a key of method {method}; its keys are: {keys}"


def test_each_method_has_the_keys_it_uses():
    keys = {name: set(vars(compose_config(f"method={name}").method)) for name in METHODS}
    zo = {"name", "lr", "eps", "weight_decay", "batch_size", "engine"}
    lora = {"lora_r", "lora_alpha", "target_modules", "modules_to_save"}
    ft = {"name", "lr", "weight_decay", "batch_size", "betas", "adam_eps", "warmup_steps"}
    assert keys == {
        "mezo": zo,
        "lozo": zo | {"rank", "interval"},
        "lozo-m": zo | {"rank", "interval", "beta"},
        "mezo-lora": zo | lora,
        "ft": ft,
        "ft-lora": ft | lora,
        "zero-shot": {"name"},
        "icl": {"name", "num_demos"},
    }


@pytest.mark.parametrize(
    "override, named",
    [
        ("method.lr=-1e-6", "method.lr=-1e-06"),
        ("method=lozo method.rank=0", "method.rank=0"),
        ("method=lozo method.interval=0", "method.interval=0"),
        ("method.eps=0", "method.eps=0.0"),
        ("method=ft method.batch_size=0", "method.batch_size=0"),
        ("method=lozo-m method.beta=1.0", "method.beta=1.0"),
        ("method=lozo-m method.beta=-0.1", "method.beta=-0.1"),
        ("trainer.select_by=accuracy", "trainer.select_by='accuracy' is not one of loss, metric"),
        ("trainer.amp=fp8", "trainer.amp='fp8' is not one of off, fp16, bf16"),
        ("trainer.epochs=3", "set exactly one of trainer.max_steps and trainer.epochs"),
        ("trainer.max_steps=null", "set exactly one of trainer.max_steps and trainer.epochs"),
        ("trainer.amp=bf16", "apply to backprop methods (ft, ft-lora); method mezo needs amp=off"),
        ("trainer.max_grad_norm=1.0", "trainer.max_grad_norm=1.0 apply to backprop methods"),
        ("method=ft trainer.max_grad_norm=0", "trainer.max_grad_norm=0.0 must be > 0"),
        ("method=ft trainer.amp=fp16 model.dtype=float16", "needs model.dtype=float32"),
        ("method=ft method.betas=[0.9]", "method.betas=[0.9] must be two numbers"),
        ("method=mezo-lora method.lora_r=0", "method.lora_r=0"),
        ("method=icl method.num_demos=-1", "method.num_demos=-1"),
        ("method.name=lozo", "method.name='lozo' does not name this method's schema"),
        ("model.dtype=float8", "model.dtype='float8'"),
        ("task.data_files.train=/nonexistent/train.parquet", "/nonexistent/train.parquet"),
    ],
)
def test_bad_values_are_named(override, named):
    with pytest.raises(ConfigError, match="Invalid configuration") as err:
        validate(compose_config(*override.split()))
    assert named in str(err.value)


def test_every_model_yaml_names_its_family_and_architecture():
    for model in set(MODELS) - set(CHECKPOINT):
        cfg = compose_config(f"model={model}")
        assert cfg.model.family in ("causal", "masked")
        assert cfg.model.arch.get("hidden_size") or cfg.model.gguf_file, model  # GGUF: in the file
        assert cfg.model.hub_id or cfg.model.random_init, model
        assert Path(CONF / "model" / f"{model}.yaml").read_text().startswith("#")
