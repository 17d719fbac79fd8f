"""Every config composes into the typed schema; typos and bad values fail at start."""

from pathlib import Path

import pytest
from conftest import CONF, compose_config

from lozo_exp.config import METHODS, ConfigError, validate

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
RECIPE_OF = {"tiny": "smoke", "opt": "opt", "roberta": "roberta"}


def test_config_groups_match_the_code():
    assert sorted(p.stem for p in (CONF / "method").glob("*.yaml")) == sorted(METHODS)
    assert {"opt-13b", "opt-66b", "roberta-large", "tiny-opt", "tiny-roberta"} <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_method_composes(model):
    for method in METHODS:
        cfg = compose_config(f"model={model}", f"method={method}")
        assert (cfg.model.name, cfg.method.name) == (model, method)
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
        ("model=opt-14b", "^model=opt-14b is not an option of model; its options are: opt-1.3b"),
        ("task=imdb", "^task=imdb is not an option of task; its options are: boolq, cb"),
    ],
)
def test_typos_fail_when_composing(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(override)


@pytest.mark.parametrize(
    "override, named",
    [
        ("method.lr=-1e-6", "method.lr=-1e-06"),
        ("method.rank=0", "method.rank=0"),
        ("method.interval=0", "method.interval=0"),
        ("method.eps=0", "method.eps=0.0"),
        ("method.batch_size=0", "method.batch_size=0"),
        ("method.beta=1.0", "method.beta=1.0"),
        ("method.beta=-0.1", "method.beta=-0.1"),
        ("model.dtype=float8", "model.dtype='float8'"),
        ("task.data_files.train=/nonexistent/train.parquet", "/nonexistent/train.parquet"),
    ],
)
def test_bad_values_are_named(override, named):
    with pytest.raises(ConfigError, match="Invalid configuration") as err:
        validate(compose_config(override))
    assert named in str(err.value)


def test_every_model_yaml_names_its_family_and_architecture():
    for model in MODELS:
        cfg = compose_config(f"model={model}")
        assert cfg.model.family in ("causal", "masked")
        assert cfg.model.arch.get("hidden_size"), model
        assert cfg.model.hub_id or cfg.model.random_init, model
        assert Path(CONF / "model" / f"{model}.yaml").read_text().startswith("#")
